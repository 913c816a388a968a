#!/usr/bin/env python
"""Trainer benchmark: the node's Trainer on a peer-to-peer dataset vs a plain PyTorch loop on the same HF model and batch.

One run, side by side in this process (each on a training thread of its own, torch on one thread):
  - a publisher (a data-only peer: DHT, /p2pc/shards/1, provider records) holds a parquet text dataset (the Python
    stdlib's sources in rows) cut into shards, and a tokenizer.json trained here;
  - a volunteer peer that holds nothing runs the node's Trainer (p2pcompute.training.trainer, gradients mode, alone)
    on a tiny GPT-2 (transformers, from its config) for --seconds: it fetches the tokenizer and its shards from the
    publisher, tokenizes them on its loader threads and trains;
  - the reference: a plain loop (forward, cross-entropy, backward, Adam step) on the same model, batch size and
    sequence length, batches cut from the same tokens held in memory, for the same time, before and after ours.
Printed: samples/s of each and their ratio (goal >= 0.95), the share of the measured time the training thread waited
for data (goal < 2%; the first shard's cold fetch before any step is printed apart), the time one batch takes to assemble on the training thread, and bytes the volunteer fetched vs
the files its assignment needs (goal: no more than its epochs' shards + one prefetch window + eval shard).

Usage: python scripts/bench_trainer.py [--seconds 40] [--batch 16] [--seq-len 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")
os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
# one intra-op thread in every thread (torch reads it at import; torch.set_num_threads only sets the calling thread's):
# on 2 shared cores two threads contend with other load and made one phase 15x slower than the next
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pcompute.retry import poll_until  # noqa: E402

START_TIMEOUT = 300.0  # seconds for the trainer to start (shards fetched, transformers imported) on a loaded box
WARMUP_SECONDS = 5.0  # trainer steps not measured: the first epoch's fetch, allocations, hivemind's first report
SHUTDOWN_TIMEOUT = 60.0
EPOCH_STEPS = 20  # steps of a lone peer an epoch: epochs turn over (next shards prefetched) while it is measured
VOCAB = 512
SHARD_ROWS = 40  # rows of 40 source lines: ~10 shards of ~50 kB from the packages below
PACKAGES = ("json", "email", "logging", "http", "collections")
MODEL = 'config = { model_type = "gpt2", vocab_size = %d, n_positions = %d, n_embd = 64, n_layer = 2, n_head = 2 }'


def spec(dataset_id: str, tokenizer: str, batch: int, seq_len: int) -> str:
    return (f'name = "bench-trainer"\nbatch_size_per_step = {batch}\ntarget_batch_size = {batch * EPOCH_STEPS}\n'
            f'max_epochs = 0\n'
            f'\n[model]\nname = "hf"\ntask = "causal-lm"\ntokenizer = "{tokenizer}"\n'
            + MODEL % (VOCAB, seq_len)
            + f'\n\n[dataset]\nname = "p2p"\nid = "{dataset_id}"\ntask = "lm"\nseq_len = {seq_len}\n'
              f'\n[optimizer]\nname = "adam"\nlr = "0.001"\n')


def trainer_run(root: Path, manifest, boot: list[str], seconds: float) -> dict:
    """The node's Trainer on a volunteer peer for `seconds` after warm-up: its samples/s, data wait, bytes fetched."""
    from p2pcompute.devtools.data_peer import DataPeer
    from p2pcompute.identity import Identity
    from p2pcompute.runs.artifacts import ArtifactStore
    from p2pcompute.runs.manifest import sign_manifest
    from p2pcompute.training.trainer import Trainer, TrainerOptions

    with DataPeer(root / "volunteer", boot) as peer:
        identity = Identity.load_or_create(root / "volunteer" / "identity.key")
        source = peer.host.source()
        options = TrainerOptions(device="cpu", shards=source,
                                 artifacts=ArtifactStore.for_data_dir(root / "volunteer", fetch=source.fetch_artifact))
        trainer = Trainer(peer.dht, sign_manifest(manifest, identity), identity, options).start()
        try:
            poll_until(lambda: trainer.status().samples_done > 0, START_TIMEOUT, interval=0.2, what="the first step")
            cold_wait = trainer.dataset.data_wait_seconds  # the first epoch's shards: nothing to train on before
            time.sleep(WARMUP_SECONDS)
            first, waited, started = trainer.status(), trainer.dataset.data_wait_seconds, time.perf_counter()
            time.sleep(seconds)
            last, ended = trainer.status(), time.perf_counter()
            waited = trainer.dataset.data_wait_seconds - waited
        finally:
            trainer.shutdown(SHUTDOWN_TIMEOUT)
        if last.status not in ("training", "stopped"):
            raise SystemExit(f"the trainer {last.status}: {last.reason}")
        stats = peer.host.service.stats
        return {"samples_per_s": (last.samples_done - first.samples_done) / (ended - started),
                "data_wait_share": waited / (ended - started), "cold_wait_s": cold_wait,
                "data_wait_share_since_start": last.data_wait_share, "epoch": last.epoch, "sync_share": last.sync_share,
                "bytes_fetched": stats.bytes_fetched, "files_fetched": stats.files_fetched,
                "peer_id": identity.peer_id.to_bytes()}


