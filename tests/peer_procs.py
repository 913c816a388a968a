"""Averaging tests' peer processes: each test file runs itself as `python FILE --rank R --dir D` for every peer
(hivemind's DHT and averagers need a process of their own), bootstrapped on 127.0.0.1 through a file."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from conftest import wait_until

CHECKOUT = Path(__file__).resolve().parent.parent
FILE_TIMEOUT = 90.0  # a file another peer writes (the bootstrap address, a round barrier) on a loaded 2-core box


def run_peers(script: str, peers: int, directory: Path, timeout: float) -> None:
    """Start every peer, wait (bounded) for all to exit 0, and kill each one's process group in any case
    (a peer that crashed may have left its p2pd behind)."""
    procs = []
    env = {**os.environ, "GOLOG_LOG_LEVEL": "fatal",  # this checkout first, as in the test process
           "PYTHONPATH": os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))}
    try:
        for rank in range(peers):
            with open(directory / f"log-{rank}.txt", "w") as log:
                procs.append(subprocess.Popen([sys.executable, script, "--rank", str(rank), "--dir", str(directory)],
                                              stdout=log, stderr=log, start_new_session=True, env=env))
        deadline = time.monotonic() + timeout
        for rank, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = "timeout"
            assert code == 0, f"peer {rank} failed ({code}):\n{(directory / f'log-{rank}.txt').read_text()[-3000:]}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def loopback_dht(rank: int, directory: Path):
    """A DHT on 127.0.0.1; peer 0 writes its addresses to DIR/boot, the others bootstrap from them."""
    import hivemind

    boot = directory / "boot"
    initial = [] if rank == 0 else wait_for_file(boot).split()
    dht = hivemind.DHT(start=True, initial_peers=initial or None, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       use_relay=False, use_auto_relay=False, auto_nat=False, nat_port_map=False)
    if rank == 0:
        write_atomic(boot, "\n".join(map(str, dht.get_visible_maddrs())))
    return dht


def barrier(directory: Path, name: str, rank: int, peers: int) -> None:
    """Every peer reaches `name` before any goes on (e.g. leave a round together: a mate may still be reading
    our last frames)."""
    write_atomic(directory / f"done-{name}-{rank}", "")
    for other in range(peers):
        wait_for_file(directory / f"done-{name}-{other}")


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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for_file(path: Path) -> str:
    wait_until(path.exists, FILE_TIMEOUT, interval=0.05, what=str(path))
    return path.read_text()


def peer_main(peer: Callable[[int, Path], None]) -> None:
    """The `if __name__ == "__main__"` of a peer process."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    options = parser.parse_args()
    peer(options.rank, options.dir)
