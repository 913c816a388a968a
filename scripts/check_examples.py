#!/usr/bin/env python
"""Steady state of every shipped run spec: N workers on 127.0.0.1, started at once and one at a time.

For each spec (docs/examples/*.toml and the demo's, in gradients and in local mode, sized as `p2pc demo` would on
this machine) and each way of starting: a `p2pc bootstrap` and N `python -m p2pcompute.training.worker` processes;
their status files are read every 0.5 s until the slowest peer has trained MEASURE epochs after a steady point
(p2pcompute/devtools/steady.py). Per case it prints: the publish check's verdict on this machine, the median
epoch time, the rounds from "every peer trains" to "all in step for good" (goal <= 3), the lowest compute share
of a peer since then (1 - seconds in epoch-ending steps / training seconds, from the trainer's own timing;
goal >= 0.8) and the swarm's samples/s. Specs whose epochs would take longer than --max-epoch-seconds on this
machine (by the publish check's estimate) are listed with that estimate and not run.

Usage: python scripts/check_examples.py [--specs demo demo-local docs/examples/mlp-synthetic.toml ...]
           [--starts at-once one-at-a-time] [--peers 3] [--measure 3] [--max-epoch-seconds 60] [--min-peers 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")

from p2pcompute.cli.demo import demo_spec_sized_here  # noqa: E402
from p2pcompute.devtools.steady import Swarm, analyze, steady_for, trace, watch  # noqa: E402
from p2pcompute.node.pacing import PublishPacing  # noqa: E402
from p2pcompute.runs.manifest import Manifest  # noqa: E402
from p2pcompute.runs.pacing import Throughput, check_pacing  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
MAX_ROUNDS = 3  # issue 14: in step within 3 rounds ...
MIN_SHARE = 0.8  # ... and then at least 80% of the time computing
GIVE_UP_EPOCHS = 12  # epochs after the last peer started without a steady point: the case failed
CASE_TIMEOUT_EPOCHS = 25  # a case's time limit, in (estimated) epochs plus START_SLACK
START_SLACK = 120.0  # seconds: imports, p2pd, state downloads on a loaded machine


PACING = PublishPacing("cpu", [])  # one measurement per model, kept: the demo's spec is checked as it was sized


def spec_text(name: str, peers: int) -> str:
    if name in ("demo", "demo-local"):
        return demo_spec_sized_here(peers, "local" if name == "demo-local" else "gradients", pacing=PACING)
    return Path(name).read_text()


def estimate(manifest: Manifest, peers: int) -> tuple[float, str | None]:
    """The publish check on this machine for `peers` workers on it: (epoch seconds, refusal reason or None)."""
    per_peer, source = PACING.per_peer(manifest)
    pacing = check_pacing(manifest, Throughput(per_peer * min(peers, os.cpu_count() or 1), peers, source))
    return pacing.epoch_seconds, pacing.reason


def run_case(root: Path, spec: Path, peers: int, start: str, measure: int, min_peers: int, epoch_s: float):
    timeout = START_SLACK + CASE_TIMEOUT_EPOCHS * epoch_s
    with Swarm(root, spec, ["--min-peers", str(min_peers)]) as swarm:
        started = time.monotonic()
        if start == "at-once":
            workers = swarm.start_at_once(peers)
        else:
            workers = swarm.start_one_at_a_time(peers, timeout=timeout)
        samples = watch(workers, steady_for(measure, GIVE_UP_EPOCHS), max(60.0, timeout - (time.monotonic() - started)))
    return analyze(samples), samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--specs", nargs="*",
                        default=["demo", "demo-local", *sorted(str(p) for p in EXAMPLES.glob("*.toml"))])
    parser.add_argument("--starts", nargs="*", default=["at-once", "one-at-a-time"],
                        choices=["at-once", "one-at-a-time"])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--measure", type=int, default=3, help="epochs measured after the steady point")
    parser.add_argument("--min-peers", type=int, default=1, help="the workers' --min-peers (a node's default: 1)")
    parser.add_argument("--max-epoch-seconds", type=float, default=60.0,
                        help="skip specs whose epochs the publish check estimates longer than this here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="p2pc-examples-") as tmp:
        for name in args.specs:
            text = spec_text(name, args.peers)
            manifest = Manifest.from_toml(text)
            epoch_s, refused = estimate(manifest, args.peers)
            label = f"{Path(name).stem} ({manifest.averaging.mode})"
            if refused:
                rows.append((label, "-", f"{epoch_s:.0f}", "-", "-", "-", f"refused at publish: {refused[:200]}"))
                continue
            if epoch_s > args.max_epoch_seconds:
                rows.append((label, "-", f"{epoch_s:.0f}", "-", "-", "-", "not run: epochs too long for this check"))
                continue
            for start in args.starts:
                root = Path(tmp) / f"{Path(name).stem}-{start}"
                root.mkdir()
                spec = root / "spec.toml"
                spec.write_text(text)
                t0 = time.monotonic()
                try:
                    found, samples = run_case(root, spec, args.peers, start, args.measure, args.min_peers, epoch_s)
                except Exception as e:  # one failed case must not hide the others' figures
                    rows.append((label, start, f"{epoch_s:.0f}", "-", "-", "-", f"error: {type(e).__name__}: {e}"[:200]))
                    continue
                verdict = "ok" if found.healthy(MAX_ROUNDS, MIN_SHARE) else "FAILS"
                rows.append((label, start, f"{epoch_s:.0f}",
                             f"{found.epoch_seconds:.1f}" if found.epoch_seconds else "-",
                             "-" if found.rounds is None else str(found.rounds),
                             "-" if found.compute_share is None else f"{found.compute_share:.0%}",
                             f"{verdict}: {found.samples_per_s or 0:,.0f} samples/s, epochs {found.start_epoch}->"
                             f"{found.steady_epoch}->{found.end_epoch}, {time.monotonic() - t0:.0f} s"))
                print(" | ".join(rows[-1]), flush=True)
                if verdict != "ok":
                    print(f"shares {[round(s, 2) for s in found.shares]}\n{trace(samples)}", flush=True)
    print()
    print("| spec (mode) | start | est. epoch s | epoch s | rounds to steady | compute share | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if all(r[6].startswith(("ok:", "not run")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
