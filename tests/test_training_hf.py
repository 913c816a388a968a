"""Hugging Face models trained by real swarms on 127.0.0.1: two nodes train a tiny GPT-2 with a tokenizer of their own
(evaluation in `run status`, the result exported as torch, safetensors and a from_pretrained directory, the final
checkpoint fetched by a node that never trained the run), and two worker processes train a tiny ViT."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import p2pc_json, run_p2pc, train_tokenizer, wait_for_evals, wait_until
from p2pcompute.devtools.peers import TrainerWorker
from p2pcompute.runs.datasets import default_stdlib_dir, stdlib_files
from p2pcompute.runs.manifest import LOCAL_NETWORK_AVERAGING, Manifest, toml_lines

EPOCHS = 3
START_TIMEOUT = 120.0  # seconds for a worker process to come up (cold imports of torch, hivemind, transformers)
RUN_TIMEOUT = 400.0  # seconds for the run to finish on a loaded 2-core box (two cold node starts, 4 short epochs)


def hf_spec(name: str, model: str, dataset: str, batch: int, target: int, lr: str = "0.003",
            averaging: dict | None = None) -> str:
    """A run of EPOCHS epochs, evaluated every epoch, averaging tuned for one machine (plus `averaging`)."""
    return (f'name = "{name}"\nbatch_size_per_step = {batch}\ntarget_batch_size = {target}\nmax_epochs = {EPOCHS}\n'
            f"\n[model]\n{model}\n\n[dataset]\n{dataset}\n\n[optimizer]\nname = \"adam\"\nlr = \"{lr}\"\n"
            f"\n[averaging]\n{toml_lines({**LOCAL_NETWORK_AVERAGING, **(averaging or {})})}\n[eval]\nevery = 1\nsamples = 64\n")


@pytest.mark.timeout(900)
def test_two_nodes_train_a_tiny_gpt2_and_export_it(own_swarm, tmp_path):
    from safetensors.torch import load_file
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from p2pcompute.training.checkpoint import load_checkpoint

    texts = [path.read_text() for _, path in stdlib_files(default_stdlib_dir(), ("json",))]
    sha256 = train_tokenizer(texts, tmp_path / "tokenizer.json", vocab_size=320)
    spec_text = hf_spec(
        "gpt2-e2e",
        'name = "hf"\ntask = "causal-lm"\n'
        'config = { model_type = "gpt2", vocab_size = 320, n_positions = 32, n_embd = 32, n_layer = 2, n_head = 2 }\n'
        f'tokenizer = "{sha256}"',
        'name = "pystdlib"\nseq_len = 32\npackages = ["json"]', batch=8, target=64)
    spec = tmp_path / "gpt2.toml"
    spec.write_text(spec_text)
    bootstrap = own_swarm.start_bootstrap()  # never trains: it fetches the final checkpoint from the others below
    a, b = (own_swarm.start_node(n, "--min-peers", "2") for n in ("a", "b"))
    # b has no tokenizer: it fetches it from a (tests/test_researcher_run.py checks that in detail)
    missing = run_p2pc("run", "publish", str(spec), "--force", "--data-dir", str(a.data_dir), timeout=180)
    assert missing.returncode == 9 and "is not on this node" in missing.stderr, missing.stderr  # names, not holds it
    run_id = p2pc_json("run", "publish", str(spec), "--force", "--artifact", str(tmp_path / "tokenizer.json"),
                       "--data-dir", str(a.data_dir), timeout=180)["run_id"]

    status = wait_for_evals(run_id, b.data_dir, EPOCHS, RUN_TIMEOUT)
    evals = status["evals"]
    assert [e["epoch"] for e in evals] == list(range(EPOCHS + 1)), evals
    assert all(e["eval_loss"] is not None and e["perplexity"] is not None for e in evals), evals
    assert evals[0]["train_loss"] is None and all(e["train_loss"] is not None for e in evals[1:]), evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["peers"] == 2, evals  # it learned
    text = run_p2pc("run", "status", run_id, "--data-dir", str(a.data_dir), check=True).stdout
    assert "eval loss" in text and "perplexity" in text

    manifest = Manifest.from_toml(spec_text).with_default_issuer(a.peer_id)  # as a published it

    def kept_by_both():  # each node keeps its final checkpoint when its trainer stops
        return all(list((n.data_dir / "checkpoints" / "final").glob("*.meta")) for n in (a, b))

    wait_until(kept_by_both, 120, interval=1, what="both nodes to keep the final checkpoint")
    hf_dir = tmp_path / "gpt2-hf"
    report = p2pc_json("run", "checkpoint", run_id, "--format", "hf", "-o", str(hf_dir), "--data-dir",
                       str(a.data_dir), timeout=180)
    assert report["epoch"] == EPOCHS and report["tokenizer"] == "tokenizer.json", report
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompt = torch.tensor([tokenizer("def ")["input_ids"]])
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > prompt.shape[1] and isinstance(tokenizer.decode(generated[0]), str)

    # a node that never trained the run: it downloads a final checkpoint kept by a or b (hash and shapes checked)
    out = tmp_path / "model.safetensors"
    report = p2pc_json("run", "checkpoint", run_id, "--format", "safetensors", "-o", str(out), "--data-dir",
                       str(bootstrap.data_dir), timeout=180)
    assert report["epoch"] == EPOCHS and report["source"].startswith("the final checkpoint kept by"), report
    state = load_file(out)
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight)  # the same final parameters
    # and it keeps it now, serving it in turn
    again = p2pc_json("run", "checkpoint", run_id, "-o", str(tmp_path / "model.pt"), "--data-dir",
                      str(bootstrap.data_dir), timeout=180)
    assert again["source"] == "this node's kept final checkpoint", again
    restored, epoch = load_checkpoint(tmp_path / "model.pt", manifest)
    assert epoch == EPOCHS and torch.equal(restored.lm_head.weight, model.lm_head.weight)
    zoo_only = run_p2pc("run", "checkpoint", run_id, "--format", "hf", "-o", str(tmp_path / "model.pt"),
                        "--data-dir", str(bootstrap.data_dir), timeout=180)
    assert zoo_only.returncode == 2 and "is a file; --format hf writes a directory" in zoo_only.stderr


# Epochs of the tiny-ViT run. Its labels come from a teacher with one hidden unit (`teacher_hidden = 1`): the
# default teacher (32 hidden units over the 64 pixels) is a function this ViT learns too slowly to tell from noise
# in a test's budget. Measured in a plain single-process loop (Adam 0.003, batch 32, 64 eval samples): the default
# teacher went 1.111 -> 1.099 in 64 steps (chance is 1.0986) and the swarm's 8 epochs ended at 1.131 in a CI
# emulation; the one-unit teacher went 1.164 -> 0.703 in 16 steps.
VIT_EPOCHS = 8


@pytest.mark.timeout(600)
def test_two_workers_train_a_tiny_vit(tmp_path):
    spec = tmp_path / "vit.toml"
    spec.write_text(hf_spec(
        "vit-e2e",
        'name = "hf"\ntask = "image-classification"\n'
        'config = { model_type = "vit", image_size = 8, patch_size = 4, num_channels = 1, hidden_size = 32, '
        'num_hidden_layers = 2, num_attention_heads = 2, intermediate_size = 64, num_labels = 3 }',
        'name = "synthetic"\ntask = "classification"\ninput_shape = [1, 8, 8]\noutputs = 3\nseed = 5\nnoise = 0\n'
            'teacher_hidden = 1',
        # local mode (DiLoCo) with plain averaging as the outer step: every batch is an Adam step, so VIT_EPOCHS
        # epochs are ~4 x VIT_EPOCHS steps per peer (gradients mode would take VIT_EPOCHS), and the group ends each
        # epoch identical
        batch=32, target=256, lr="0.003", averaging={"mode": "local", "outer_lr": "1", "outer_momentum": "0"}))
    common = ["--max-epochs", str(VIT_EPOCHS), "--min-peers", "2"]
    workers = []
    try:
        workers.append(TrainerWorker(tmp_path, "a", spec, common).start(wait=False))
        bootstrap = workers[0].wait_ready(START_TIMEOUT)[0]
        workers.append(TrainerWorker(tmp_path, "b", spec, [*common, "--initial-peers", bootstrap]).start(wait=False))
        for worker in workers:
            code = worker.wait(RUN_TIMEOUT)
            assert code == 0, worker.log_tail()
    finally:
        for worker in workers:
            worker.kill()
    for worker in workers:
        status = worker.status()
        assert status["status"] == "finished" and status["epoch"] == VIT_EPOCHS, status
        evals = status["evals"]
        assert [e["epoch"] for e in evals] == list(range(VIT_EPOCHS + 1)), evals  # the initial model's, then each epoch's
        assert all(0 <= e["accuracy_micro"] <= 1_000_000 for e in evals)
        assert evals[-1]["eval_loss_micro"] < evals[0]["eval_loss_micro"], evals  # it learned
    # a blocking outer step leaves both peers with the same parameters: the same held-out loss
    a, b = (w.status()["evals"][-1]["eval_loss_micro"] for w in workers)
    assert abs(a - b) <= max(a, b) * 0.05, (a, b)


def test_examples_name_hf_models_that_validate():
    examples = Path(__file__).resolve().parent.parent / "docs" / "examples"
    gpt2, vit = Manifest.load(examples / "gpt2-tiny.toml"), Manifest.load(examples / "vit-synthetic.toml")
    assert gpt2.model["task"] == "causal-lm" and gpt2.eval is not None and gpt2.parameter_count < 2_000_000
    assert vit.model["task"] == "image-classification" and vit.data_shape.outputs == 10
    images = Manifest.load(examples / "vit-images.toml")  # a published image folder (its id to fill in)
    assert images.dataset.name == "p2p" and images.data_shape.input_shape == (3, 32, 32)
