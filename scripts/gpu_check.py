"""GPU readiness: train a run spec for a few steps on CUDA with mixed precision, through the node's own pieces.

    python scripts/gpu_check.py SPEC.toml [--steps 20] [--warmup 3] [--data-dir DIR] [--artifact-dir DIR ...]

The run's dataset, initial model (its initial weights and tokenizer resolved from DIR/artifacts and the
--artifact-dir directories), optimizer, reproducible batches and loss are the trainer's; the step is the
trainer's mixed-precision step: `torch.autocast` (bfloat16 where the GPU supports it, else float16) and, for
float16, `torch.amp.GradScaler` (scale, backward, step, update), per torch's documented AMP recipe. Prints the
device, the precision, peak memory and samples/s. Without a CUDA GPU it says so and exits with status 2 before
building anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NO_GPU_EXIT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("spec", type=Path, help="TOML run spec")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocations, cuDNN autotuning)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a node data dir: its datasets/ and artifacts/ are used")
    parser.add_argument("--artifact-dir", type=Path, nargs="*", default=[],
                        help="directories of files named by their sha256 (initial weights, tokenizers)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False; "
              f"a CPU build of torch, no NVIDIA driver, or no GPU). Nothing was run: install a CUDA build of torch on "
              f"a machine with an NVIDIA GPU and run this again.", file=sys.stderr)
        return NO_GPU_EXIT

    from p2pcompute.errors import P2PCError

    try:
        report = check(args)
    except P2PCError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return e.exit_code
    for key, value in report.items():
        print(f"{key:>18}: {value}")
    return 0


def check(args: argparse.Namespace) -> dict:
    import torch

    from p2pcompute.runs.artifacts import ArtifactStore
    from p2pcompute.runs.datasets import batch_for
    from p2pcompute.runs.manifest import Manifest
    from p2pcompute.runs.materialize import run_dataset, run_model
    from p2pcompute.runs.models import loss_function
    from p2pcompute.runs.optimizers import optimizer_factory
    from p2pcompute.training import device as devices

    manifest = Manifest.load(args.spec)
    data_dir = args.data_dir
    artifacts = ArtifactStore.for_data_dir(data_dir or Path("."), tuple(args.artifact_dir))
    device = devices.select_device("cuda", ("cuda",))
    dtype = devices.autocast_dtype(device)
    scaler = devices.grad_scaler(device, dtype)
    dataset = run_dataset(manifest, data_dir / "datasets" if data_dir else None, None, artifacts)
    model = run_model(manifest, artifacts).to(device)
    optimizer = optimizer_factory(manifest.optimizer.name, manifest.optimizer.as_dict())(model.parameters())
    loss_fn = loss_function(dataset.shape.task)
    size = manifest.batch_size_per_step
    torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> float:
        x, y = batch_for(dataset, manifest.run_id, b"p2pc/gpu-check", 0, i, size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with devices.autocast(device, dtype):
            loss = loss_fn(model(x), y)
        if scaler is not None:  # float16: scale the loss, unscale inside step (skipped on inf/nan), adapt the scale
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = None
    for i in range(args.warmup):
        first = step(i) if first is None else first
    started = devices.synchronized_time(device)
    last = None
    for i in range(args.warmup, args.warmup + args.steps):
        last = step(i)
    elapsed = devices.synchronized_time(device) - started
    return {
        "device": f"{device} {torch.cuda.get_device_name(device)}",
        "precision": f"autocast {dtype}" + (" + GradScaler" if scaler is not None else ""),
        "model": f"{manifest.model.name} {manifest.parameter_count:,} parameters",
        "batch": size,
        "peak memory": f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB "
                       f"(of {torch.cuda.get_device_properties(device).total_memory / 2**20:,.0f} MiB)",
        "samples/s": f"{args.steps * size / elapsed:,.1f} over {args.steps} steps",
        "loss": f"{first} -> {last}",
    }


if __name__ == "__main__":
    sys.exit(main())