def plain_loop(manifest, tokens, batch: int, seq_len: int, seconds: float) -> dict:
    """`_plain_loop` on a thread of its own, like the Trainer's training thread: torch's intra-op thread count is
    per thread (a new thread starts at torch's default), so both run with the same."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(_plain_loop(manifest, tokens, batch, seq_len, seconds)))
    thread.start()
    thread.join()
    return out


def _plain_loop(manifest, tokens, batch: int, seq_len: int, seconds: float) -> dict:
    """The same model, optimizer and batch in a bare loop: windows of the same tokens, no swarm, no data plane."""
    import torch

    from p2pcompute.runs.materialize import run_model
    from p2pcompute.runs.models import loss_function
    from p2pcompute.runs.optimizers import optimizer_factory

    model = run_model(manifest)
    optimizer = optimizer_factory(manifest.optimizer.name, manifest.optimizer.as_dict())(model.parameters())
    loss_fn = loss_function("lm")
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        starts = torch.randint(len(tokens) - seq_len, (batch,), generator=generator).tolist()
        windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts]).long()
        loss = loss_fn(model(windows[:, :-1]), windows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    deadline = time.perf_counter() + WARMUP_SECONDS
    while time.perf_counter() < deadline:
        step()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - started
    return {"samples_per_s": steps * batch / elapsed, "step_ms": elapsed / steps * 1000,
            "torch_threads": torch.get_num_threads()}


def batch_assembly_ms(tokens, batch: int, seq_len: int, repeats: int = 200) -> float:
    """What the training thread does per step to cut a batch out of decoded tokens (ShardedDataset._draw's work)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    started = time.perf_counter()
    for _ in range(repeats):
        starts = torch.randint(len(tokens) - seq_len, (batch,), generator=generator).tolist()
        torch.stack([tokens[s:s + seq_len + 1] for s in starts]).long()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from p2pcompute.devtools.corpora import stdlib_text_rows, train_tokenizer
    from p2pcompute.devtools.data_peer import DataPeer
    from p2pcompute.runs.artifact_cache import ArtifactCache, artifacts_dir
    from p2pcompute.runs.manifest import Manifest
    from p2pcompute.runs.shard_assignment import epoch_shards
    from p2pcompute.runs.shard_writer import publish
    from p2pcompute.runs.tokenizer import TextTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        files, rows = stdlib_text_rows(PACKAGES, 40)
        tokenizer_sha = train_tokenizer(files, root / "tokenizer.json", VOCAB)
        pq.write_table(pa.table({"text": rows}), root / "text.parquet")
        cache = ArtifactCache(artifacts_dir(root / "publisher"))
        dataset = publish([root / "text.parquet"], cache, name="stdlib", shard_rows=SHARD_ROWS)
        cache.put(bytes.fromhex(tokenizer_sha), (root / "tokenizer.json").read_bytes(), pin=True)
        manifest = Manifest.from_toml(spec(dataset.dataset_id.hex(), tokenizer_sha, args.batch, args.seq_len))
        corpus = b"\x00".join(t.encode() for t in rows)
        tokens = TextTokenizer(root / "tokenizer.json").encode_corpus(corpus)

        # the reference before and after ours: other load on the machine changes during a run; both are printed
        before = plain_loop(manifest, tokens, args.batch, args.seq_len, args.seconds)
        with DataPeer(root / "publisher") as publisher:
            boot = publisher.maddrs()
            poll_until(lambda: publisher.providers(dataset.dataset_id), 60, interval=0.5, what="the provider record")
            ours = trainer_run(root, manifest, boot, args.seconds)
        after = plain_loop(manifest, tokens, args.batch, args.seq_len, args.seconds)
        plain = {"samples_per_s": (before["samples_per_s"] + after["samples_per_s"]) / 2,
                 "step_ms": (before["step_ms"] + after["step_ms"]) / 2}
        assembly = batch_assembly_ms(tokens, args.batch, args.seq_len)

        n = len(dataset.shards)
        needed = {0} | {i for e in range(ours["epoch"] + 2) for i in epoch_shards(manifest.run_id, ours["peer_id"], e,
                                                                                   n, 1)}
        needed_bytes = sum(dataset.shards[i].bytes for i in needed) + len(dataset.to_wire()) \
            + (root / "tokenizer.json").stat().st_size
        result = {
            "machine": f"{platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
            "model_parameters": manifest.parameter_count, "batch": args.batch, "seq_len": args.seq_len,
            "seconds": args.seconds, "shards": n, "dataset_bytes": sum(s.bytes for s in dataset.shards),
            "trainer_samples_per_s": round(ours["samples_per_s"], 1), "plain_samples_per_s":
                round(plain["samples_per_s"], 1), "ratio": round(ours["samples_per_s"] / plain["samples_per_s"], 3),
            "plain_before_after": [round(before["samples_per_s"], 1), round(after["samples_per_s"], 1)],
            "torch_threads": before["torch_threads"],
            "data_wait_share": round(ours["data_wait_share"], 4), "sync_share": round(ours["sync_share"], 4),
            "cold_wait_s": round(ours["cold_wait_s"], 2),
            "data_wait_share_since_start": round(ours["data_wait_share_since_start"], 4),
            "plain_step_ms": round(plain["step_ms"], 2), "batch_assembly_ms": round(assembly, 3),
            "epochs": ours["epoch"], "files_fetched": ours["files_fetched"], "bytes_fetched": ours["bytes_fetched"],
            "bytes_needed": needed_bytes, "shards_needed": len(needed),
        }
    print(f"machine: {result['machine']}; GPT-2 {result['model_parameters']:,} parameters, batch {args.batch} x "
          f"{args.seq_len} tokens, {args.seconds:.0f} s each after {WARMUP_SECONDS:.0f} s warm-up, torch on "
          f"{result['torch_threads']} threads in each training thread")
    print(f"samples/s: node trainer {result['trainer_samples_per_s']}, plain loop {result['plain_samples_per_s']} "
          f"(mean of {result['plain_before_after']}, before and after), ratio {result['ratio']} (goal >= 0.95)")
    print(f"data wait: {result['data_wait_share']:.2%} of the measured time (goal < 2%; since the start, with the "
          f"first shard's {result['cold_wait_s']} s cold fetch: {result['data_wait_share_since_start']:.2%}); batch "
          f"assembly on the "
          f"training thread {result['batch_assembly_ms']} ms vs a {result['plain_step_ms']} ms step; swarm optimizer "
          f"step {result['sync_share']:.1%}")
    print(f"fetched: {result['files_fetched']} files, {result['bytes_fetched']:,} bytes in {result['epochs']} epochs; "
          f"its assignment needs {result['bytes_needed']:,} bytes ({result['shards_needed']} of {n} shards with the "
          f"eval shard and the next epoch's, the manifest and the tokenizer)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
