#!/usr/bin/env python
"""Churn benchmark: a swarm whose peers are SIGKILLed and restarted at random, beside a static swarm of its mean size.

Churn phase: PEERS trainer workers (`python -m p2pcompute.training.worker`, a `p2pc bootstrap` to meet at) train the
demo's run (its epoch sized by the publish check for this machine, as `p2pc demo` does). One at a time, a random
peer's whole process group is SIGKILLed (a crash: nothing said to the others) and restarted at once with the same
identity; kills come every MEAN_SESSION / PEERS seconds on average (exponential), so a peer's session lasts about
MEAN_SESSION; the next kill waits until the last victim trains again. Static phase, in the same sitting: the
churn phase's mean number of training peers (rounded), nobody killed, for as long.

Printed, side by side: samples/s of the swarm (every peer process's samples_done, summed; goal churn >= 0.8x
static), the longest stall (the longest time the swarm's epoch, the highest of its live peers, did not move, in
the static phase's median epochs; goal <= 2), and the work of peers that stayed that the swarm discarded: epochs
they trained through whole (not their first after a start, not the one they were killed in) that counted 0 samples
for them (their samples were thrown away, e.g. by a state download). Credits themselves are not measured: they need
full nodes with a ledger and an issuer per run, too heavy to run beside this; discarded epochs are what a peer
would be paid nothing for (no payout without samples in the epoch).

Usage: python scripts/bench_churn.py [--peers 4] [--seconds 240] [--mean-session 60] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")

from p2pcompute.cli.demo import demo_spec_sized_here  # noqa: E402
from p2pcompute.devtools.peers import TrainerWorker  # noqa: E402
from p2pcompute.devtools.steady import SAMPLE_PERIOD, Swarm  # noqa: E402

WARMUP_EPOCHS = 2  # the swarm's epochs before a phase's clock starts (start-up is not what is measured)
WARMUP_TIMEOUT = 300.0  # seconds for the first workers to come up and train WARMUP_EPOCHS on a loaded box


class Tally:
    """What a phase measured: samples summed over worker processes, the swarm epoch's changes, discarded epochs."""

    def __init__(self):
        self.samples: dict[str, int] = {}  # worker name -> its last samples_done
        self.changes: list[float] = []  # times the swarm epoch moved
        self.epoch = -1
        self.discarded = self.whole = 0  # stayers' epochs trained through whole: counted 0 / all
        self.training_peers: list[int] = []
        self.kills = 0

    def read(self, workers: list[TrainerWorker], now: float) -> None:
        statuses = [w.status() for w in workers]
        for w, s in zip(workers, statuses):
            self.samples[w.name] = max(self.samples.get(w.name, 0), s.get("samples_done", 0))
        live = [s for w, s in zip(workers, statuses) if w.alive() and s.get("status") == "training"]
        self.training_peers.append(len(live))
        epoch = max((s.get("epoch", -1) for s in live), default=-1)
        if epoch > self.epoch:
            self.changes.append(now)
            self.epoch = epoch

    def settle(self, status: dict) -> None:
        """A worker's contributions at its end: every epoch it trained through but its first (the epoch it was
        killed in never completed, so it is not there)."""
        epochs = sorted(int(e) for e in status.get("contributions", {}))
        whole = epochs[1:]
        self.whole += len(whole)
        self.discarded += sum(status["contributions"][str(e)] == 0 for e in whole)

    def total_samples(self) -> int:
        return sum(self.samples.values())


def warm_up(swarm: Swarm, workers: list[TrainerWorker]) -> None:
    deadline = time.monotonic() + WARMUP_TIMEOUT
    while time.monotonic() < deadline:
        if min(w.epoch() for w in workers) >= WARMUP_EPOCHS:
            return
        time.sleep(SAMPLE_PERIOD)
    raise SystemExit(f"the swarm did not reach epoch {WARMUP_EPOCHS} within {WARMUP_TIMEOUT:.0f} s")


