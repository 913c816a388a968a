"""How far is an honest recomputation of a step's gradient sketch from the claimant's, against fabricated ones?

For each model (the demo's MLP, the CNN example's shape, a wider MLP), at a start state after some training:
the claimant's step sketches (this process, 1 torch thread), an honest recomputation in another process with 2
threads, the same under bf16 autocast (what a GPU's mixed precision does to a gradient), and fabrications: a random
gradient of the same norm, zeros, a stale gradient (same step, previous epoch's batch and state), a gradient on fewer
samples than the batch (1/2, 15/16), another peer's batch. Distances: relative L2 distance of the sketches
(credits/sketch.py), in ppm, over --steps steps (min / median / max). The epoch-level rows compare whole-epoch
contributions (mean of the step gradients) with a lazy one (90% of the steps), to show why commitments are per step.

    PYTHONPATH=. python scripts/bench_audit_tolerance.py [--steps 64]

--record-cost: what being auditable costs a trainer instead (trainers record by default in gradients mode): CPU time
of a training step (forward/backward, the trainer's batch) against WorkRecorder's record of it (begin_epoch and
end_epoch included), per model, these three and part (b)'s 6.3M-parameter MLP of scripts/bench_training.py; thread CPU
time, so other processes' load moves it little.

    PYTHONPATH=. python scripts/bench_audit_tolerance.py --record-cost [--steps 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from p2pcompute.cli.demo import demo_spec
from p2pcompute.credits.audit import TOLERANCE_PPM
from p2pcompute.credits.sketch import SketchBasis, distance_ppm, sketch_seed
from p2pcompute.runs.datasets import batch_for
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.specs import mlp_synthetic_spec
from p2pcompute.training.work import Recomputer, WorkRecorder, state_digest

CNN_SPEC = """name = "cnn-audit"
batch_size_per_step = 32
target_batch_size = 4096
[model]
name = "cnn"
in_channels = 1
image_size = 8
channels = [16, 32]
kernel_size = 3
num_classes = 10
[dataset]
name = "synthetic"
task = "classification"
input_shape = [1, 8, 8]
outputs = 10
seed = 7
[optimizer]
name = "sgd"
lr = "0.05"
momentum = "0.9"
"""
PEER, OTHER = b"\x01" * 32, b"\x02" * 32
EPOCH = 5
WARMUP_STEPS = 200  # Adam/SGD steps before the audited epoch: gradients of a trained model are smaller and noisier


def manifests() -> dict[str, Manifest]:
    wide = mlp_synthetic_spec("wide-audit", batch_size_per_step=128, target_batch_size=4096, in_features=64,
                              hidden=[512, 512], out_features=10, seed=3)
    return {"demo MLP 16-64-64-4": Manifest.from_toml(demo_spec(20)), "CNN 8x8 16-32": Manifest.from_toml(CNN_SPEC),
            "MLP 64-512-512-10": Manifest.from_toml(wide)}


def record_cost(steps: int) -> None:
    """Thread CPU per step: training (Recomputer.step_gradient, the trainer's forward/backward on its batch) and the
    trainer's record of it (WorkRecorder, as training/trainer.py calls it), over `steps` steps of one epoch."""
    big = mlp_synthetic_spec("bench-mlp", batch_size_per_step=64, target_batch_size=8192, in_features=512,
                             hidden=[2048, 2048], out_features=512, seed=1)
    models = {**manifests(), "MLP 512-2048-2048-512 (bench_training b)": Manifest.from_toml(big)}
    print(f"{'model':<42} {'parameters':>11} {'step ms':>9} {'record ms':>10} {'record / step':>14}")
    for name, manifest in models.items():
        recomputer = Recomputer(manifest)
        recorder = WorkRecorder(manifest.run_id, PEER, manifest.batch_size_per_step)
        train = record = 0.0
        for epoch in range(2):  # the first epoch warms up allocations; the second is measured
            train = record = 0.0
            began = time.thread_time()
            recorder.begin_epoch(epoch, recomputer.params)
            record += time.thread_time() - began
            for step in range(steps):
                began = time.thread_time()
                recomputer.step_gradient(PEER, epoch, step)
                marked = time.thread_time()
                recorder.record_step(epoch, step, recomputer.params)
                ended = time.thread_time()
                train, record = train + marked - began, record + ended - marked
            began = time.thread_time()
            assert recorder.end_epoch(epoch, completed=True) is not None
            record += time.thread_time() - began
        print(f"{name:<42} {sum(p.numel() for p in recomputer.params):>11,} {1000 * train / steps:>9.2f} "
              f"{1000 * record / steps:>10.3f} {record / train:>14.1%}")


def start_states(manifest: Manifest) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(state at the start of EPOCH - 1, state at the start of EPOCH): local training from the run's initial model."""
    r = Recomputer(manifest)
    optimizer = torch.optim.Adam(r.params, lr=1e-3)
    before = None
    for step in range(WARMUP_STEPS):
        if step == WARMUP_STEPS - 1:
            before = [p.detach().clone() for p in r.params]
        optimizer.zero_grad()
        x, y = batch_for(r.dataset, manifest.run_id, b"warmup", 0, step, manifest.batch_size_per_step)
        r.loss_fn(r.model(x), y).backward()
        optimizer.step()
    return before, [p.detach().clone() for p in r.params]


def sketches(manifest: Manifest, state, peer: bytes, epoch: int, steps: int, basis: SketchBasis,
             batch=None, autocast: bool = False) -> list[bytes]:
    r = Recomputer(manifest)
    r.load(state)
    out = []
    for step in range(steps):
        x, y = batch_for(r.dataset, manifest.run_id, peer, epoch, step, manifest.batch_size_per_step)
        if batch is not None:
            x, y = x[:batch], y[:batch]
        r.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = r.loss_fn(r.model(x).float(), y)
        loss.backward()
        out.append(basis.sketch_grads(r.params))
    return out


def worker(args) -> None:
    """The honest recomputation in another process, another thread count."""
    torch.set_num_threads(args.threads)
    manifest = manifests()[args.model]
    state = torch.load(args.state, weights_only=True)
    basis = SketchBasis(args.seed, sum(t.numel() for t in state))
    Path(args.out).write_bytes(b"".join(sketches(manifest, state, PEER, EPOCH, args.steps, basis)))


def stats(values: list[int]) -> str:
    return f"{min(values):>10,} {int(statistics.median(values)):>10,} {max(values):>10,}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model"), parser.add_argument("--state"), parser.add_argument("--out")
    parser.add_argument("--seed", type=int), parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record-cost", action="store_true", help="measure what recording work costs a trainer")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    torch.set_num_threads(1)
    if args.record_cost:
        print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
              f"{args.steps} steps, thread CPU time")
        return record_cost(args.steps)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.steps} steps per "
          f"row; sketch distance in ppm of the recomputation's norm (tolerance: fp32 {TOLERANCE_PPM['fp32']:,}, "
          f"mixed precision {TOLERANCE_PPM['bf16']:,})")
    for name, manifest in manifests().items():
        before, state = start_states(manifest)
        n = args.steps
        seed = sketch_seed(manifest.run_id, EPOCH, state_digest(state))
        basis = SketchBasis(seed, sum(t.numel() for t in state))
        claimed = sketches(manifest, state, PEER, EPOCH, n, basis)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / "state.pt")
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--worker", "--model", name,
                            "--state", str(Path(tmp) / "state.pt"), "--out", str(Path(tmp) / "out"),
                            "--seed", str(seed), "--steps", str(n), "--threads", "2"],
                           check=True, timeout=600)
            data = (Path(tmp) / "out").read_bytes()
            other_process = [data[i:i + 128] for i in range(0, len(data), 128)]
            worker_s = time.perf_counter() - started
        b = manifest.batch_size_per_step
        rows = {
            "honest, other process, 2 threads": other_process,
            "honest, bf16 autocast": sketches(manifest, state, PEER, EPOCH, n, basis, autocast=True),
            f"fewer samples ({b - b // 16}/{b})": sketches(manifest, state, PEER, EPOCH, n, basis, batch=b - b // 16),
            f"fewer samples ({b // 2}/{b})": sketches(manifest, state, PEER, EPOCH, n, basis, batch=b // 2),
            "stale (previous epoch's state and batch)": sketches(manifest, before, PEER, EPOCH - 1, n, basis),
            "another peer's batch": sketches(manifest, state, OTHER, EPOCH, n, basis),
        }
        norms = [torch.frombuffer(bytearray(s), dtype=torch.float32).norm() for s in claimed]
        gen = torch.Generator().manual_seed(3)
        rows["random, same norm"] = []
        for s, norm in zip(claimed, norms):
            fake = torch.randn(32, generator=gen)
            rows["random, same norm"].append((fake / fake.norm() * norm).numpy().astype("<f4").tobytes())
        rows["zeros"] = [bytes(128)] * n
        print(f"\n{name}  ({sum(t.numel() for t in state):,} parameters, batch {b}; worker process {worker_s:.1f} s)")
        print(f"{'claimed vs recomputation':<42} {'min':>10} {'median':>10} {'max':>10}")
        for label, values in rows.items():
            print(f"{label:<42} {stats([distance_ppm(v, c) for v, c in zip(values, claimed)])}")
        # whole epoch: the mean of the step sketches (the sketch is linear), honest vs 90% of the steps
        def mean(sk, count):
            vectors = [torch.frombuffer(bytearray(s), dtype=torch.float32).double() for s in sk[:count]]
            return (sum(vectors) / count).float().numpy().astype("<f4").tobytes()
        whole = mean(claimed, n)
        print(f"{'epoch contribution, other process':<42} {distance_ppm(mean(other_process, n), whole):>10,}")
        print(f"{'epoch contribution, 90% of the steps':<42} {distance_ppm(mean(claimed, n * 9 // 10), whole):>10,}")


if __name__ == "__main__":
    main()
