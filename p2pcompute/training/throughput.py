"""How fast this machine trains a run now: a short timed loop of the run's own training step, in this process."""

from __future__ import annotations

import time

from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.model_specs import DataShape

WARMUP_STEPS = 1  # the first step allocates buffers and optimizer state: not timed
MEASURE_SECONDS = 1.0  # timed steps run at least this long (and MIN_TIMED_STEPS), so one slow step is averaged out
MIN_TIMED_STEPS = 3
# A warm-up step slower than this ends the measurement there (its rate, allocations included, is the result):
# a big model on a CPU would otherwise hold the caller for minutes.
MAX_STEP_SECONDS = 5.0
# What the swarm optimizer's step adds to each local step (hivemind.Optimizer: accumulating into its shared
# buffers, reporting progress; ours in local mode: the inner step's bookkeeping and the same reports): ~1 ms on a
# loaded 2-core box, as long as mlp-synthetic's forward and backward (a trainer of it alone spent 46-50% of its
# time in opt.step()). Negligible for bigger models.
SWARM_STEP_OVERHEAD_S = 0.001
# Above this many parameters a run is not measured (model, gradients and optimizer state would take over
# ~0.5 GB in the node's own process); the caller assumes a rate instead.
MAX_PARAMETERS = 30_000_000
# Threads of the second measurement on a CPU (see fastest): one, the rate a core gives however loaded the others are.
SINGLE_THREAD = 1


def measure(manifest: Manifest, device_name: str = "cpu", seconds: float = MEASURE_SECONDS) -> float:
    """Samples/s of the run's training step on this device, wall clock, with this process's torch threads.

    The step is the trainer's between rounds: forward and backward on a batch_size_per_step batch, then, in
    gradients mode, adding the gradients to an accumulator (hivemind steps the optimizer once per epoch), in
    local mode an optimizer step. Batches are random tensors of the dataset's shape: speed does not depend on
    the values, and no dataset file is needed. SWARM_STEP_OVERHEAD_S is added to each step. Wall clock on
    purpose: on a loaded machine the trainers get what this loop gets."""
    import torch

    from p2pcompute.runs.materialize import run_model
    from p2pcompute.runs.models import loss_function
    from p2pcompute.runs.optimizers import optimizer_factory
    from p2pcompute.training.device import synchronized_time

    if manifest.parameter_count > MAX_PARAMETERS:
        raise ValueError(f"{manifest.parameter_count:,} parameters is above the {MAX_PARAMETERS:,} measured here")
    device = torch.device(device_name)
    shape = manifest.data_shape
    model = run_model(manifest, with_init=False).to(device)  # speed does not depend on the weights
    optimizer = optimizer_factory(manifest.optimizer.name, manifest.optimizer.as_dict())(model.parameters())
    loss_fn = loss_function(shape.task)
    sums = [torch.zeros_like(p) for p in model.parameters()] if manifest.averaging.mode == "gradients" else None
    generator = torch.Generator().manual_seed(manifest.init_seed)
    size = manifest.batch_size_per_step

    def step() -> None:
        x, y = random_batch(shape, size, generator)
        loss_fn(model(x.to(device)), y.to(device)).backward()
        if sums is not None:
            with torch.no_grad():
                for total, p in zip(sums, model.parameters()):
                    total.add_(p.grad)
        else:
            optimizer.step()
        optimizer.zero_grad()

    started = synchronized_time(device)
    for _ in range(WARMUP_STEPS):
        step()
    warmed = synchronized_time(device)
    if warmed - started > MAX_STEP_SECONDS:
        return size / ((warmed - started) / WARMUP_STEPS + SWARM_STEP_OVERHEAD_S)
    steps = 0
    while steps < MIN_TIMED_STEPS or time.perf_counter() - warmed < seconds:
        step()
        steps += 1
    return size / ((synchronized_time(device) - warmed) / steps + SWARM_STEP_OVERHEAD_S)


def random_batch(shape: DataShape, size: int, generator) -> tuple:
    """(inputs, targets) of a dataset's shape, drawn at random."""
    import torch

    if shape.task == "lm":
        tokens = torch.randint(shape.outputs, (size, *shape.input_shape), generator=generator)
        return tokens, tokens
    if shape.vocab:  # token sequences
        x = torch.randint(shape.vocab, (size, *shape.input_shape), generator=generator)
    else:
        x = torch.randn(size, *shape.input_shape, generator=generator)
    if shape.task == "classification":
        return x, torch.randint(shape.outputs, (size,), generator=generator)
    return x, torch.randn(size, shape.outputs, generator=generator)


def fastest(manifest: Manifest, device_name: str = "cpu", seconds: float = MEASURE_SECONDS) -> float:
    """The higher of `measure` with this process's torch threads and, on a CPU, with SINGLE_THREAD.

    The publish check must not under-estimate a swarm's speed (its epochs would be too short), and a small model's
    intra-op threads slow each other down on a loaded machine: the demo's MLP measured 4,300-11,000 samples/s with
    torch's 2 threads at load 9 on 2 cores, 22,000-27,600 with one, while its three trainers did 65,000 together.
    torch's thread count is process-wide: the node's own trainer, if it trains meanwhile, runs on one thread for
    the second measurement (about `seconds`)."""
    import torch

    rate = measure(manifest, device_name, seconds)
    if device_name != "cpu" or torch.get_num_threads() == SINGLE_THREAD:
        return rate
    threads = torch.get_num_threads()
    torch.set_num_threads(SINGLE_THREAD)
    try:
        return max(rate, measure(manifest, device_name, seconds))
    finally:
        torch.set_num_threads(threads)
