"""Hugging Face architectures, tokenizers and initial weights as data: validation (one-line errors naming the field),
sizes counted before building, artifacts by sha256, held-out evaluation, checkpoint export (torch, safetensors, hf),
progress records with evaluations, the kept-checkpoint store and the GPU check's message on a CPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch

from conftest import train_tokenizer
from p2pcompute.errors import DatasetUnavailable, InvalidManifest, TrainingError, UsageError
from p2pcompute.runs.artifacts import ArtifactStore
from p2pcompute.runs.datasets import batch_for, default_stdlib_dir, eval_batch, stdlib_files
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.materialize import check_artifacts, run_dataset, run_model
from p2pcompute.runs.model_specs import MAX_PARAMETERS
from p2pcompute.services.checkpoint_store import CheckpointStore
from p2pcompute.training.checkpoint import export_checkpoint, save_checkpoint
from p2pcompute.training.local import evaluate, single_process, train_locally
from p2pcompute.training.progress import EvalPoint, ProgressRecord, summarize

CHECKOUT = Path(__file__).resolve().parent.parent
RUN, PEER = b"r" * 32, b"p" * 32
GPT2 = 'model_type = "gpt2", n_layer = 2, n_embd = 32, n_head = 2, n_positions = 64'


def gpt2_spec(config: str = GPT2 + ", vocab_size = 256", model_extra: str = "", extra: str = "") -> str:
    return f"""
name = "gpt2-unit"
batch_size_per_step = 4
target_batch_size = 16
{extra}
[model]
name = "hf"
task = "causal-lm"
config = {{ {config} }}
{model_extra}
[dataset]
name = "pystdlib"
seq_len = 16
packages = ["json"]

[optimizer]
name = "adam"
lr = "0.003"
"""


VIT = ('model_type = "vit", num_hidden_layers = 1, hidden_size = 16, num_attention_heads = 2, intermediate_size = 32, '
       'image_size = 8, patch_size = 4, num_channels = 1')


def vit_spec(config: str = "num_labels = 3", task: str = "image-classification") -> str:
    return f"""
name = "vit-unit"
batch_size_per_step = 8
target_batch_size = 32

[model]
name = "hf"
task = "{task}"
config = {{ {", ".join(filter(None, [VIT, config]))} }}

[dataset]
name = "synthetic"
task = "classification"
input_shape = [1, 8, 8]
outputs = 3
seed = 5

[optimizer]
name = "adam"
lr = "0.003"

[eval]
every = 1
samples = 64
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A BPE tokenizer.json trained here on the json package's sources, in an artifact store: (store, sha256)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    texts = [path.read_text() for _, path in stdlib_files(default_stdlib_dir(), ("json",))]
    sha256 = train_tokenizer(texts, directory / "tokenizer.json", vocab_size=320)
    store = ArtifactStore(directory / "artifacts")
    assert store.add(directory / "tokenizer.json") == sha256
    return store, sha256


def test_hf_manifest_round_trips_and_counts_parameters_before_building():
    manifest = Manifest.from_toml(gpt2_spec())
    assert Manifest.from_wire(manifest.to_wire()) == manifest
    model = run_model(manifest)
    assert manifest.parameter_count == sum(p.numel() for p in model.parameters())  # counted on the meta device
    config = manifest.summary()["model"]["config"]
    assert config["model_type"] == "gpt2" and config["resid_pdrop"] == "0"  # dropout defaults to 0 here
    assert model.config.resid_pdrop == 0.0 and not model.config.use_cache
    again = run_model(manifest)  # every peer starts from the same parameters
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    # key order in the TOML does not matter: one manifest, one run id
    reordered = gpt2_spec("vocab_size = 256, n_positions = 64, n_head = 2, n_embd = 32, n_layer = 2, "
                          'model_type = "gpt2"')
    assert Manifest.from_toml(reordered).run_id == manifest.run_id


