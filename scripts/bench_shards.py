#!/usr/bin/env python
"""Shard fetch benchmark, in one run on 127.0.0.1:
  (a) throughput: a peer fetches files from another over /p2pc/shards/1 (p2pd, TLS, 1 MiB chunks, sha256 checked)
      vs a raw TCP copy of the same bytes between two threads of this process (the floor of any transfer);
  (b) bytes fetched vs needed: a volunteer trains through E epochs of a published text dataset (k shards an
      epoch): bytes it fetched vs the bytes of the shards its assignment named, plus one prefetch window.

Usage: python scripts/bench_shards.py [--mib 64] [--files 8] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")

from p2pcompute import crypto  # noqa: E402
from p2pcompute.devtools.data_peer import DataPeer  # noqa: E402
from p2pcompute.retry import poll_until  # noqa: E402
from p2pcompute.runs.artifact_cache import ArtifactCache, artifacts_dir  # noqa: E402
from p2pcompute.runs.datasets import batch_for  # noqa: E402
from p2pcompute.runs.shard_assignment import epoch_shards  # noqa: E402
from p2pcompute.runs.shard_writer import publish  # noqa: E402
from p2pcompute.runs.sharded import ShardedDataset  # noqa: E402

PROVIDER_TIMEOUT = 60.0
RUN = b"\x01" * 32


def raw_tcp_copy(blobs: list[bytes]) -> float:
    """Seconds to send every blob over one loopback TCP connection and receive it whole."""
    server = socket.create_server(("127.0.0.1", 0))
    total = sum(map(len, blobs))
    received = bytearray()

    def receive():
        conn, _ = server.accept()
        with conn:
            while len(received) < total:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                received.extend(chunk)

    thread = threading.Thread(target=receive)
    thread.start()
    started = time.perf_counter()
    with socket.create_connection(server.getsockname()) as client:
        for blob in blobs:
            client.sendall(blob)
        thread.join()
    elapsed = time.perf_counter() - started
    server.close()
    assert len(received) == total
    return elapsed


def throughput(root: Path, mib: int, files: int) -> dict:
    blobs = [os.urandom(mib * 2**20 // files) for _ in range(files)]
    ids = [crypto.sha256(b) for b in blobs]
    with DataPeer(root / "seed") as seed:
        for sha, blob in zip(ids, blobs):
            seed.host.cache.put(sha, blob)
        seed.host.announce()
        with DataPeer(root / "leech", seed.maddrs()) as leech:
            poll_until(lambda: all(leech.providers(i) for i in ids), PROVIDER_TIMEOUT, what="provider records")
            started = time.perf_counter()
            for sha in ids:
                leech.host.fetch(sha)
            ours = time.perf_counter() - started
    raw = raw_tcp_copy(blobs)
    size = sum(map(len, blobs)) / 2**20
    return {"mib": round(size, 1), "files": files, "ours_mib_s": round(size / ours, 1),
            "raw_tcp_mib_s": round(size / raw, 1), "ratio": round(ours / raw, 1)}


def bytes_vs_needed(root: Path, epochs: int, shards: int = 20, per_epoch: int = 2) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"{i} " + os.urandom(300).hex()}) + "\n" for i in range(shards * 200)))
    manifest = publish([text], ArtifactCache(artifacts_dir(root / "pub")), name="bench", shard_rows=200)
    with DataPeer(root / "pub") as pub, DataPeer(root / "volunteer", pub.maddrs()) as volunteer:
        poll_until(lambda: volunteer.providers(manifest.dataset_id), PROVIDER_TIMEOUT, what="the publisher's record")
        cfg = {"id": manifest.dataset_id.hex(), "task": "lm", "text_column": "text", "seq_len": 64,
               "image_column": "image", "label_column": "label", "input_shape": (1,), "outputs": 2,
               "shards_per_epoch": per_epoch}
        dataset = ShardedDataset(cfg, volunteer.host.source())
        try:
            for epoch in range(epochs):
                for step in range(4):
                    batch_for(dataset, RUN, volunteer.peer_id, epoch, step, 16)
            window = set(epoch_shards(RUN, volunteer.peer_id, epochs, shards, per_epoch))
            needed = set().union(*(epoch_shards(RUN, volunteer.peer_id, e, shards, per_epoch) for e in range(epochs)))
            held = lambda: {i for i, s in enumerate(manifest.shards) if volunteer.host.cache.has(s.sha256)}
            poll_until(lambda: held() >= needed | window, PROVIDER_TIMEOUT, what="the prefetch window")
            waited = dataset.data_wait_seconds
        finally:
            dataset.close()
        fetched = volunteer.host.service.stats.bytes_fetched - len(manifest.to_wire())
    size = lambda indices: sum(manifest.shards[i].bytes for i in indices)
    return {"epochs": epochs, "shards": shards, "per_epoch": per_epoch, "fetched_bytes": fetched,
            "needed_bytes": size(needed), "needed_plus_window_bytes": size(needed | window),
            "ratio_to_needed_plus_window": round(fetched / size(needed | window), 3),
            "data_wait_s": round(waited, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a = throughput(Path(tmp) / "a", args.mib, args.files)
        print(f"(a) fetch {a['mib']} MiB in {a['files']} files: /p2pc/shards/1 {a['ours_mib_s']} MiB/s, raw TCP "
              f"{a['raw_tcp_mib_s']} MiB/s: raw TCP is {a['ratio']}x faster")
        b = bytes_vs_needed(Path(tmp) / "b", args.epochs)
        print(f"(b) {b['epochs']} epochs x {b['per_epoch']} of {b['shards']} shards: fetched {b['fetched_bytes']} B, "
              f"assignment {b['needed_bytes']} B, + one prefetch window {b['needed_plus_window_bytes']} B "
              f"(ratio {b['ratio_to_needed_plus_window']}); training thread waited {b['data_wait_s']} s for data")


if __name__ == "__main__":
    main()
