"""The idle policy: pure decisions (train or pause, and why) from GPU readings, schedule windows and the clock.

No I/O here: readings come in as plain records (training/nvml.py reads them), time comes in as
arguments. `assess` judges one moment; `advance` adds hysteresis, so training resumes only after the
device has stayed idle for `resume_after` seconds while pausing is immediate (the owner comes first).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from p2pcompute.errors import ConfigError

MINUTES_PER_DAY = 24 * 60
_WINDOW = re.compile(r"^\s*([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-3]):([0-5]\d)\s*$")
MAX_WINDOWS = 16  # a schedule is a handful of windows; bounds what a config string can ask us to check


@dataclasses.dataclass(frozen=True)
class Window:
    """Minutes of the day [start, end); end < start wraps past midnight ("22:00-07:00")."""

    start: int
    end: int

    def contains(self, minute: int) -> bool:
        if self.start <= self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


def parse_schedule(text: str) -> tuple[Window, ...]:
    """"22:00-07:00,12:00-13:00" -> windows; "" -> () (always allowed). ConfigError names the bad part."""
    if not text.strip():
        return ()
    windows = []
    for part in text.split(","):
        match = _WINDOW.match(part)
        if match is None:
            raise ConfigError(f"schedule: {part.strip()!r} is not a window like 22:00-07:00")
        h1, m1, h2, m2 = map(int, match.groups())
        if (h1, m1) == (h2, m2):
            raise ConfigError(f"schedule: window {part.strip()!r} is empty (use 00:00-23:59 for all day)")
        windows.append(Window(h1 * 60 + m1, h2 * 60 + m2))
    if len(windows) > MAX_WINDOWS:
        raise ConfigError(f"schedule: at most {MAX_WINDOWS} windows")
    return tuple(windows)


@dataclasses.dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment, as NVML reports it. `ours` fields count this node's processes only."""

    index: int
    utilization: float  # percent of time a kernel ran, all processes
    memory_total: int  # bytes
    memory_used: int  # bytes, all processes
    memory_ours: int = 0  # bytes held by our processes
    utilization_ours: float | None = None  # percent by our processes, when NVML has per-process samples

    @property
    def memory_others(self) -> int:
        return max(0, self.memory_used - self.memory_ours)


@dataclasses.dataclass(frozen=True)
class IdlePolicy:
    max_other_utilization: float = 10.0  # percent of GPU time others may use before we pause (config idle_gpu_util)
    max_memory_fraction: float = 0.9  # the share of GPU memory we may take; others holding more than the rest pauses us
    schedule: tuple[Window, ...] = ()  # when training is allowed; () = any time
    resume_after: float = 60.0  # seconds the device must stay idle before we resume (no flapping)


@dataclasses.dataclass(frozen=True)
class Decision:
    train: bool
    reason: str


def assess(policy: IdlePolicy, gpu: GpuReading | None, minute_of_day: int, training: bool) -> Decision:
    """Judge one moment. `gpu` is the reading of the device we train on (None: CPU, or no NVML);
    `training` says whether our process is using the GPU now (then, without per-process utilisation,
    the device's utilisation is ours and only memory tells us about others)."""
    if policy.schedule and not any(w.contains(minute_of_day) for w in policy.schedule):
        return Decision(False, f"outside the schedule ({', '.join(map(str, policy.schedule))})")
    if gpu is None:
        return Decision(True, "no GPU to watch: schedule only")
    others_util = _utilization_by_others(gpu, training)
    if others_util is not None and others_util > policy.max_other_utilization:
        return Decision(False, f"GPU {gpu.index} busy: {others_util:.0f}% used by other processes "
                               f"(limit {policy.max_other_utilization:.0f}%)")
    room = gpu.memory_total * (1.0 - policy.max_memory_fraction)
    if gpu.memory_others > room:
        return Decision(False, f"GPU {gpu.index}: other processes hold {gpu.memory_others >> 20} MiB, more than "
                               f"the {room / 2**20:.0f} MiB left to them by max_memory_fraction")
    return Decision(True, f"GPU {gpu.index} idle")


def _utilization_by_others(gpu: GpuReading, training: bool) -> float | None:
    if gpu.utilization_ours is not None:
        return max(0.0, gpu.utilization - gpu.utilization_ours)
    if not training:
        return gpu.utilization
    return None  # cannot tell ours from theirs; memory held by others still counts


@dataclasses.dataclass(frozen=True)
class IdleState:
    training: bool = False
    idle_since: float | None = None  # when the device was first seen idle while we were paused


def advance(policy: IdlePolicy, state: IdleState, moment: Decision, now: float) -> tuple[IdleState, Decision]:
    """Hysteresis over `assess`: pause at once, resume only after `resume_after` idle seconds."""
    if not moment.train:
        return IdleState(False, None), moment
    if state.training:
        return state, moment
    idle_since = state.idle_since if state.idle_since is not None else now
    waited = now - idle_since
    if waited >= policy.resume_after:
        return IdleState(True, None), Decision(True, f"{moment.reason}; idle for {waited:.0f} s")
    return IdleState(False, idle_since), Decision(
        False, f"{moment.reason}; resuming after {policy.resume_after:.0f} s idle ({waited:.0f} s so far)")


def pick_reading(readings: Sequence[GpuReading] | None, index: int) -> GpuReading | None:
    if not readings:
        return None
    return next((r for r in readings if r.index == index), None)