@pytest.mark.parametrize("text, message", [
    (gpt2_spec('model_type = "t5", d_model = 8'), "model.config: model_type 't5' is not allowed (allowed: gpt2,"),
    (gpt2_spec(GPT2 + ', auto_map = { AutoModel = "x.Y" }'), "model.config: auto_map is refused"),
    (gpt2_spec(GPT2 + ", trust_remote_code = true"), "model.config: trust_remote_code is refused"),
    (gpt2_spec(GPT2 + ', _name_or_path = "gpt2"'), "model.config: _name_or_path is refused"),
    (gpt2_spec(GPT2 + ', architectures = ["GPT2LMHeadModel"]'), "model.config: architectures is refused"),
    (gpt2_spec(GPT2 + ', attn_implementation = "flash_attention_2"'), "model.config: attn_implementation is refused"),
    (gpt2_spec(GPT2 + ", n_ctx = 64"), "model.config: n_ctx is not an allowed gpt2 config key"),
    (gpt2_spec(GPT2.replace("n_layer = 2", "n_layer = 0")), "model.config: n_layer: 0 is out of range"),
    (gpt2_spec(GPT2.replace("n_embd = 32", 'n_embd = "32"')), "model.config: n_embd: expected an integer"),
    (gpt2_spec(GPT2 + ', activation_function = "os.system"'), "model.config: activation_function:"),
    (gpt2_spec(GPT2.replace("n_embd = 32, n_head = 2", "n_embd = 30, n_head = 4")), "divisible by the attention heads"),
    (gpt2_spec('model_type = "gpt2", n_layer = 48, n_embd = 1600, n_head = 25'), "is above the limit of 350,000,000"),
    (gpt2_spec(GPT2 + ", vocab_size = 200"), "vocab_size is 200 but the dataset's byte tokens go up to 256"),
    (gpt2_spec(GPT2 + ", vocab_size = 256", 'init = "abc"'), "model.init: 'abc' is not a valid sha256"),
    (gpt2_spec(GPT2 + ", vocab_size = 256", extra="[eval]\nevery = 0\n"), "eval.every: 0 is out of range"),
    (vit_spec(task="causal-lm"), "task causal-lm is not available for model_type vit"),
    (vit_spec("num_labels = 4"), "num_labels is 4 but the dataset has 3 classes"),
    (vit_spec("num_labels = 3").replace("num_channels = 1", "num_channels = 3"), "expects images of shape [3, 8, 8]"),
    (vit_spec(""), "num_labels is missing"),
])
def test_bad_hf_configs_give_one_line_errors_naming_the_field(text, message):
    with pytest.raises(InvalidManifest) as caught:
        Manifest.from_toml(text)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_config_pairs_on_the_wire_must_be_canonical():
    manifest = Manifest.from_toml(gpt2_spec())
    items = msgpack.unpackb(manifest.to_wire())
    items[6][1][1] = list(reversed(items[6][1][1]))  # the config's [key, value] pairs, out of order
    with pytest.raises(InvalidManifest, match="not in canonical encoding"):
        Manifest.from_wire(msgpack.packb(items))
    items[6][1][1] = [["model_type", "gpt2"], ["auto_map", "x"]]
    with pytest.raises(InvalidManifest, match="auto_map is refused"):
        Manifest.from_wire(msgpack.packb(items))


def test_training_memory_is_checked_against_the_node():
    manifest = Manifest.from_toml(gpt2_spec())
    assert manifest.unmet("cpu", 1 << 30) is None
    assert "needs ~" in manifest.unmet("cpu", manifest.parameter_count * 4)
    assert MAX_PARAMETERS == 350_000_000


def test_tokenizer_as_data_and_the_held_out_tail(tokenizer, tmp_path):
    store, sha256 = tokenizer
    spec = gpt2_spec(GPT2 + ", vocab_size = 320", f'tokenizer = "{sha256}"', "[eval]\nevery = 1\nholdout = 0.2\n")
    manifest = Manifest.from_toml(spec)
    dataset = run_dataset(manifest, artifacts=store)
    assert dataset.shape.outputs == 320 and int(dataset.tokens.max()) < 320
    # training windows never reach into the held-out tail; evaluation draws only from it
    x, y = batch_for(dataset, RUN, PEER, 0, 0, 64)
    tail = dataset.tokens[dataset.cut:]
    ex, _ = eval_batch(dataset, RUN, 16)
    assert all(_inside(row, tail) for row in ex[:4])
    assert all(_inside(row, dataset.tokens[:dataset.cut]) for row in x[:4])
    assert check_artifacts(manifest, store) == {"tokenizer": store.cache_dir / sha256}
    with pytest.raises(DatasetUnavailable, match="more than the model's vocab_size 300"):
        run_dataset(Manifest.from_toml(spec.replace("vocab_size = 320", "vocab_size = 300")), artifacts=store)
    with pytest.raises(DatasetUnavailable, match="is not on this node"):
        run_dataset(manifest, artifacts=ArtifactStore(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / sha256).write_text("{}")  # a file under the right name with the wrong bytes is never used
    with pytest.raises(DatasetUnavailable, match="its sha256 is"):
        ArtifactStore(tmp_path / "empty", (bad,)).resolve(sha256)


def _inside(row: torch.Tensor, tokens: torch.Tensor) -> bool:
    n = len(row)
    return any(torch.equal(tokens[i:i + n], row) for i in range(len(tokens) - n + 1))


def test_initial_weights_load_strictly(tmp_path):
    from safetensors.torch import save_model

    manifest = Manifest.from_toml(gpt2_spec())
    donor = run_model(Manifest.from_toml(gpt2_spec().replace("gpt2-unit", "other")))  # another seed
    save_model(donor, str(tmp_path / "init.safetensors"))
    store = ArtifactStore(tmp_path / "artifacts")
    sha256 = store.add(tmp_path / "init.safetensors")
    with_init = Manifest.from_toml(gpt2_spec(model_extra=f'init = "{sha256}"'))
    assert check_artifacts(with_init, store) == {"init": store.cache_dir / sha256}
    model = run_model(with_init, store)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), donor.parameters()))
    # weights of another shape are refused before anything is loaded, and at load time too
    wider = run_model(Manifest.from_toml(gpt2_spec(GPT2.replace("n_embd = 32", "n_embd = 48") + ", vocab_size = 256")))
    save_model(wider, str(tmp_path / "wider.safetensors"))
    wrong = Manifest.from_toml(gpt2_spec(model_extra=f'init = "{store.add(tmp_path / "wider.safetensors")}"'))
    with pytest.raises(TrainingError, match="do not fit the model"):
        check_artifacts(wrong, store)
    with pytest.raises(TrainingError, match="do not fit the model"):
        run_model(wrong, store)
    (tmp_path / "junk").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    junk = Manifest.from_toml(gpt2_spec(model_extra=f'init = "{store.add(tmp_path / "junk")}"'))
    with pytest.raises(TrainingError, match="not a safetensors file"):
        run_model(junk, store)


