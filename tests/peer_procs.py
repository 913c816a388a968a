"""Averaging tests' peer processes: each test file runs itself as `python FILE --rank R --dir D` for every peer
(hivemind's DHT and averagers need a process of their own), bootstrapped on 127.0.0.1 through a file
(p2pcompute.devtools.peers: the harness, shared with the benchmarks)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Callable

from p2pcompute.devtools.peers import PeerGroup, barrier, join_dht, wait_for_file, write_atomic  # noqa: F401 (tests import these)

CHECKOUT = Path(__file__).resolve().parent.parent


def run_peers(script: str, peers: int, directory: Path, timeout: float) -> None:
    """Start every peer, wait (bounded) for all to exit 0, and kill each one's process group in any case
    (a peer that crashed may have left its p2pd behind)."""
    env = {"GOLOG_LOG_LEVEL": "fatal",  # this checkout first, as in the test process
           "PYTHONPATH": os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))}
    with PeerGroup(directory, grace=0) as group:
        for rank in range(peers):
            group.start([script, "--rank", str(rank), "--dir", str(directory)], log=f"log-{rank}.txt", env=env)
        for rank, (proc, code) in enumerate(zip(group.procs, group.finish(timeout))):
            assert code == 0, f"peer {rank} failed ({'timeout' if code is None else code}):\n{proc.log_tail()}"


@contextlib.contextmanager
def loopback_dht(rank: int, directory: Path):
    """Peer `rank`'s DHT on 127.0.0.1, bootstrapped through DIR/boot (join_dht), for one with-block; torch on one
    thread (peers share 2 cores)."""
    import torch

    torch.set_num_threads(1)
    dht = join_dht(directory, rank)
    try:
        yield dht
    finally:
        dht.shutdown()


@contextlib.contextmanager
def running(averager):
    """An averager for one with-block: shut down after it, however it ends."""
    try:
        yield averager
    finally:
        averager.shutdown()


def run_round(averager, directory: Path, name: str, rank: int, peers: int, **step) -> None:
    """One averaging round: step, record it in DIR/<name>-<rank>.pt, then wait for every peer to have done the same
    (leave together: a mate may still be reading our last frames; the next round starts together)."""
    save_round(averager, averager.step(**step), directory / f"{name}-{rank}.pt")
    barrier(directory, name, rank, peers)


def save_round(averager, gathered, path: Path) -> None:
    """What a peer's round left in its averager (tensors, group size, its round stats), for the test process."""
    import torch

    stats = averager.last_round()
    with averager.get_tensors() as tensors:
        torch.save({"tensors": [t.clone() for t in tensors], "group_size": len(gathered or {}),
                    "failed_fraction": stats.failed_fraction, "allreduce_s": stats.allreduce_s}, path)


def peer_main(peer: Callable[[int, Path], None]) -> None:
    """The `if __name__ == "__main__"` of a peer process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    options = parser.parse_args()
    peer(options.rank, options.dir)