def restart_like(swarm: Swarm, victim: TrainerWorker, session: int) -> TrainerWorker:
    """A new worker with the victim's identity (its key copied into a new data dir, so its status file is new)."""
    base = victim.name.split("-")[0]
    name = f"{base}-{session}"
    (swarm.directory / name).mkdir()
    shutil.copy2(victim.data_dir / "identity.key", swarm.directory / name / "identity.key")
    return swarm.start_worker(name=name)


def run_phase(root: Path, spec: Path, peers: int, seconds: float, mean_session: float | None,
              rng: random.Random) -> tuple[Tally, float]:
    tally = Tally()
    with Swarm(root, spec) as swarm:
        swarm.start_bootstrap()
        workers = [swarm.start_worker(name=f"p{i}-0") for i in range(peers)]
        warm_up(swarm, workers)
        tally.samples = {w.name: w.status().get("samples_done", 0) for w in workers}
        base = dict(tally.samples)
        started = time.monotonic()
        next_kill = started + rng.expovariate(peers / mean_session) if mean_session else float("inf")
        sessions, pending = 0, None
        while (now := time.monotonic()) < started + seconds:
            tally.read(workers, now)
            if pending is not None and pending.status().get("status") == "training":
                pending = None
            if now >= next_kill and pending is None:
                victim = rng.choice(workers)
                tally.read(workers, now)
                victim.kill()
                tally.settle(victim.status())
                sessions += 1
                pending = restart_like(swarm, victim, sessions)
                workers[workers.index(victim)] = pending
                next_kill = now + rng.expovariate(peers / mean_session)
            time.sleep(SAMPLE_PERIOD)
        elapsed = time.monotonic() - started
        tally.read(workers, time.monotonic())
        for w in workers:
            tally.settle(w.status())
    for name, value in base.items():
        tally.samples[name] -= value
    tally.kills = sessions
    return tally, elapsed


def longest_stall(changes: list[float], end: float) -> float:
    return max((b - a for a, b in zip(changes, changes[1:] + [end])), default=0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=240.0, help="length of each phase (after warm-up)")
    parser.add_argument("--mean-session", type=float, default=60.0, help="seconds a peer lives on average")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="p2pc-churn-") as tmp:
        spec = Path(tmp) / "spec.toml"
        spec.write_text(demo_spec_sized_here(args.peers))
        (Path(tmp) / "churn").mkdir()
        churn, churn_s = run_phase(Path(tmp) / "churn", spec, args.peers, args.seconds, args.mean_session, rng)
        size = max(1, round(statistics.mean(churn.training_peers)))
        (Path(tmp) / "static").mkdir()
        static, static_s = run_phase(Path(tmp) / "static", spec, size, args.seconds, None, rng)

    epoch_s = statistics.median(b - a for a, b in zip(static.changes, static.changes[1:]))
    rate = {"churn": churn.total_samples() / churn_s, "static": static.total_samples() / static_s}
    stall = {"churn": longest_stall(churn.changes, churn.changes[0] + churn_s),
             "static": longest_stall(static.changes, static.changes[0] + static_s)}
    print(f"spec: the demo's run sized for {args.peers} peers on this machine ({os.cpu_count()} cores); "
          f"{args.seconds:.0f} s per phase, mean session {args.mean_session:.0f} s, seed {args.seed}")
    print(f"churn: {churn.kills} kills; mean training peers {statistics.mean(churn.training_peers):.2f} "
          f"-> static swarm of {size}; static median epoch {epoch_s:.1f} s")
    print("| | churn | static | ratio / goal |")
    print("| --- | --- | --- | --- |")
    print(f"| samples/s | {rate['churn']:,.0f} | {rate['static']:,.0f} | {rate['churn'] / rate['static']:.2f}x (>= 0.8x) |")
    print(f"| longest stall | {stall['churn']:.1f} s = {stall['churn'] / epoch_s:.1f} epochs | "
          f"{stall['static']:.1f} s = {stall['static'] / epoch_s:.1f} epochs | <= 2 epochs |")
    print(f"| stayers' whole epochs discarded | {churn.discarded} of {churn.whole} | {static.discarded} of "
          f"{static.whole} | 0 |")
    print(f"| swarm epochs | {churn.epoch} | {static.epoch} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