def test_evaluation_reports_accuracy_for_classifiers():
    manifest = Manifest.from_toml(vit_spec())
    dataset = run_dataset(manifest)
    model = run_model(manifest)
    result = evaluate(model, dataset, manifest.run_id, 64, chunk=8)
    whole = evaluate(model, dataset, manifest.run_id, 64)
    assert 0 <= result.accuracy <= 1 and result.loss == pytest.approx(whole.loss, rel=1e-5)
    assert result.accuracy == whole.accuracy


@pytest.mark.parametrize("model_type, extra", [
    ("bert", "hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 64, "
             "max_position_embeddings = 16"),
    ("llama", "hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 4, num_key_value_heads = 2, "
              "intermediate_size = 64, max_position_embeddings = 16"),
])
def test_sequence_classifiers_learn_the_tokens_dataset(model_type, extra):
    manifest = Manifest.from_toml(f"""
name = "seq-unit"
batch_size_per_step = 32
target_batch_size = 32

[model]
name = "hf"
task = "sequence-classification"
config = {{ model_type = "{model_type}", vocab_size = 50, num_labels = 4, pad_token_id = 0, {extra} }}

[dataset]
name = "tokens"
seq_len = 12
vocab_size = 50
classes = 4
seed = 3
noise = 0

[optimizer]
name = "adam"
lr = "0.01"
""")
    assert manifest.data_shape.vocab == 50
    before = evaluate(run_model(manifest), run_dataset(manifest), manifest.run_id, 256)
    model, dataset = train_locally(manifest, single_process(epochs=30, steps_per_epoch=1))
    after = evaluate(model, dataset, manifest.run_id, 256)
    assert after.loss < 0.9 * before.loss and after.accuracy > before.accuracy, (before, after)


