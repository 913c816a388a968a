#!/usr/bin/env python
"""Trainer CPU threads benchmark: k trainers on this machine with torch's intra-op threads left as torch sets them,
with torch's count (every core) set explicitly, and with the node's default (training/device.py cpu_threads: every
core but one, set explicitly), same run, same sitting.

Each trial starts a `p2pc bootstrap`-less swarm of PEERS `python -m p2pcompute.training.worker` processes on
127.0.0.1 (the first one is the others' bootstrap), waits until every peer trains, then counts over WINDOW seconds
the swarm's epochs (the slowest peer's, from the status files) and samples (every peer's samples_done, summed).
Variants alternate within each repeat, so load drift hits all of them.

Runs measured: the swarm tests' MLP (8 -> 32 -> 2, 16-sample steps, 512-sample epochs: coordination-bound) and
the demo's run at its size for this machine (`p2pc demo`'s spec: compute-bound epochs of ~10 s).

Printed: per run and variant, the median over repeats of epochs/s and samples/s, and the ratio to torch untouched.

Usage: python scripts/bench_threads.py [--peers 2] [--window 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from p2pcompute.cli.demo import demo_spec_sized_here  # noqa: E402
from p2pcompute.devtools.peers import TrainerWorker  # noqa: E402
from p2pcompute.runs.specs import mlp_synthetic_spec  # noqa: E402

START_TIMEOUT = 120.0  # seconds for every peer to train (cold imports and p2pd on a loaded box)
RUN_SECONDS = 600.0  # a worker's own limit: nothing outlives a crashed benchmark for long

RUNS = {
    "swarm-test MLP": lambda peers: mlp_synthetic_spec(
        "bench-threads", batch_size_per_step=16, target_batch_size=512, in_features=8, hidden=[32], out_features=2,
        noise="0.05", seed=3, optimizer="adam", lr="0.01", averaging={"average_state_every": 5}),
    "demo run": lambda peers: demo_spec_sized_here(peers),
}


def torch_default_threads() -> int:
    import torch

    return torch.get_num_threads()


def trial(spec: str, peers: int, window: float, threads: int) -> dict:
    """One swarm of `peers` workers with --cpu-threads `threads` (0: the node's default): epochs/s, samples/s."""
    root = Path(tempfile.mkdtemp(prefix="p2pc-bench-threads-"))
    workers: list[TrainerWorker] = []
    try:
        spec_file = root / "spec.toml"
        spec_file.write_text(spec)
        common = ["--max-seconds", str(RUN_SECONDS), "--min-peers", str(peers), "--cpu-threads", str(threads),
                  "--max-epochs", "0"]
        workers.append(TrainerWorker(root, "p0", spec_file, common).start(wait=False))
        boot = workers[0].wait_ready(START_TIMEOUT)[0]
        for i in range(1, peers):
            workers.append(TrainerWorker(root, f"p{i}", spec_file, [*common, "--initial-peers", boot]).start(wait=False))
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.status().get("epoch", -1) >= 1 for w in workers):
            if time.monotonic() > deadline or any(not w.alive() for w in workers):
                raise RuntimeError("the swarm did not train: " + workers[-1].log_tail())
            time.sleep(0.2)
        first = [w.status() for w in workers]
        started = time.monotonic()
        time.sleep(window)
        last = [w.status() for w in workers]
        seconds = time.monotonic() - started
        in_use = {s.get("cpu_threads") for s in last}
        return {"epochs_per_s": (min(s["epoch"] for s in last) - min(s["epoch"] for s in first)) / seconds,
                "samples_per_s": sum(b["samples_done"] - a["samples_done"] for a, b in zip(first, last)) / seconds,
                "threads": ",".join(str(t) for t in sorted(in_use)), "load": os.getloadavg()[0]}
    finally:
        for worker in workers:
            worker.kill()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    console = Console()
    default = torch_default_threads()
    variants = {"torch untouched (cpu_threads = -1)": -1, f"torch's count, set ({default})": default,
                "ours (cpu_threads = 0)": 0}
    table = Table(title=f"{args.peers} trainers on {os.cpu_count()} cores, {args.window:.0f} s windows, "
                        f"median of {args.repeats}")
    for column in ("run", "variant", "threads", "epochs/s", "samples/s", "vs torch untouched", "load"):
        table.add_column(column)
    for run in args.runs:
        spec = RUNS[run](args.peers)
        results: dict[str, list[dict]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, threads in variants.items():
                result = trial(spec, args.peers, args.window, threads)
                console.print(f"{run} / {name} / repeat {repeat + 1}: {result}")
                results[name].append(result)
        medians = {name: {key: statistics.median(r[key] for r in rs) for key in ("epochs_per_s", "samples_per_s", "load")}
                   for name, rs in results.items()}
        reference = medians[next(iter(variants))]
        for name, m in medians.items():
            ratio = m["samples_per_s"] / reference["samples_per_s"] if reference["samples_per_s"] else float("nan")
            table.add_row(run, name, results[name][-1]["threads"], f"{m['epochs_per_s']:.2f}",
                          f"{m['samples_per_s']:.0f}", f"{ratio:.2f}x", f"{m['load']:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
