#!/usr/bin/env python
"""Ledger ingest benchmark: validated, durable ingest rate vs raw Ed25519 verify rate of the same signatures.

Generates a ledger (one run, paid by its publisher (or by --issuers keys taking turns by epoch) to several
claimants: payouts carrying the claimant's signed claim and witness signatures), then in one run measures
side by side:
  raw:    `cryptography` Ed25519 verification of every signature the entries carry (entry, claim and
          witness signatures), nothing else;
  ingest: Store.append of the same entries as wire bytes into a fresh SQLite store (WAL, synchronous=FULL),
          in batches: decoding, the pinned Ed25519 rule, chain/payout validation, index and derived tables,
          fsync per batch;
and prints the ratio ingest/raw (goal: >= 0.8). Repeats interleave the two and keep the best of each, to
damp noise from other processes.

Sync part: for each ledger size and difference d, replica B (a copy of A minus d entries) reconciles once
with A over two real p2pd hosts on 127.0.0.1; prints time, bytes each way and round trips, next to the bytes
of the smallest naive exchange (every id once).

    python scripts/bench_ledger.py --part ingest --entries 20000 --witnesses 3 --batch 500 --repeat 3 [--issuers 8]
    python scripts/bench_ledger.py --part sync --sync-sizes 10000 100000 1000000 --sync-diffs 0 10 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console
from rich.table import Table

from p2pcompute.credits.claims import CLAIM_DOMAIN, WITNESS_DOMAIN
from p2pcompute.ledger.codec import KIND_PAYOUT
from p2pcompute.ledger.examples import ChainBuilder, example_manifest, label_key
from p2pcompute.ledger.store import Store

# Samples per payout are 64..70: an epoch cap of 192 per claimant (128 x 1.5) never binds.
TARGET_BATCH_PER_CLAIMANT = 128


def generate(n_entries: int, n_claimants: int, n_witnesses: int, seed: int,
             n_issuers: int = 1) -> tuple[list[bytes], list[tuple]]:
    """Entries as wire bytes (the run's publication, then the issuers' payouts: each epoch pays every claimant,
    epoch e paid by issuers[e % n_issuers], so with several issuers their chains interleave) and every
    (key, message, signature) they carry."""
    publisher = label_key(f"bench {seed} publisher")
    issuers = [publisher] + [label_key(f"bench {seed} issuer {i}") for i in range(1, n_issuers)]
    claimants = [label_key(f"bench {seed} claimant {i}") for i in range(n_claimants)]
    witnesses = [label_key(f"bench {seed} witness {i}") for i in range(n_witnesses)]
    chains = ChainBuilder()
    manifest = example_manifest(f"bench-{seed}", rate=1000, quorum=n_witnesses, issuers=issuers,
                                target_batch_size=TARGET_BATCH_PER_CLAIMANT * n_claimants)
    run = chains.publish(publisher, manifest, 1_700_000_000_000)
    by_key = {k.public_key: k for k in issuers}
    entries = [run]
    epoch = 0
    while len(entries) < n_entries:
        issuer = by_key[run.body.policy.issuer_for(epoch)]
        for claimant in claimants[: n_entries - len(entries)]:
            entries.append(chains.payout(issuer, claimant, run, epoch, 64 + epoch % 7, witnesses,
                                         1_700_000_000_000 + epoch))
        epoch += 1
    signatures = []
    for entry in entries:
        signatures.append((entry.author, entry.signed_message, entry.signature))
        if entry.kind == KIND_PAYOUT:
            receipt = entry.body.receipt
            signatures.append((receipt.claim.peer, CLAIM_DOMAIN + receipt.claim.wire, receipt.claimant_signature))
            signatures.extend((w.witness, WITNESS_DOMAIN + receipt.claim.wire, w.signature) for w in receipt.witnesses)
    return [e.wire for e in entries], signatures


def time_raw_verify(signatures: list[tuple]) -> float:
    start = time.perf_counter()
    for public_key, message, signature in signatures:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    return time.perf_counter() - start


def time_ingest(wires: list[bytes], batch: int, directory: Path) -> float:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        with Store(Path(tmp) / "bench.sqlite") as store:
            start = time.perf_counter()
            for i in range(0, len(wires), batch):
                result = store.append(wires[i : i + batch])
                if len(result.added) != len(wires[i : i + batch]):
                    raise SystemExit(f"ingest did not store every entry of batch {i // batch}: {result}")
            elapsed = time.perf_counter() - start
            problems = store.check_derived()
            if problems:
                raise SystemExit(f"derived tables disagree after ingest: {problems[:3]}")
    return elapsed


# ---- sync: two real libp2p hosts on 127.0.0.1, replicas that differ by d entries -----------------------


def publish_entries(n: int, seed: str, authors: int = 1000) -> list[bytes]:
    """n valid entries (run publications, one signature each) from `authors` authors, chains in order. Anyone
    may publish any manifest, so the authors' k-th entries share one manifest (paid by the first author)."""
    keys = [label_key(f"sync {seed} author {i}") for i in range(min(authors, n) or 1)]
    manifests = [example_manifest(f"{seed}-{k}", issuers=[keys[0]]) for k in range(-(-n // len(keys)))]
    chains = ChainBuilder()
    return [chains.publish(keys[i % len(keys)], manifests[i // len(keys)], 1_700_000_000_000 + i).wire
            for i in range(n)]


def build_store(path: Path, wires: list[bytes], batch: int = 5000) -> None:
    with Store(path, durable=False) as store:
        for i in range(0, len(wires), batch):
            store.append(wires[i : i + batch])


def copy_store(src: Path, dst: Path) -> None:
    import shutil
    import sqlite3

    conn = sqlite3.connect(src)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    shutil.copyfile(src, dst)


async def measure_sync(a_path: Path, b_path: Path) -> dict:
    """B reconciles with A once over real p2pd hosts; returns seconds, bytes both ways, entries moved."""
    from hivemind.p2p import P2P

    from p2pcompute.ledger.replica import Replica
    from p2pcompute.services.sync import LedgerSync

    kwargs = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, auto_nat=False, nat_port_map=False)
    p2p_a = await P2P.create(**kwargs)
    p2p_b = await P2P.create(initial_peers=[str(m) for m in await p2p_a.get_visible_maddrs()], **kwargs)
    store_a, store_b = Store(a_path), Store(b_path)
    try:
        t_index = time.perf_counter()
        replica_a, replica_b = Replica(store_a), Replica(store_b)
        index_s = (time.perf_counter() - t_index) / 2
        sync_a = LedgerSync(p2p_a, replica_a, sync_interval=0)
        sync_b = LedgerSync(p2p_b, replica_b, sync_interval=0)
        await sync_a.start()
        await sync_b.start()
        start = time.perf_counter()
        diff = await sync_b.sync_with(p2p_a.peer_id)
        elapsed = time.perf_counter() - start
        if store_a.count() != store_b.count():
            raise SystemExit(f"replicas differ after sync: {store_a.count()} vs {store_b.count()}")
        await sync_a.shutdown()
        await sync_b.shutdown()
        return {"seconds": elapsed, "sent": sync_b.stats.bytes_sent, "received": sync_b.stats.bytes_received,
                "moved": len(diff.missing_here), "rounds": diff.rounds, "index_s": index_s}
    finally:
        store_a.close()
        store_b.close()
        await p2p_b.shutdown()
        await p2p_a.shutdown()


def run_sync_bench(sizes: list[int], diffs: list[int], directory: Path, console: Console) -> None:
    import asyncio

    table = Table(title="Ledger sync: replica B reconciles with A once (real p2pd hosts on 127.0.0.1)")
    for column in ("ledger size", "difference", "sync s", "bytes B->A", "bytes A->B", "round trips",
                   "naive id list bytes", "ours / naive", "index build s"):
        table.add_column(column, justify="right")
    for size in sizes:
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            base = tmp / "base.sqlite"
            build_store(base, publish_entries(size, f"base{size}"))
            console.print(f"built a {size}-entry replica in {time.perf_counter() - t0:.0f} s")
            for d in diffs:
                a, b = tmp / f"a{d}.sqlite", tmp / f"b{d}.sqlite"
                copy_store(base, a)
                copy_store(base, b)
                if d:
                    build_store(a, publish_entries(d, f"extra{size}-{d}", authors=max(1, d // 10)))
                r = asyncio.run(measure_sync(a, b))
                naive = 32 * (size + d)  # the smallest full-set exchange: every id once
                total = r["sent"] + r["received"]
                table.add_row(f"{size:,}", f"{d:,}", f"{r['seconds']:.3f}", f"{r['sent']:,}", f"{r['received']:,}",
                              str(r["rounds"] + (1 if d else 0)), f"{naive:,}", f"{total / naive:.4f}",
                              f"{r['index_s']:.2f}")
                for path in (a, b):
                    path.unlink()
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--claimants", type=int, default=8)
    parser.add_argument("--witnesses", type=int, default=3, help="witness signatures per payout (= quorum)")
    parser.add_argument("--issuers", type=int, default=1, choices=range(1, 17), metavar="1..16",
                        help="keys paying the run, taking turns by epoch (1: the publisher pays every epoch)")
    parser.add_argument("--batch", type=int, default=500, help="entries per append (one transaction, one fsync)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the fresh store goes")
    parser.add_argument("--part", choices=["ingest", "sync", "all"], default="all")
    parser.add_argument("--sync-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--sync-diffs", type=int, nargs="+", default=[0, 10, 1000])
    args = parser.parse_args()
    if args.part in ("ingest", "all"):
        run_ingest_bench(args)
    if args.part in ("sync", "all"):
        run_sync_bench(args.sync_sizes, args.sync_diffs, args.dir, Console(width=160))


def run_ingest_bench(args) -> None:

    t0 = time.perf_counter()
    wires, signatures = generate(args.entries, args.claimants, args.witnesses, seed=1, n_issuers=args.issuers)
    console = Console()
    console.print(
        f"generated {len(wires)} entries carrying {len(signatures)} signatures "
        f"({sum(map(len, wires)) / len(wires):.0f} bytes/entry) in {time.perf_counter() - t0:.1f} s"
    )
    raw_times, ingest_times = [], []
    for _ in range(args.repeat):
        raw_times.append(time_raw_verify(signatures))
        ingest_times.append(time_ingest(wires, args.batch, args.dir))
    raw, ingest = min(raw_times), min(ingest_times)

    table = Table(title=f"Ledger ingest vs raw Ed25519 verify (best of {args.repeat})")
    for column in ("measure", "seconds", "entries/s", "signatures/s"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    table.add_row("raw verify (cryptography)", f"{raw:.3f}", f"{len(wires) / raw:,.0f}", f"{len(signatures) / raw:,.0f}")
    table.add_row("validated durable ingest", f"{ingest:.3f}", f"{len(wires) / ingest:,.0f}", f"{len(signatures) / ingest:,.0f}")
    table.add_row("ratio ingest / raw", "", f"{raw / ingest:.2f}x", "")
    console.print(table)


if __name__ == "__main__":
    main()