def test_checkpoint_exports_load_with_from_pretrained(tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, sha256 = tokenizer
    manifest = Manifest.from_toml(gpt2_spec(GPT2 + ", vocab_size = 320", f'tokenizer = "{sha256}"'))
    model = run_model(manifest, store)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # not the initial model: the export must carry these parameters
    source = save_checkpoint(tmp_path / "run.pt", model, manifest, 7)
    tokens = torch.arange(10).unsqueeze(0)
    expected = model.eval()(tokens).logits

    assert export_checkpoint(source, manifest, "torch", tmp_path / "copy.pt")["epoch"] == 7
    assert (tmp_path / "copy.pt").read_bytes() == source.read_bytes()
    export_checkpoint(source, manifest, "safetensors", tmp_path / "model.safetensors")
    state = load_file(tmp_path / "model.safetensors")
    assert torch.equal(state["lm_head.weight"], model.transformer.wte.weight)  # tied: stored once
    report = export_checkpoint(source, manifest, "hf", tmp_path / "hf", store)
    assert report["tokenizer"] == "tokenizer.json"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.allclose(loaded.eval()(tokens).logits, expected, atol=1e-5)
    text = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert text.decode(text("import json")["input_ids"]) == "import json"
    generated = loaded.generate(torch.tensor([text("def ")["input_ids"]]), max_new_tokens=5, do_sample=False,
                                pad_token_id=0)
    assert generated.shape[1] > 2

    with pytest.raises(UsageError, match="is a directory that is not empty"):
        export_checkpoint(source, manifest, "hf", tmp_path / "hf", store)
    mlp = Manifest.from_toml(Path(CHECKOUT / "docs/examples/mlp-synthetic.toml").read_text())
    mlp_ckpt = save_checkpoint(tmp_path / "mlp.pt", run_model(mlp), mlp, 1)
    with pytest.raises(UsageError, match="needs a run of an hf model"):
        export_checkpoint(mlp_ckpt, mlp, "hf", tmp_path / "mlp-hf")
    assert not (tmp_path / "mlp-hf").exists()


def test_progress_records_carry_evaluations():
    evals = tuple(EvalPoint.make(e, 5.0 - 0.1 * e, 4.9 - 0.1 * e, None) for e in range(1, 40))
    record = ProgressRecord.make(epoch=39, samples_done=100, loss=2.0, samples_per_second=5, status="training",
                                 reason="", now=1.0, device="cpu", evals=evals)
    assert len(record.evals) == 32 and record.evals[-1].epoch == 39  # the newest MAX_EVALS
    again = ProgressRecord.from_wire(record.to_wire())
    assert again == record
    other = ProgressRecord.make(epoch=39, samples_done=50, loss=2.2, samples_per_second=5, status="training",
                                reason="", now=1.0, device="cpu", evals=(EvalPoint.make(39, 2.1, 1.2, None),))
    status = summarize({"a": again, "b": other}, task="lm")
    last = status.evals[-1]
    assert last.epoch == 39 and last.peers == 2 and last.eval_loss == pytest.approx((1.0 + 1.2) / 2)
    assert last.perplexity == pytest.approx(2.718281828 ** 1.1, rel=1e-6) and last.accuracy is None
    assert status.to_json()["evals"][0]["epoch"] == 8
    items = msgpack.unpackb(record.to_wire())
    for bad in ([[1, 2, 3]], [[1, 2, 3, "x"]], "x", [[1, 2, 3, -2]]):
        with pytest.raises(Exception, match="progress record"):
            ProgressRecord.from_wire(msgpack.packb(items[:9] + [bad]))


def test_kept_checkpoints_are_capped_least_recently_used_first(tmp_path):
    import os

    store = CheckpointStore(tmp_path / "final", cap_bytes=2500)
    files = []
    for i in range(3):
        files.append(tmp_path / f"c{i}.pt")
        files[-1].write_bytes(bytes([i]) * 1000)
    a, b = b"a" * 32, b"b" * 32
    store.add(a, files[0], 3, b"manifest-a")
    store.add(b, files[1], 4, b"manifest-b")
    os.utime(store.get(b).path, (1, 1))  # b used long ago, a just now
    store.get(a)
    store.add(b"c" * 32, files[2], 5, b"manifest-c")
    assert sorted(k.run_id[:1] for k in store.kept()) == [b"a", b"c"]
    kept = store.get(a)
    assert kept.epoch == 3 and store.read_chunk(kept, 10, 5) == b"\x00" * 5 and kept.manifest_path.read_bytes() == \
        b"manifest-a"
    (tmp_path / "big.pt").write_bytes(b"x" * 3000)
    assert store.add(b"d" * 32, tmp_path / "big.pt", 1, b"") is None  # alone above the cap: not kept


def test_gpu_check_says_clearly_that_there_is_no_gpu():
    proc = subprocess.run([sys.executable, str(CHECKOUT / "scripts" / "gpu_check.py"),
                           str(CHECKOUT / "docs" / "examples" / "gpt2-tiny.toml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "gpu_check: no CUDA GPU here" in proc.stderr and "Nothing was run" in proc.stderr
    assert "Traceback" not in proc.stderr


RACE = """
import sys, threading
from p2pcompute.runs import hf_models
config = (("model_type", "gpt2"), ("n_embd", 32), ("n_head", 2), ("n_layer", 1), ("n_positions", 32),
          ("vocab_size", 64))
errors = []
def build():
    try:
        hf_models.build("causal-lm", config)
    except BaseException as e:
        errors.append(repr(e))
threads = [threading.Thread(target=build) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print(errors)
sys.exit(1 if errors else 0)
"""


def test_threads_that_build_hf_models_at_once_all_get_them():
    """transformers' lazy import raced: a node's ledger sync thread checking a manifest while its trainer built the
    model got "module 'transformers' has no attribute 'AutoModelForCausalLM'" (every run of this before the fix)."""
    proc = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(CHECKOUT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
