"""Training device choice (CPU/CUDA), GPU memory cap and mixed precision, through documented torch APIs only."""

from __future__ import annotations

import contextlib
import os
import time
from typing import ContextManager

import torch

from p2pcompute.errors import TrainingError


def select_device(preference: str, allowed: tuple[str, ...]) -> torch.device:
    """`preference` is the node config's device ("auto", "cpu", "cuda" or "cuda:N"); `allowed` the run's
    hardware.devices. auto: CUDA when present and allowed, else CPU."""
    cuda_ok = torch.cuda.is_available() and "cuda" in allowed
    if preference == "auto":
        if cuda_ok:
            return torch.device("cuda", torch.cuda.current_device())
        if "cpu" in allowed:
            return torch.device("cpu")
        raise TrainingError("the run needs a CUDA GPU and none is available")
    device = torch.device(preference)
    if device.type not in allowed:
        raise TrainingError(f"the run trains on {'/'.join(allowed)}, not on {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device cuda was asked for but torch sees no CUDA GPU")
    return device


def cpu_threads(requested: int = 0, cores: int | None = None) -> int:
    """torch's intra-op threads for the training thread (the trainer sets them explicitly): `requested` (the node
    config's cpu_threads) when set, else one core fewer than this process may run on, at least one. The core left
    over is for the swarm's own processes (p2pd, the DHT, the averagers), whose latency sets the pace of every
    round, and a compute-bound model's OpenMP workers no longer fight them for it (measured, 2 trainers of the demo
    run on 2 cores: 1.8x the samples/s of 2 threads each). Setting the count at all matters as much: a training
    thread that never set it ran steps of the swarm tests' MLP in 80 ms instead of under 1 ms in stretches (2-6
    epochs/s against 11-13 with the count set, 1 or 2: docs/benchmarks.md "CPU threads per trainer"). Several
    trainers on one machine (the demo) should share its cores: cpu_threads = cores // trainers."""
    if requested > 0:
        return requested
    return max(1, (usable_cores() if cores is None else cores) - 1)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def synchronized_time(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done (CUDA kernels run asynchronously: without the
    synchronize, time would be charged to whatever waits for them next)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def limit_memory(device: torch.device, fraction: float) -> None:
    """Cap this process's share of the GPU's memory (the caching allocator refuses beyond it)."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where the GPU supports it (no loss scaling needed), else float16; None on CPU (fp32)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> "torch.amp.GradScaler | None":
    """Loss scaling for float16 autocast. Gradients are accumulated by hivemind in separate buffers
    (reuse_grad_buffers=False), so the standard torch scaler is the right one (hivemind.GradScaler is
    for reuse_grad_buffers=True): it unscales the model's grads and skips the step on inf/nan."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)
