"""Peer-to-peer datasets on real peers (127.0.0.1): a node serves what `p2pc data publish` wrote, volunteers fetch only
their shards and verify them, a provider of corrupt bytes is banned, the data outlives its publisher, a run trains on it."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from conftest import p2pc_json, wait_until
from p2pcompute import crypto
from p2pcompute.cli.main import cli
from p2pcompute.devtools.data_peer import DataPeer, JunkShards
from p2pcompute.runs.datasets import batch_for
from p2pcompute.runs.manifest import LOCAL_NETWORK_AVERAGING, Manifest, toml_lines
from p2pcompute.runs.models import build_model
from p2pcompute.runs.shard_assignment import epoch_shards
from p2pcompute.runs.sharded import ShardedDataset
from p2pcompute.training.checkpoint import checkpoint_name, load_checkpoint

RUN = b"\x07" * 32
PROVIDER_TIMEOUT = 60.0  # seconds for a provider record to be visible (refreshed every TTL/3 = 2 s in tests)


def publish(data_dir, *args: str) -> dict:
    """`p2pc data publish ... --json`, run in this process (the real command; a subprocess costs seconds of imports)."""
    result = CliRunner().invoke(cli, ["data", "publish", *map(str, args), "--data-dir", str(data_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def write_text(path, rows: int) -> None:
    path.write_text("".join(json.dumps({"text": f"row {i}: the quick brown fox {i * 7 % 13} jumps"}) + "\n"
                            for i in range(rows)))


def write_images(path, rows: int) -> None:
    """1x4x4 uint8 images labelled by a fixed rule a small MLP learns fast (which third of the image is brightest)."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (rows, 1, 4, 4), dtype=np.uint8)
    flat = images.reshape(rows, 16).astype(np.int64)
    labels = np.stack([flat[:, :5].sum(1) / 5, flat[:, 5:10].sum(1) / 5, flat[:, 10:].sum(1) / 6]).argmax(0)
    pq.write_table(pa.table({"image": pa.array([x.tolist() for x in images], pa.list_(pa.list_(pa.list_(pa.uint8())))),
                             "label": pa.array(labels)}), path)


def lm_config(dataset_id: str, per_epoch: int) -> dict:
    return {"id": dataset_id, "task": "lm", "text_column": "text", "seq_len": 16, "image_column": "image",
            "label_column": "label", "input_shape": (1,), "outputs": 2, "shards_per_epoch": per_epoch}


def image_config(dataset_id: str) -> dict:
    return {"id": dataset_id, "task": "classification", "text_column": "text", "seq_len": 16, "image_column": "image",
            "label_column": "label", "input_shape": (1, 4, 4), "outputs": 3, "shards_per_epoch": 1}


def wait_for_providers(peer: DataPeer, dataset_id: bytes, count: int = 1) -> None:
    wait_until(lambda: len(peer.providers(dataset_id)) >= count, PROVIDER_TIMEOUT, interval=0.5,
               what=f"{count} providers of {dataset_id.hex()[:12]}")


def assert_verified(peer: DataPeer, shards: list[dict]) -> None:
    for shard in shards:
        path = peer.host.cache.path(bytes.fromhex(shard["sha256"]))
        assert path is not None and crypto.sha256(path.read_bytes()).hex() == shard["sha256"]


def fetch_from_hostile(fetcher: DataPeer, junk: JunkShards, dataset: dict, mode: str, index: int, reason: str) -> None:
    """`fetcher` asks the hostile peer first for shard `index` of `dataset`: it gets the shard elsewhere,
    verified, and bans the hostile peer for `reason`."""
    junk.mode, served = mode, junk.served
    shard = dataset["shards"][index]
    fetcher.host.fetch(bytes.fromhex(shard["sha256"]), collection=bytes.fromhex(dataset["dataset_id"]), index=index,
                       size=shard["bytes"], prefer=[junk.p2p.peer_id.to_bytes()])
    assert_verified(fetcher, [shard])
    assert junk.served == served + 1 and fetcher.host.service.limits.banned(junk.p2p.peer_id.to_bytes())
    assert reason in fetcher.host.service.stats.bad_providers[-1], fetcher.host.service.stats.bad_providers


