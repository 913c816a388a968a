"""The run a researcher wants, end to end on real nodes (127.0.0.1): one node publishes a tiny GPT-2 config, its
tokenizer, its initial weights and a parquet text dataset; two volunteers that never saw any of it fetch them from
peers (a hostile peer's corrupt shards caught, the shards fetched elsewhere), train, evaluate, go on when the
publisher leaves; the result exported as a directory `from_pretrained` loads and generates with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import p2pc_json, train_tokenizer, wait_for_evals, wait_until
from p2pcompute import crypto
from p2pcompute.cli.main import cli
from p2pcompute.devtools.corpora import stdlib_text_rows
from p2pcompute.devtools.data_peer import DataPeer, JunkShards
from p2pcompute.protocol import short_peer
from p2pcompute.runs.manifest import LOCAL_NETWORK_AVERAGING, Manifest, toml_lines

# the volunteers hold all the data by epoch 1-2 (their epoch's shards and the next), the publisher leaves then: 5+
# epochs without it. An epoch is one optimizer step (gradients mode): the target sets the epoch's length, ~1 s here;
# at 64 samples the 5 epochs took ~2 s, and on a slower box they were over before the publisher had left.
EPOCHS = 8
VOCAB = 320
LINES_PER_ROW = 40  # the json package's sources cut into rows of this many lines (~30 rows), in 3 shards
READY_TIMEOUT = 120.0  # seconds for four nodes to come up side by side on a loaded 2-core box
STEP_TIMEOUT = 180.0  # seconds for each stage of the run (trainers starting, shards arriving, the run finishing)


def publish_data(data_dir: Path, source: Path, shard_rows: int) -> dict:
    """`p2pc data publish` (the real command, in this process: a subprocess costs seconds of imports)."""
    result = CliRunner().invoke(cli, ["data", "publish", str(source), "--shard-rows", str(shard_rows), "--name",
                                      "json-sources", "--data-dir", str(data_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def spec_text(dataset_id: str, tokenizer: str, init: str) -> str:
    model = (toml_lines({"name": "hf", "task": "causal-lm", "tokenizer": tokenizer, "init": init})
             + f'config = {{ model_type = "gpt2", vocab_size = {VOCAB}, n_positions = 32, n_embd = 32, n_layer = 2, '
               'n_head = 2 }\n')
    return (toml_lines({"name": "researcher-gpt2", "batch_size_per_step": 8, "target_batch_size": 1024,
                        "max_epochs": EPOCHS})
            + "\n[model]\n" + model
            + "\n[dataset]\n" + toml_lines({"name": "p2p", "id": dataset_id, "task": "lm", "seq_len": 32})
            + "\n[optimizer]\n" + toml_lines({"name": "adam", "lr": "0.03"})
            + "\n[averaging]\n" + toml_lines(LOCAL_NETWORK_AVERAGING)
            + "\n[eval]\n" + toml_lines({"every": 1, "samples": 64}))


def silent_init(spec: str, path: Path) -> str:
    """Initial weights that make the model predict nothing: the run's own initial model with its final layer norm
    zeroed, so every logit is 0 and the initial eval loss is exactly ln(VOCAB) (a model that did not load them
    scores ~0.006 above). Returns their sha256 hex."""
    import torch
    from safetensors.torch import save_model

    from p2pcompute.runs.materialize import run_model

    model = run_model(Manifest.from_toml(spec), with_init=False)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
    save_model(model, str(path))
    return crypto.sha256_file(path)


def node_data(node) -> dict:
    """What the node fetched (and from whom it refused files), as `p2pc node status --json` shows it."""
    return p2pc_json("node", "status", "--data-dir", str(node.data_dir))["data"]


def holds(node, sha256_hex: str) -> bool:
    path = node.data_dir / "artifacts" / sha256_hex
    return path.is_file() and crypto.sha256_file(path) == sha256_hex


@pytest.mark.timeout(600)
def test_volunteers_fetch_a_researchers_model_tokenizer_and_data_and_train_it(own_swarm, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files, rows = stdlib_text_rows(("json",), LINES_PER_ROW)
    tokenizer = train_tokenizer(files, tmp_path / "tokenizer.json", vocab_size=VOCAB)
    pq.write_table(pa.table({"text": rows}), tmp_path / "sources.parquet")
    # the shards first reach a hostile peer only: for a while it is the one provider, so every volunteer asks it
    hostile_dir = tmp_path / "hostile"
    shard_rows = -(-len(rows) // 3)
    dataset = publish_data(hostile_dir, tmp_path / "sources.parquet", shard_rows)
    assert len(dataset["shards"]) == 3, dataset  # shard 0 held out for evaluation, 1 and 2 trained on
    spec = tmp_path / "run.toml"
    spec.write_text(spec_text(dataset["dataset_id"], tokenizer, "0" * 64))
    init = silent_init(spec.read_text(), tmp_path / "init.safetensors")
    spec.write_text(spec_text(dataset["dataset_id"], tokenizer, init))

    boot = own_swarm.start_bootstrap()
    pub = own_swarm.start_node("pub", "--no-train", wait=False)
    a, b = (own_swarm.start_node(n, "--min-peers", "2", wait=False) for n in ("a", "b"))
    for node in (pub, a, b):
        node.wait_ready(READY_TIMEOUT)
    with DataPeer(hostile_dir, [boot.loopback_maddr()]) as hostile:  # goes with the publisher
        junk = JunkShards.replacing(hostile, honest=frozenset({bytes.fromhex(dataset["dataset_id"])}))
        run_id = p2pc_json("run", "publish", str(spec), "--force", "--artifact", str(tmp_path / "tokenizer.json"),
                           "--artifact", str(tmp_path / "init.safetensors"), "--data-dir", str(pub.data_dir),
                           timeout=300)["run_id"]  # the publish check measures the model: slow under load

        # the volunteers fetch the tokenizer and the weights from the publisher, the dataset's manifest from the
        # hostile peer, and its shards from the hostile peer too: corrupt, caught by their hash, the peer banned
        wait_until(lambda: junk.served >= 2, STEP_TIMEOUT, interval=0.5, what="the volunteers to ask the hostile peer")
        wait_until(lambda: all(node_data(n)["bad_providers"] for n in (a, b)), STEP_TIMEOUT, interval=2,
                   what="both volunteers to catch the hostile peer")
        # the publisher's node gets the data (the same dataset id: shards are content-addressed) and serves it
        assert publish_data(pub.data_dir, tmp_path / "sources.parquet", shard_rows)["dataset_id"] == dataset["dataset_id"]
        everything = [dataset["dataset_id"], *(s["sha256"] for s in dataset["shards"])]
        wait_until(lambda: all(holds(n, sha) for n in (a, b) for sha in everything), STEP_TIMEOUT, interval=1,
                   what="both volunteers to hold the whole dataset (eval shard, their epoch's, the next)")
        pub.stop()  # the data outlives its publisher: the run goes on
        hostile_name = short_peer(hostile.peer_id)
    assert not list((a.data_dir / "checkpoints" / "final").glob("*.meta")), "the run ended before the publisher left"

    status = wait_for_evals(run_id, a.data_dir, EPOCHS, STEP_TIMEOUT)
    evals = status["evals"]
    assert [e["epoch"] for e in evals] == list(range(EPOCHS + 1)), evals
    assert abs(evals[0]["eval_loss"] - math.log(VOCAB)) < 1e-4, evals  # both started from the fetched weights
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05, evals  # it learned, most of it without the publisher
    assert all(e["perplexity"] == pytest.approx(math.exp(e["eval_loss"]), rel=1e-3) for e in evals), evals

    needed = sum((tmp_path / "pub" / "artifacts" / sha).stat().st_size for sha in [tokenizer, init, *everything])
    for node in (a, b):  # each fetched what it needs, once (it had none of it); the hostile peer's shards refused
        data = node_data(node)
        assert data["files_fetched"] == 6 and data["bytes_fetched"] == needed, data
        assert all(r.startswith(hostile_name) and "do not hash" in r for r in data["bad_providers"]), data
        assert holds(node, tokenizer) and holds(node, init)

    wait_until(lambda: list((a.data_dir / "checkpoints" / "final").glob("*.meta")), 60, interval=1,
               what="a to keep the final checkpoint")
    out = tmp_path / "gpt2-hf"
    report = p2pc_json("run", "checkpoint", run_id, "--format", "hf", "-o", str(out), "--data-dir", str(a.data_dir),
                       timeout=180)
    assert report["epoch"] == EPOCHS and report["tokenizer"] == "tokenizer.json", report  # the fetched tokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = torch.tensor([hf_tokenizer("def ")["input_ids"]])
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == prompt.shape[1] + 8 and isinstance(hf_tokenizer.decode(generated[0]), str)
