"""Cheat benchmark: a gradients-mode swarm with honest peers and one cheater, audited at rate r by an issuer.

Real code throughout: every peer draws its batches with `batch_for`, computes its step gradients on the demo's MLP at
the epoch's start state (`Recomputer.step_gradient`, the trainer's forward/backward) and records them with the
trainer's `WorkRecorder` (step sketches, Merkle root, commitment); the swarm applies the run's optimizer to the
weighted mean of the contributions. The cheater fakes a share of its epochs (`--fake`): it computes nothing, commits
random step sketches for an inflated step count (`--inflate`) and sends a random gradient. The issuer audits with
`audit_claim` (ticket, selection, spot steps, the claimant's reveal, recomputation, verdict).

Printed per audit rate r: claims audited, false positives (honest claims not passing), faked claims caught of those
audited (d = per-audit detection), the probability that the cheater is caught within the run: measured over --trials
auditor keys (on this run's k faked epochs), expected 1 - (1 - r d)^k, and for a cheater faking f of N epochs
1 - (1 - f r d)^N; the
cheater's expected credits before detection, and the audit overhead: CPU time of audits (auditor and claimant) over the
CPU time of the swarm's training, measured; and the same for whole-epoch recomputation (measured once per claim size).

    PYTHONPATH=. python scripts/bench_cheat.py [--peers 4] [--epochs 100] [--steps 256] [--spot 8]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch

from p2pcompute import crypto
from p2pcompute.cli.demo import demo_spec
from p2pcompute.credits.audit import PPM
from p2pcompute.credits.claims import Claim
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.optimizers import optimizer_factory
from p2pcompute.training.work import Recomputer, WorkRecorder, audit_claim

GOAL_EPOCHS, GOAL_PROBABILITY, GOAL_OVERHEAD = 100, 0.99, 0.05  # issue 10, "Done means"
PUBLISHER = bytes(32)  # the run's publisher key, as claims name it
CREDITS_PER_SAMPLE = 1000 / 10**6  # the demo's credit policy: rate 1000 micro-credits per sample


def key(label: str, i: int) -> crypto.SigningKey:
    return crypto.SigningKey(crypto.digest(f"{label}/{i}".encode()))


def train_swarm(args, manifest: Manifest):
    """Run the swarm; return (claims [(epoch, peer index, commitment, samples, faked)], start states, recorders,
    training CPU seconds, of which recording step sketches)."""
    peers = [key("peer", i).public_key for i in range(args.peers)]
    cheater = args.peers - 1
    recorders = [WorkRecorder(manifest.run_id, p, manifest.batch_size_per_step, keep_epochs=args.epochs) for p in peers]
    swarm = Recomputer(manifest)  # the shared model: every peer starts each epoch from the same parameters
    optimizer = optimizer_factory(manifest.optimizer.name, manifest.optimizer.as_dict())(swarm.params)
    worker = Recomputer(manifest, dataset=swarm.dataset)
    chance = random.Random(args.seed)
    claims, states, cpu = [], {}, 0.0
    recording = 0.0  # CPU seconds of WorkRecorder.record_step in honest epochs (the trainer's cost of being auditable)
    for epoch in range(args.epochs):
        start = [p.detach().clone() for p in swarm.params]
        states[epoch] = start
        total, weight = [torch.zeros_like(p) for p in start], 0
        for index, (peer, recorder) in enumerate(zip(peers, recorders)):
            began = time.process_time()
            worker.load(start)
            recorder.begin_epoch(epoch, worker.params)
            faked = index == cheater and chance.random() < args.fake
            if faked:  # no work: random sketches for an inflated step count, a random gradient for the swarm
                steps = int(args.steps * args.inflate)
                generator = torch.Generator().manual_seed(epoch)
                for step in range(steps):
                    for p in worker.params:
                        p.grad = torch.randn(p.shape, generator=generator) * 0.01
                    recorder.record_step(epoch, step, worker.params)
                contribution = [torch.randn(p.shape, generator=generator) * 0.01 for p in worker.params]
            else:
                steps = args.steps
                contribution = [torch.zeros_like(p) for p in start]
                for step in range(steps):
                    for acc, grad in zip(contribution, worker.step_gradient(peer, epoch, step)):
                        acc.add_(grad)
                    marked = time.process_time()
                    recorder.record_step(epoch, step, worker.params)
                    recording += time.process_time() - marked
                contribution = [c / steps for c in contribution]
            commitment = recorder.end_epoch(epoch, completed=True)
            samples = steps * manifest.batch_size_per_step
            for acc, c in zip(total, contribution):
                acc.add_(c, alpha=samples)
            weight += samples
            if not faked:
                cpu += time.process_time() - began
            claims.append((epoch, index, commitment, samples, faked))
        began = time.process_time()
        optimizer.zero_grad()
        for p, acc in zip(swarm.params, total):
            p.grad = acc / weight
        optimizer.step()
        cpu += time.process_time() - began
    return claims, states, recorders, cpu, recording


def audit_run(manifest, claims, states, recorders, rate_ppm: int, spot: int, trial: int, cheater: int,
              full: bool, recomputer: Recomputer):
    """One issuer (auditor key `trial`) auditing the run in epoch order. full: every selected claim is audited (CPU time
    measured); otherwise only the cheater's, until the first failure (detection time). Returns (audited, false
    positives, faked audited, faked caught, first detection epoch or None, audit CPU seconds)."""
    auditor = key("auditor", trial)
    audited = false_positives = faked_audited = caught = 0
    detected, cpu = None, 0.0
    for epoch, index, commitment, samples, faked in claims:
        if not full and (index != cheater or detected is not None):
            continue
        recorder = recorders[index]
        began = time.process_time()
        claim = Claim(manifest.run_id, PUBLISHER, epoch, commitment.peer, samples, b"", commitment.digest)
        report = audit_claim(recomputer, states[epoch], claim, commitment, crypto.digest(claim.wire), auditor, rate_ppm,
                             lambda c, steps: recorder.reveal(c.epoch, steps), spot=spot)
        cpu += time.process_time() - began
        if report is None:
            continue
        audited += 1
        if faked:
            faked_audited += 1
            if report.verdict == "fail":
                caught += 1
                detected = epoch if detected is None else detected
        elif report.verdict != "pass":
            false_positives += 1
    return audited, false_positives, faked_audited, caught, detected, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4, help="peers, the last one the cheater")
    parser.add_argument("--epochs", type=int, default=GOAL_EPOCHS)
    parser.add_argument("--steps", type=int, default=256, help="steps per peer and epoch (the demo: ~2,000 on a "
                        "2-core machine, its epoch paced to ~9 s of compute)")
    parser.add_argument("--spot", type=int, default=8, help="steps recomputed per audited claim")
    parser.add_argument("--fake", type=float, default=0.1, help="share of the cheater's epochs it fakes")
    parser.add_argument("--inflate", type=float, default=1.5, help="faked claims count this many times the steps")
    parser.add_argument("--rates", default="0.02,0.05,0.1,0.2,0.45,1", help="audit rates (share of claims)")
    parser.add_argument("--trials", type=int, default=200, help="auditor keys for the detection probability")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU time is then compute time, comparable between training and audits
    manifest = Manifest.from_toml(demo_spec(args.epochs))
    cheater = args.peers - 1
    print(f"demo MLP ({sum(p.numel() for p in Recomputer(manifest).params):,} parameters), batch "
          f"{manifest.batch_size_per_step}; {args.peers} peers (1 cheater faking {args.fake:.0%} of its epochs, claims "
          f"x{args.inflate} steps), {args.steps} steps per peer-epoch, {args.epochs} epochs, {args.spot} spot steps "
          f"per audit; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    claims, states, recorders, train_cpu, recording = train_swarm(args, manifest)
    faked = [c for c in claims if c[4]]
    print(f"training: {train_cpu:.1f} s CPU, of which {recording / train_cpu:.1%} recording step sketches; cheater "
          f"faked {len(faked)} of {args.epochs} epochs")
    recomputer = Recomputer(manifest)
    # whole-epoch recomputation, for comparison: a few honest claims recomputed in full
    sample = [c for c in claims if not c[4]][:5]
    began = time.process_time()
    for epoch, _, commitment, _, _ in sample:
        recomputer.load(states[epoch])
        recomputer.contribution(commitment.peer, epoch, commitment.steps)
    whole_cpu = (time.process_time() - began) / len(sample)
    per_claim_train = train_cpu / sum(1 for c in claims if not c[4])
    honest_samples = args.steps * manifest.batch_size_per_step
    fake_samples = int(args.steps * args.inflate) * manifest.batch_size_per_step

    k = len(faked)
    print(f"\n{'rate':>5} {'audited':>8} {'false+':>6} {'faked caught':>12} {'P(caught), trials':>18} "
          f"{f'1-(1-rd)^{k}':>12} {f'1-(1-frd)^{args.epochs}':>14} {'E[credits before]':>18} {'overhead':>9} "
          f"{'whole-epoch':>12}")
    for rate in (float(r) for r in args.rates.split(",")):
        rate_ppm = round(rate * PPM)
        audited, fp, faked_audited, caught, _, audit_cpu = audit_run(manifest, claims, states, recorders, rate_ppm,
                                                                     args.spot, 0, cheater, True, recomputer)
        detections = [audit_run(manifest, claims, states, recorders, rate_ppm, args.spot, t, cheater, False,
                                recomputer)[4] for t in range(args.trials)]
        measured = sum(d is not None for d in detections) / args.trials
        d = caught / faked_audited if faked_audited else 1.0
        realized = 1 - (1 - rate * d) ** k
        per_epoch = args.fake * rate * d
        nominal = 1 - (1 - per_epoch) ** args.epochs
        # expected epochs until the first caught fake (geometric), times what the cheater earns per epoch
        epochs_before = 1 / per_epoch if per_epoch else math.inf
        earned = epochs_before * ((1 - args.fake) * honest_samples + args.fake * fake_samples) * CREDITS_PER_SAMPLE
        overhead = audit_cpu / train_cpu
        whole = rate * whole_cpu / per_claim_train
        print(f"{rate:>5.2f} {audited:>8} {fp:>6} {f'{caught}/{faked_audited}':>12} {measured:>18.3f} "
              f"{realized:>12.3f} {nominal:>14.3f} {earned:>18,.1f} {overhead:>9.2%} {whole:>12.1%}")
    need = (1 - (1 - GOAL_PROBABILITY) ** (1 / GOAL_EPOCHS)) / args.fake
    print(f"\ngoal: caught within {GOAL_EPOCHS} epochs with p >= {GOAL_PROBABILITY} needs r >= {need:.3f} (per-audit "
          f"detection 1); overhead at that rate: spot checks ~{need * args.spot / args.steps:.2%} of training here "
          f"({need * args.spot / 2000:.2%} at the demo's ~2,000 steps per peer-epoch), whole-epoch recomputation "
          f"~{need * whole_cpu / per_claim_train:.0%}")
    print(f"a caught cheater loses everything it earned in the run (clawback): E[credits before detection] is also "
          f"what it forfeits")


if __name__ == "__main__":
    main()