def test_volunteers_fetch_their_shards_and_the_data_outlives_its_publisher(own_swarm, tmp_path):
    write_text(tmp_path / "text.jsonl", 600)
    write_images(tmp_path / "images.parquet", 90)
    text = publish(tmp_path / "pub", tmp_path / "text.jsonl", "--shard-rows", "100", "--name", "text")
    images = publish(tmp_path / "pub", tmp_path / "images.parquet", "--shard-rows", "30", "--name", "images")
    text_id = bytes.fromhex(text["dataset_id"])
    assert len(text["shards"]) == 6 and len(images["shards"]) == 3
    boot = own_swarm.start_bootstrap().loopback_maddr()
    publisher = own_swarm.start_node("pub", "--no-train")
    with contextlib.ExitStack() as stack:
        a, b, hostile = (stack.enter_context(DataPeer(tmp_path / name, [boot])) for name in ("a", "b", "hostile"))

        # a volunteer fetches the shards of its epoch and prefetches the next epoch's; nothing else
        wait_for_providers(a, text_id)
        dataset = ShardedDataset(lm_config(text["dataset_id"], 2), a.host.source())
        stack.callback(dataset.close)
        x, y = batch_for(dataset, RUN, a.peer_id, 0, 0, 8)
        assert x.shape == (8, 16) and x[:, 1:].equal(y[:, :-1])
        needed = set(epoch_shards(RUN, a.peer_id, 0, 6, 2)) | set(epoch_shards(RUN, a.peer_id, 1, 6, 2))
        wanted = {text_id} | {bytes.fromhex(text["shards"][i]["sha256"]) for i in needed}
        wait_until(lambda: set(a.host.cache.held()) >= wanted, 60, what="the epoch's and the next epoch's shards")
        assert set(a.host.cache.held()) == wanted  # only its own assignment (4 of 6 shards) came
        assert_verified(a, [text["shards"][i] for i in needed])

        # images with labels: another volunteer
        images_data = ShardedDataset(image_config(images["dataset_id"]), b.host.source())
        stack.callback(images_data.close)
        x, y = batch_for(images_data, RUN, b.peer_id, 0, 0, 8)
        assert x.shape == (8, 1, 4, 4) and int(y.max()) < 3 and float(x.max()) <= 1.0

        # a hostile provider: holds the real files, announces them like any holder, serves junk
        for name in [text["dataset_id"], *(shard["sha256"] for shard in text["shards"])]:
            shutil.copy(tmp_path / "pub" / "artifacts" / name, tmp_path / "hostile" / "artifacts")
        junk = JunkShards.replacing(hostile)
        hostile.host.announce()
        wait_for_providers(b, text_id, count=3)  # publisher, a, hostile
        fetch_from_hostile(b, junk, text, "hash", 0, "do not hash")
        missing = min(set(range(6)) - needed)  # a shard a does not hold yet
        fetch_from_hostile(a, junk, text, "size", missing, "says the file has")

        # a holds every shard; the publisher goes; a newcomer still gets everything (from a; never the hostile)
        for i, shard in enumerate(text["shards"]):
            a.host.fetch(bytes.fromhex(shard["sha256"]), collection=text_id, index=i, size=shard["bytes"])
        a.host.announce()
        publisher.stop()
        with DataPeer(tmp_path / "late", [a.maddrs()[0]]) as late:
            wait_for_providers(late, text_id)
            fetch_from_hostile(late, junk, text, "malformed", 0, "not [size, bytes]")
            late_data = ShardedDataset(lm_config(text["dataset_id"], 6), late.host.source())
            try:
                x, _ = batch_for(late_data, RUN, late.peer_id, 0, 0, 4)  # all six shards in its first epoch
            finally:
                late_data.close()
            assert x.shape == (4, 16)
            assert_verified(late, text["shards"])
            assert late.host.service.stats.files_fetched == 7  # the manifest and six shards


