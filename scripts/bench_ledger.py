#!/usr/bin/env python
"""Ledger ingest benchmark: validated, durable ingest rate vs raw Ed25519 verify rate of the same signatures.

Generates a ledger (one publisher, several claimants, receipts with witness signatures), then in one run
measures side by side:
  raw:    `cryptography` Ed25519 verification of every signature the entries carry (entry, claim and
          witness signatures), nothing else;
  ingest: Store.append of the same entries as wire bytes into a fresh SQLite store (WAL, synchronous=FULL),
          in batches: decoding, the pinned Ed25519 rule, chain/receipt validation, index and derived tables,
          fsync per batch;
and prints the ratio ingest/raw (goal: >= 0.8). Repeats interleave the two and keep the best of each, to
damp noise from other processes.

    python scripts/bench_ledger.py --entries 20000 --witnesses 3 --batch 500 --repeat 3
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
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.ledger.codec import KIND_RECEIPT
from p2pcompute.ledger.examples import ChainBuilder, label_key
from p2pcompute.ledger.store import Store


def generate(n_entries: int, n_claimants: int, n_witnesses: int, seed: int) -> tuple[list[bytes], list[tuple]]:
    """Entries as wire bytes (each author's chain in order, authors interleaved) and every (key, message,
    signature) they carry."""
    publisher = label_key(f"bench {seed} publisher")
    claimants = [label_key(f"bench {seed} claimant {i}") for i in range(n_claimants)]
    witnesses = [label_key(f"bench {seed} witness {i}") for i in range(n_witnesses)]
    chains = ChainBuilder()
    run = chains.publish(publisher, b"bench manifest %d" % seed, CreditPolicy.create(1000, n_witnesses), 1_700_000_000_000)
    entries = [run]
    epoch = 0
    while len(entries) < n_entries:
        for claimant in claimants[: n_entries - len(entries)]:
            entries.append(chains.receipt(claimant, run, epoch, 64 + epoch % 7, witnesses, 1_700_000_000_000 + epoch))
        epoch += 1
    signatures = []
    for entry in entries:
        signatures.append((entry.author, entry.signed_message, entry.signature))
        if entry.kind == KIND_RECEIPT:
            receipt = entry.body.receipt
            signatures.append((entry.author, CLAIM_DOMAIN + receipt.claim.wire, receipt.claimant_signature))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--claimants", type=int, default=8)
    parser.add_argument("--witnesses", type=int, default=3, help="witness signatures per receipt (= quorum)")
    parser.add_argument("--batch", type=int, default=500, help="entries per append (one transaction, one fsync)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the fresh store goes")
    args = parser.parse_args()

    t0 = time.perf_counter()
    wires, signatures = generate(args.entries, args.claimants, args.witnesses, seed=1)
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
