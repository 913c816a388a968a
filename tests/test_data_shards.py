"""Peer-to-peer datasets without the network: manifests, publishing (CLI errors too), shard assignment, the cache."""

from __future__ import annotations

import json
import os

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from p2pcompute import crypto
from p2pcompute.cli.main import cli
from p2pcompute.errors import DatasetUnavailable, InvalidManifest, InvalidMessage
from p2pcompute.runs.artifact_cache import ArtifactCache
from p2pcompute.runs.data_manifest import Column, DatasetManifest, Shard
from p2pcompute.runs.datasets import batch_for, eval_batch
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.shard_assignment import epoch_shards
from p2pcompute.runs.shard_writer import publish
from p2pcompute.runs.sharded import ShardedDataset, ShardSource
from p2pcompute.swarm.providers import Holdings

RUN, PEER = b"r" * 32, b"p" * 38


def write_jsonl(path, rows: int) -> None:
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "abc " * (i % 7), "n": i}) + "\n"
                            for i in range(rows)))


def write_images(path, rows: int, seed: int = 0) -> None:
    """rows of 1x4x4 uint8 images (as nested lists, the way datasets store them) and a label in [0, 3)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (rows, 1, 4, 4), dtype=np.uint8)
    pq.write_table(pa.table({"image": pa.array([x.tolist() for x in images], pa.list_(pa.list_(pa.list_(pa.uint8())))),
                             "label": pa.array(rng.integers(0, 3, rows))}), path)


def local_source(cache: ArtifactCache) -> ShardSource:
    """The files a publisher holds itself (nothing to fetch)."""
    def fetch(sha256, **_options):
        path = cache.path(sha256)
        if path is None:
            raise DatasetUnavailable(f"{sha256.hex()[:12]} not held")
        return path

    return ShardSource(fetch, cache)


def image_run_spec(dataset_id: str, in_features: int = 16, model: str = "", shape: str = "[1, 4, 4]",
                   outputs: int = 3, per_epoch: int = 1, optimizer: str = "sgd", lr: str = "0.1") -> str:
    """A run on a published image dataset: an MLP by default, or `model` (the [model] table's lines)."""
    model = model or f'name = "mlp"\nin_features = {in_features}\nhidden = [8]\nout_features = {outputs}'
    return f"""
name = "t"
batch_size_per_step = 4
target_batch_size = 8
[model]
{model}
[dataset]
name = "p2p"
id = "{dataset_id}"
task = "classification"
input_shape = {shape}
outputs = {outputs}
shards_per_epoch = {per_epoch}
[optimizer]
name = "{optimizer}"
lr = "{lr}"
"""


def p2p_config(dataset_id: str, **values) -> dict:
    return Manifest.from_toml(image_run_spec(dataset_id)).dataset.as_dict() | values


# ---- the dataset manifest --------------------------------------------------------------------------


def manifest(**changes) -> DatasetManifest:
    values = dict(name="d", columns=(Column("text", "text"),), shards=(Shard(b"\x01" * 32, 10, 100),))
    return DatasetManifest(**(values | changes))


def test_manifest_round_trip_and_id():
    m = manifest()
    assert DatasetManifest.from_wire(m.to_wire()) == m
    assert m.dataset_id == crypto.sha256(m.to_wire())


@pytest.mark.parametrize("changes, reason", [
    (dict(name="a b"), "dataset name"),
    (dict(columns=()), "columns"),
    (dict(columns=(Column("x", "text"), Column("x", "int"))), "twice"),
    (dict(columns=(Column("x", "struct"),)), "unknown type"),
    (dict(shards=()), "shards"),
    (dict(shards=(Shard(b"\x01" * 31, 1, 1),)), "32 bytes"),
    (dict(shards=(Shard(b"\x01" * 32, 0, 1),)), "rows"),
    (dict(shards=(Shard(b"\x01" * 32, 1, (256 << 20) + 1),)), "bytes"),
])
def test_manifest_refuses_bad_fields(changes, reason):
    with pytest.raises(InvalidMessage, match=reason):
        manifest(**changes)


@pytest.mark.parametrize("wire", [
    msgpack.packb(["p2pc/datasets", 1, "d", [["t", "text"]], [[b"\x01" * 32, 1, 1]]]),  # wrong magic
    msgpack.packb(["p2pc/dataset", 2, "d", [["t", "text"]], [[b"\x01" * 32, 1, 1]]]),  # version
    msgpack.packb(["p2pc/dataset", 1, "d", [["t", "text"]], [[b"\x01" * 32, 1.0, 1]]]),  # a float
    msgpack.packb(["p2pc/dataset", 1, "d", {"t": "text"}, [[b"\x01" * 32, 1, 1]]]),  # a map
    b"\xc4",  # truncated
])
def test_manifest_refuses_bad_bytes(wire):
    with pytest.raises(InvalidMessage):
        DatasetManifest.from_wire(wire)


def test_manifest_refuses_non_canonical_bytes():
    wire = manifest().to_wire()
    longer = wire.replace(b"\xa1d", b"\xd9\x01d", 1)  # the name as str8: same value, another encoding
    assert msgpack.unpackb(longer) == msgpack.unpackb(wire)
    with pytest.raises(InvalidMessage, match="canonical"):
        DatasetManifest.from_wire(longer)


def test_run_manifest_checks_the_p2p_section():
    assert p2p_config("ab" * 32)["shards_per_epoch"] == 1
    with pytest.raises(InvalidManifest, match="dataset.id"):
        p2p_config("AB" * 32)
    with pytest.raises(InvalidManifest, match="in_features"):
        Manifest.from_toml(image_run_spec("ab" * 32, in_features=15))


# ---- assignment --------------------------------------------------------------------------------------


def test_assignment_is_deterministic_covers_every_shard_and_differs_between_peers():
    n, k = 10, 3
    first = [epoch_shards(RUN, PEER, e, n, k) for e in range(20)]
    assert first == [epoch_shards(RUN, PEER, e, n, k) for e in range(20)]
    assert all(len(s) == k and len(set(s)) == k for s in first)
    seen = set()
    for shards in first[:4]:  # 4 epochs of 3 walk through all 10 shards
        seen |= set(shards)
    assert seen == set(range(n))
    other = [epoch_shards(RUN, b"q" * 38, e, n, k) for e in range(20)]
    assert other != first
    assert epoch_shards(RUN, PEER, 5, 2, 8) == (0, 1)  # more per epoch than shards: all of them


def test_a_batch_is_reproducible_from_run_peer_epoch_and_step(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", 300)
    cache = ArtifactCache(tmp_path / "cache")
    m = publish([tmp_path / "t.jsonl"], cache, name="t", shard_rows=40)
    cfg = p2p_config(m.dataset_id.hex(), task="lm", seq_len=12, shards_per_epoch=2)
    a, b = ShardedDataset(cfg, local_source(cache)), ShardedDataset(cfg, local_source(cache))
    try:
        for epoch, step in ((0, 0), (0, 1), (3, 2)):
            xa, ya = batch_for(a, RUN, PEER, epoch, step, 8)
            xb, yb = batch_for(b, RUN, PEER, epoch, step, 8)
            assert xa.equal(xb) and ya.equal(yb) and xa.shape == (8, 12) and xa[:, 1:].equal(ya[:, :-1])
        # the windows come from the epoch's shards only
        wanted = epoch_shards(RUN, PEER, 7, len(m.shards), 2)
        texts = b"\x00".join(r.encode() for i in wanted
                             for r in pq.read_table(cache.path(m.shards[i].sha256)).column("text").to_pylist())
        x, _ = batch_for(a, RUN, PEER, 7, 0, 16)
        assert all(bytes(row.tolist()) in texts for row in x)
    finally:
        a.close()
        b.close()


# ---- publishing ------------------------------------------------------------------------------------------


def test_publish_text_and_images(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 100)
    write_jsonl(tmp_path / "b.jsonl", 50)
    write_images(tmp_path / "img.parquet", 70)
    cache = ArtifactCache(tmp_path / "cache")
    text = publish([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], cache, name="text", shard_rows=40)
    assert [s.rows for s in text.shards] == [40, 40, 40, 30] and text.rows == 150
    assert {c.name: c.type for c in text.columns} == {"text": "text", "n": "int"}
    for shard in text.shards:  # content-addressed and pinned
        assert crypto.sha256(cache.path(shard.sha256).read_bytes()) == shard.sha256
        assert cache.size(shard.sha256) == shard.bytes
    assert cache.pinned() >= {text.dataset_id, *(s.sha256 for s in text.shards)}
    images = publish([tmp_path / "img.parquet"], cache, name="img", shard_mb=0.001)
    assert len(images.shards) > 1 and {c.type for c in images.columns} == {"uint8[]", "int"}
    dataset = ShardedDataset(p2p_config(images.dataset_id.hex()), local_source(cache))
    try:
        x, y = batch_for(dataset, RUN, PEER, 0, 0, 5)
        assert x.shape == (5, 1, 4, 4) and 0 <= float(x.min()) and float(x.max()) <= 1 and y.max() < 3
    finally:
        dataset.close()
    # a run whose columns do not match the dataset is refused with the reason
    with pytest.raises(DatasetUnavailable, match="no column 'pixels'"):
        ShardedDataset(p2p_config(images.dataset_id.hex(), image_column="pixels"), local_source(cache))
    with pytest.raises(DatasetUnavailable, match="column 'n' is int"):
        ShardedDataset(p2p_config(text.dataset_id.hex(), task="lm", text_column="n"), local_source(cache))


def test_publish_cli_errors_are_one_line(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", 20)
    (tmp_path / "nested.jsonl").write_text('{"a": {"b": 1}}\n')
    (tmp_path / "broken.jsonl").write_text('{"a": \n')
    (tmp_path / "data.csv").write_text("a,b\n")
    write_images(tmp_path / "img.parquet", 5)
    data_dir = str(tmp_path / "node")
    cases = [
        (["missing.jsonl"], 2, "No such file"),
        (["data.csv"], 2, "unknown format"),
        (["nested.jsonl"], 2, "column 'a' is struct"),
        (["broken.jsonl"], 6, "not a readable jsonl file"),
        (["ok.jsonl", "img.parquet"], 2, "differ"),
        (["ok.jsonl", "--columns", "nope"], 2, "no column 'nope'"),
        (["ok.jsonl", "--shard-mb", "1000"], 2, "--shard-mb"),
        (["ok.jsonl", "--name", "../x"], 2, "--name"),
    ]
    runner = CliRunner()  # the real command in this process (a subprocess each costs seconds of imports)
    for args, code, message in cases:
        result = runner.invoke(cli, ["data", "publish", *[str(tmp_path / a) if a.endswith(("l", "v", "t")) else a
                                                          for a in args], "--data-dir", data_dir])
        assert result.exit_code == code and message in result.stderr, (args, result.exit_code, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    # nothing half-written: no dataset in the cache after the refusals
    assert json.loads(runner.invoke(cli, ["data", "list", "--data-dir", data_dir, "--json"]).stdout) == []
    result = runner.invoke(cli, ["data", "publish", str(tmp_path / "ok.jsonl"), "--columns", "text",
                                 "--data-dir", data_dir, "--json"])
    report = json.loads(result.stdout)
    assert report["columns"] == {"text": "text"} and report["rows"] == 20 and len(report["dataset_id"]) == 64


# ---- provider records, the cache ---------------------------------------------------------------------------


def test_holdings_bitfield():
    held = Holdings.of(11, {0, 3, 10})
    assert Holdings.from_wire(held.to_wire()) == held
    assert [i for i in range(11) if held.has(i)] == [0, 3, 10] and held.has(None) and held.held() == 3
    with pytest.raises(InvalidMessage, match="beyond the count"):
        Holdings(11, b"\x00\x01")
    with pytest.raises(InvalidMessage, match="bitfield"):
        Holdings(11, b"\x00")


def test_cache_evicts_least_recently_used_never_pinned_or_in_use(tmp_path):
    clock = [1000.0]
    cache = ArtifactCache(tmp_path / "c", cap_bytes=3000, clock=lambda: clock[0])
    files = [os.urandom(1000) for _ in range(5)]
    ids = [crypto.sha256(f) for f in files]

    def put(i, **kw):
        clock[0] += 10
        cache.put(ids[i], files[i], **kw)

    put(0, pin=True)  # published here
    put(1)
    put(2)
    clock[0] += 10
    assert cache.path(ids[1]) is not None  # used again: now newer than 2
    cache.acquire([ids[2]])  # a trainer reads it
    put(3)  # over the cap: 1 is the least recently used that may go (0 pinned, 2 in use)
    assert set(cache.held()) == {ids[0], ids[2], ids[3]}
    cache.release([ids[2]])
    put(4)  # 2 may go now
    assert set(cache.held()) == {ids[0], ids[3], ids[4]}
    with pytest.raises(InvalidMessage, match="do not match"):
        cache.put(ids[1], files[2])
    assert not cache.has(ids[1]) and sorted(p.name for p in cache.directory.iterdir() if p.name.startswith(".")) == []


def test_the_evaluation_batch_is_fixed_and_leaves_the_epoch_alone(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", 300)
    cache = ArtifactCache(tmp_path / "cache")
    m = publish([tmp_path / "t.jsonl"], cache, name="t", shard_rows=40)
    cfg = p2p_config(m.dataset_id.hex(), task="lm", seq_len=12)
    dataset = ShardedDataset(cfg, local_source(cache))
    try:
        first = batch_for(dataset, RUN, PEER, 2, 0, 8)
        x, _ = eval_batch(dataset, RUN, 16)
        texts = pq.read_table(cache.path(m.shards[0].sha256)).column("text").to_pylist()
        assert all(bytes(row.tolist()) in b"\x00".join(t.encode() for t in texts) for row in x)
        assert eval_batch(dataset, RUN, 16)[0].equal(x)
        assert all(a.equal(b) for a, b in zip(batch_for(dataset, RUN, PEER, 2, 0, 8), first))
    finally:
        dataset.close()


def test_shards_a_trainer_reads_are_not_evicted_until_it_closes(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", 300)
    m = publish([tmp_path / "t.jsonl"], ArtifactCache(tmp_path / "pub"), name="t", shard_rows=40)
    fetched = ArtifactCache(tmp_path / "volunteer", cap_bytes=1)  # a volunteer's cache: nothing pinned, tiny cap
    for sha256 in [m.dataset_id, *(s.sha256 for s in m.shards)]:
        fetched.put(sha256, (tmp_path / "pub" / sha256.hex()).read_bytes())
    assert set(fetched.held()) == {m.shards[-1].sha256}  # over the cap and unused: each went when the next came
    for sha256 in [m.dataset_id, *(s.sha256 for s in m.shards)]:
        (tmp_path / "volunteer" / sha256.hex()).write_bytes((tmp_path / "pub" / sha256.hex()).read_bytes())
    dataset = ShardedDataset(p2p_config(m.dataset_id.hex(), task="lm", seq_len=12, shards_per_epoch=2),
                             local_source(fetched))
    try:
        batch_for(dataset, RUN, PEER, 0, 0, 4)
        wanted = set(epoch_shards(RUN, PEER, 0, len(m.shards), 2)) | set(epoch_shards(RUN, PEER, 1, len(m.shards), 2))
        in_use = {m.dataset_id} | {m.shards[i].sha256 for i in wanted}
        fetched.evict()  # the next epoch's shards are held in use from the moment they are scheduled
        assert set(fetched.held()) == in_use
        x1, y1 = batch_for(dataset, RUN, PEER, 1, 0, 4)  # epoch 1 reads the files kept for it
        assert x1.shape == (4, 12) and x1[:, 1:].equal(y1[:, :-1])
    finally:
        dataset.close()
    fetched.evict()
    assert fetched.held() == {}


def test_publish_a_datasets_directory_and_its_arrow_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)], "label": list(range(50))}).save_to_disk(saved)
    cache = ArtifactCache(tmp_path / "cache")
    from_dir = publish([saved], cache, name="saved", shard_rows=20)
    from_arrow = publish(sorted(saved.glob("*.arrow")), cache, name="saved", shard_rows=20)  # the IPC stream inside
    assert from_dir.dataset_id == from_arrow.dataset_id and [s.rows for s in from_dir.shards] == [20, 20, 10]
    assert {c.name: c.type for c in from_dir.columns} == {"text": "text", "label": "int"}


def write_image_folder(root, rows_per_class: int) -> dict:
    """root/bright/*.png (8x8 grey) and root/dark/*.jpg (12x12 RGB, resized when read): class 0 bright, 1 dark."""
    from PIL import Image

    rng = np.random.default_rng(3)
    originals = {}
    for label, (name, low, suffix) in enumerate([("bright", 128, ".png"), ("dark", 0, ".jpg")]):
        (root / name).mkdir(parents=True)
        for i in range(rows_per_class):
            size, mode = ((8, 8), "L") if suffix == ".png" else ((12, 12), "RGB")
            pixels = rng.integers(low, low + 128, (*size, 3) if mode == "RGB" else size, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i:03}{suffix}")
            originals[f"{name}/{i:03}{suffix}"] = pixels
    (root / "bright" / "notes.txt").write_text("not an image: skipped")
    return originals


def test_png_and_jpeg_images_are_published_decoded_and_trained_on(tmp_path):
    from p2pcompute.runs.images import decode_images
    from p2pcompute.runs.materialize import run_dataset, run_model
    from p2pcompute.runs.models import loss_function

    originals = write_image_folder(tmp_path / "folder", 12)
    cache = ArtifactCache(tmp_path / "cache")
    pics = publish([tmp_path / "folder"], cache, name="pics", shard_rows=8)
    assert {c.name: c.type for c in pics.columns} == {"image": "bytes", "label": "int"} and pics.rows == 24
    png = (tmp_path / "folder" / "bright" / "000.png").read_bytes()
    assert np.array_equal(decode_images([png], (1, 8, 8))[0, 0], originals["bright/000.png"])  # lossless, exact
    assert decode_images([png], (3, 4, 4)).shape == (1, 3, 4, 4)  # grey to RGB, resized
    # `datasets`' Image feature ({bytes, path} structs) publishes as the same bytes
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": png, "path": None}], image_type), "label": [0]}),
                   tmp_path / "hf.parquet")
    assert {c.type for c in publish([tmp_path / "hf.parquet"], cache, name="hf").columns} == {"bytes", "int"}

    # the image-classification example's model (a tiny ViT here) trains on them: decoded on the loader threads
    vit = ('name = "hf"\ntask = "image-classification"\nconfig = { model_type = "vit", image_size = 8, patch_size = 4, '
           'num_channels = 1, hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 32, '
           'num_labels = 2 }')
    spec = Manifest.from_toml(image_run_spec(pics.dataset_id.hex(), model=vit, shape="[1, 8, 8]", outputs=2,
                                             per_epoch=2, optimizer="adam", lr="0.01"))
    dataset = run_dataset(spec, shards=local_source(cache))
    try:
        model = run_model(spec)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        loss_fn = loss_function("classification")
        for step in range(40):
            x, y = batch_for(dataset, RUN, PEER, 0, step, 8)
            assert x.shape == (8, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        x, y = batch_for(dataset, RUN, PEER, 1, 0, 32)
        with torch.no_grad():
            accuracy = float((model(x).logits.argmax(1) == y).float().mean())
        assert accuracy >= 0.9, accuracy  # bright vs dark: learnt
    finally:
        dataset.close()

    # untrusted bytes: a file that only looks like a PNG is refused when a volunteer decodes it, naming the row
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    bad = publish([tmp_path / "bad"], cache, name="bad")
    bad_data = ShardedDataset(p2p_config(bad.dataset_id.hex(), input_shape=(1, 8, 8), outputs=1), local_source(cache))
    try:
        with pytest.raises(DatasetUnavailable, match="image 0 cannot be decoded"):
            batch_for(bad_data, RUN, PEER, 0, 0, 1)
    finally:
        bad_data.close()
    (tmp_path / "bad" / "a" / "y.jpg").write_bytes(b"GIF89a")
    with pytest.raises(InvalidMessage, match="not a PNG or JPEG file"):
        publish([tmp_path / "bad"], cache, name="bad")