def p2p_image_spec(dataset_id: str) -> str:
    # target = 4 local steps of 16 on 2 peers: one optimizer step an epoch, 12 in all (enough to learn the rule)
    return toml_lines({"name": "p2p-images", "batch_size_per_step": 16, "target_batch_size": 64, "max_epochs": 12}) + (
        "\n[model]\n" + toml_lines({"name": "mlp", "in_features": 16, "hidden": [32], "out_features": 3})
        + "\n[dataset]\n" + toml_lines({"name": "p2p", "id": dataset_id, "task": "classification",
                                        "input_shape": [1, 4, 4], "outputs": 3})
        + "\n[optimizer]\n" + toml_lines({"name": "adam", "lr": "0.03"})
        + "\n[averaging]\n" + toml_lines({"mode": "gradients", **LOCAL_NETWORK_AVERAGING}))


@pytest.mark.timeout(600)
def test_a_run_trains_on_a_dataset_only_its_publisher_had_and_goes_on_without_it(own_swarm, tmp_path):
    write_images(tmp_path / "images.parquet", 2000)
    images = publish(tmp_path / "pub", tmp_path / "images.parquet", "--shard-rows", "500")
    spec = tmp_path / "run.toml"
    spec.write_text(p2p_image_spec(images["dataset_id"]))
    own_swarm.start_bootstrap()
    nodes = [own_swarm.start_node(name, "--min-peers", "2") for name in ("pub", "volunteer")]
    run_id = p2pc_json("run", "publish", str(spec), "--force", "--data-dir", str(nodes[0].data_dir),
                       timeout=120)["run_id"]

    manifest = Manifest.from_toml(spec.read_text()).with_default_issuer(nodes[0].peer_id)  # as published
    final = [n.data_dir / "checkpoints" / checkpoint_name(manifest, 12) for n in nodes]  # kept when a run ends
    # the volunteer walks through all 4 shards in its first epochs (one an epoch, the next one prefetched),
    # fetched from the publisher, the only peer that has them; then the publisher goes and the run goes on
    shard_files = [nodes[1].data_dir / "artifacts" / s["sha256"] for s in images["shards"]]
    wait_until(lambda: all(f.exists() for f in shard_files), timeout=300, interval=0.5, what="the volunteer's shards")
    assert not final[0].exists(), "the run ended before the publisher could leave: make it longer"
    nodes[0].stop()
    wait_until(final[1].exists, timeout=300, interval=1, what="the run to finish on the volunteer")
    assert not final[0].exists()  # the publisher left before the end
    # the volunteer trained on shards it fetched (it had none), and the run learned: the final model beats the
    # initial one on the whole dataset
    held = p2pc_json("data", "list", "--data-dir", str(nodes[1].data_dir))
    assert [d["dataset_id"] for d in held] == [images["dataset_id"]] and held[0]["shards_held"] == 4
    assert not held[0]["published_here"]
    out = tmp_path / "model.pt"
    assert p2pc_json("run", "checkpoint", run_id, "-o", str(out), "--data-dir", str(nodes[1].data_dir))["epoch"] == 12
    model, epoch = load_checkpoint(out, manifest)
    initial = build_model("mlp", manifest.model.as_dict(), manifest.init_seed)
    table = pq.read_table(tmp_path / "images.parquet")
    x = torch.tensor(np.array(table.column("image").to_pylist(), dtype=np.float32) / 255)
    y = torch.tensor(table.column("label").to_numpy())
    with torch.no_grad():
        before, after = (float(torch.nn.functional.cross_entropy(m(x), y)) for m in (initial, model))
        accuracy = float((model(x).argmax(1) == y).float().mean())
    # The loss must fall. How far depends on the swarm: when the volunteer's first round races the publisher's
    # (issue 14, open: the two then sit in different rounds, gradients vs state, for most of the run) the 12 steps
    # barely help: CI, 2026-12-02: 1.111 -> 1.043, accuracy 0.39 (2 of 5 runs); otherwise < 0.85x and > 0.5.
    print(f"loss {before:.4f} -> {after:.4f} ({after / before:.2f}x), accuracy {accuracy:.2f}")
    assert epoch == 12 and after < before, (before, after, accuracy)
