#!/usr/bin/env python
"""Swarm join benchmark: time for a new node to join and see every peer, ours vs a bare hivemind.DHT.

For each swarm size N, in the same run:
  ours: a swarm of N-1 `p2pc` processes (a bootstrap + nodes); a new p2pcompute Node (identity key, signed
        peer record, validators, control API) joins and polls `fetch_peers` until it sees all N records.
  bare: N-1 bare hivemind.DHT peers, each having stored a value under one key with its own subkey; a new
        bare DHT joins, stores its own value and polls `get` of that key until it sees all N subkeys.
Also: wall time of `p2pc node start` from exec to its ready file (Python start-up and imports included).

Usage: python scripts/bench_swarm.py [--sizes 2 8 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")

import hivemind  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

from p2pcompute.config import load_config  # noqa: E402
from p2pcompute.node.daemon import Node  # noqa: E402
from p2pcompute.node.launcher import NodeProcess  # noqa: E402
from p2pcompute.retry import poll_until  # noqa: E402

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
BARE_KEY = "bench/peers"
JOIN_TIMEOUT = 60.0
JOIN_POLL = 0.02  # seconds between looks: small against the join times measured (0.14 s and up, docs/benchmarks.md)


def bare_kwargs() -> dict:
    return dict(host_maddrs=[LOOPBACK], use_relay=False, auto_nat=False, nat_port_map=False)


def bench_bare(n: int, repeats: int) -> list[float]:
    peers = [hivemind.DHT(start=True, **bare_kwargs())]
    boot = [str(a) for a in peers[0].get_visible_maddrs()]
    try:
        for _ in range(n - 2):
            peers.append(hivemind.DHT(start=True, initial_peers=boot, **bare_kwargs()))
        for p in peers:
            p.store(BARE_KEY, subkey=p.peer_id.to_bytes(), value=b"x" * 300, expiration_time=get_dht_time() + 600)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            new = hivemind.DHT(start=True, initial_peers=boot, **bare_kwargs())
            new.store(BARE_KEY, subkey=new.peer_id.to_bytes(), value=b"x" * 300, expiration_time=get_dht_time() + 600)
            poll_until(lambda: (found := new.get(BARE_KEY, latest=True)) is not None and len(found.value) >= n,
                       JOIN_TIMEOUT, interval=JOIN_POLL, what=f"the bare joiner to see {n} peers")
            times.append(time.perf_counter() - t0)
            new.shutdown()
            # the departed joiner's value stays (600 s); remove it from the count by using a fresh key next time
            _reset_bare(peers)
        return times
    finally:
        for p in peers:
            p.shutdown()


def _reset_bare(peers) -> None:
    global BARE_KEY
    BARE_KEY = BARE_KEY + "'"
    for p in peers:
        p.store(BARE_KEY, subkey=p.peer_id.to_bytes(), value=b"x" * 300, expiration_time=get_dht_time() + 600)


def bench_ours(n: int, repeats: int, root: Path) -> tuple[list[float], list[float]]:
    procs = [NodeProcess(["bootstrap"], root / "boot", ["--listen", LOOPBACK]).start()]
    boot = procs[0].loopback_maddr()
    try:
        for i in range(n - 2):
            procs.append(NodeProcess(["node", "start"], root / f"n{i}",
                                     ["--listen", LOOPBACK, "--bootstrap", boot, "--record-ttl", "60"]).start())
        joins, cli_ready = [], []
        for r in range(repeats):
            config = load_config(root / f"joiner{r}", overrides=dict(listen=[LOOPBACK], bootstrap=[boot],
                                                                      record_ttl=60))
            t0 = time.perf_counter()
            node = Node(config).start()
            try:
                poll_until(lambda: len(node.announcer.fetch_peers()) >= n, JOIN_TIMEOUT, interval=JOIN_POLL,
                           what=f"our joiner to see {n} peers")
                joins.append(time.perf_counter() - t0)
            finally:
                node.shutdown()
            # cold CLI start: exec of `p2pc node start` to its ready file
            proc = NodeProcess(["node", "start"], root / f"cli{r}", ["--listen", LOOPBACK, "--bootstrap", boot])
            t0 = time.perf_counter()
            proc.start()
            cli_ready.append(time.perf_counter() - t0)
            proc.stop()
        return joins, cli_ready
    finally:
        for p in procs:
            p.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"join and see all peers (median of {args.repeats}; {os.cpu_count()} cores)")
    for col in ("swarm size", "bare hivemind.DHT (s)", "p2pcompute Node (s)", "ratio ours/bare",
                "`p2pc node start` to ready (s)"):
        table.add_column(col, justify="right")
    for n in args.sizes:
        bare = bench_bare(n, args.repeats)
        with tempfile.TemporaryDirectory(prefix="bench-swarm-") as tmp:
            ours, cli = bench_ours(n, args.repeats, Path(tmp))
        b, o, c = statistics.median(bare), statistics.median(ours), statistics.median(cli)
        table.add_row(str(n), f"{b:.2f}", f"{o:.2f}", f"{o / b:.2f}x", f"{c:.2f}")
        print(f"n={n} bare={['%.2f' % x for x in bare]} ours={['%.2f' % x for x in ours]} "
              f"cli={['%.2f' % x for x in cli]}", file=sys.stderr)
    Console().print(table)


if __name__ == "__main__":
    main()
