#!/usr/bin/env python
"""The node's page: CPU cost of its live updates to the node, with N pages' event streams open vs none.

One bootstrap and one `p2pc node start` process (training a small published run, or with --no-train an idle
node) run for the whole benchmark. In alternating phases of T seconds each, in the same run:
  none:    no page open (the reference: what the node costs anyway);
  N pages: N clients hold GET /api/events open and read every update (2 s apart, as a browser does).
CPU = user + system seconds of the node's whole process tree (main process, DHT process, p2pd, averagers) from
/proc, over the phase. Printed: each phase as a share of one core, and the difference pages - none.

Usage: python scripts/bench_dashboard.py [--clients 4] [--seconds 30] [--rounds 2] [--no-train]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")

from p2pcompute.node import proctree  # noqa: E402
from p2pcompute.node.launcher import NodeProcess  # noqa: E402
from p2pcompute.retry import poll_until  # noqa: E402
from p2pcompute.runs.specs import mlp_synthetic_spec  # noqa: E402

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TRAINING_TIMEOUT = 180.0  # seconds for the node to pick the run up and start training (a loaded machine)
STREAM_TIMEOUT = 30.0  # seconds a client waits for the next update before giving up


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of `pid` and every live descendant (utime and stime, fields 14 and 15 of stat)."""
    total = 0
    for p in [pid, *(r.pid for r in proctree.descendants(pid))]:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


class EventClient(threading.Thread):
    """One page's event stream, read to the end like a browser reads it; counts updates and bytes."""

    def __init__(self, port: int, token: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.token, self.stop = port, token, stop
        self.updates = self.bytes = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=STREAM_TIMEOUT)
        try:
            conn.request("GET", "/api/events", headers={"Authorization": f"Bearer {self.token}"})
            response = conn.getresponse()
            assert response.status == 200, response.status
            while not self.stop.is_set():
                line = response.readline()
                if not line:
                    break
                self.bytes += len(line)
                self.updates += line.startswith(b"event: snapshot")
        finally:
            conn.close()


def phase(node: NodeProcess, clients: int, seconds: float) -> dict:
    endpoint = json.loads((node.data_dir / "control.json").read_text())
    token = (node.data_dir / "control.token").read_text().strip()
    stop = threading.Event()
    readers = [EventClient(endpoint["port"], token, stop) for _ in range(clients)]
    for r in readers:
        r.start()
    if readers:  # the streams are open and the first update went out before the clock starts
        poll_until(lambda: all(r.updates for r in readers), 30, what="every client's first update")
    cpu0, t0 = tree_cpu_seconds(node.pid), time.monotonic()
    time.sleep(seconds)
    cpu, wall = tree_cpu_seconds(node.pid) - cpu0, time.monotonic() - t0
    stop.set()
    for r in readers:
        r.join(STREAM_TIMEOUT)
    return {"clients": clients, "cpu_s": cpu, "wall_s": wall, "share": cpu / wall,
            "updates": sum(r.updates for r in readers), "bytes": sum(r.bytes for r in readers)}


def trainer_epoch(node: NodeProcess) -> int | None:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "p2pcompute.cli.main", "node", "status", "--json", "--data-dir",
                          str(node.data_dir)], capture_output=True, text=True, timeout=60)
    trainer = ((json.loads(out.stdout) if out.returncode == 0 else {}).get("training") or {}).get("trainer") or {}
    return trainer.get("epoch") if trainer.get("status") == "training" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-train", dest="train", action="store_false")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        root = Path(tmp)
        bootstrap = NodeProcess(["bootstrap"], root / "bootstrap", ["--listen", LOOPBACK]).start()
        node = NodeProcess(["node", "start"], root / "node",
                           ["--listen", LOOPBACK, "--bootstrap", bootstrap.loopback_maddr(), "--name", "bench",
                            *([] if args.train else ["--no-train"])])
        try:
            node.start()
            if args.train:
                spec = root / "run.toml"
                spec.write_text(mlp_synthetic_spec(
                    "bench-dashboard", batch_size_per_step=32, target_batch_size=2048, max_epochs=0, in_features=8,
                    hidden=[32], out_features=2, seed=1, averaging={"compression": "none"}))
                import subprocess

                subprocess.run([sys.executable, "-m", "p2pcompute.cli.main", "run", "publish", str(spec), "--force",
                                "--data-dir", str(node.data_dir)], check=True, capture_output=True, timeout=120)
                poll_until(lambda: trainer_epoch(node) is not None, TRAINING_TIMEOUT, interval=1,
                           what="the node to train the run")
            results: dict[int, list[dict]] = {0: [], args.clients: []}
            for _ in range(args.rounds):
                for clients in (0, args.clients):
                    results[clients].append(phase(node, clients, args.seconds))
        finally:
            node.stop()
            bootstrap.stop()
    what = "training a run" if args.train else "not training (--no-train)"
    print(f"node {what}; {args.rounds} rounds of {args.seconds:.0f} s per phase; CPU of the node's process tree")
    print(f"{'pages open':>10} | {'share of one core (each round)':>32} | {'median':>7} | {'updates':>7} | {'bytes':>9}")
    for clients, runs in results.items():
        shares = " ".join(f"{100 * r['share']:6.2f}%" for r in runs)
        print(f"{clients:>10} | {shares:>32} | {100 * statistics.median(r['share'] for r in runs):6.2f}% | "
              f"{sum(r['updates'] for r in runs):>7} | {sum(r['bytes'] for r in runs):>9}")
    base = statistics.median(r["share"] for r in results[0])
    with_pages = statistics.median(r["share"] for r in results[args.clients])
    print(f"live updates for {args.clients} pages: {100 * (with_pages - base):+.2f}% of one core "
          f"({100 * (with_pages - base) / max(1, args.clients):+.2f}% per page); goal: under 1%")


if __name__ == "__main__":
    main()
