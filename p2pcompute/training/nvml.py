"""GPU readings from NVML (nvidia-ml-py, imported lazily) and the watcher thread that applies the idle policy to a trainer."""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from typing import Callable, Collection

from p2pcompute.training.idle import Decision, GpuReading, IdlePolicy, IdleState, advance, assess, pick_reading

logger = logging.getLogger(__name__)

WATCH_PERIOD = 5.0  # seconds between readings: NVML utilisation is itself a ~1 s average; cheap to read


def read_gpus(our_pids: Collection[int]) -> list[GpuReading] | None:
    """Every GPU's utilisation and memory, with our processes' share; None without NVML or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        logger.debug("NVML unavailable: %s", e)
        return None
    try:
        readings = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            processes = (list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
                         + list(pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle)))
            ours = sum(p.usedGpuMemory or 0 for p in processes if p.pid in our_pids)
            readings.append(GpuReading(
                index=index,
                utilization=float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                memory_total=int(memory.total), memory_used=int(memory.used), memory_ours=int(ours),
                utilization_ours=_our_utilization(pynvml, handle, our_pids),
            ))
        return readings
    except pynvml.NVMLError as e:
        logger.warning("reading the GPU through NVML failed: %s", e)
        return None
    finally:
        pynvml.nvmlShutdown()


def _our_utilization(pynvml, handle, our_pids: Collection[int]) -> float | None:
    """Our processes' SM utilisation from NVML's recent per-process samples, if the driver keeps them."""
    try:
        samples = pynvml.nvmlDeviceGetProcessUtilization(handle, 0)
    except pynvml.NVMLError:  # not supported on this GPU/driver, or no samples yet
        return None
    return float(sum(s.smUtil for s in samples if s.pid in our_pids))


class IdleWatcher:
    """Reads the device every `period` seconds and pauses/resumes the trainer by the idle policy.

    `read` and `clock`/`minute_of_day` are injectable (tests feed synthetic readings)."""

    def __init__(self, trainer, policy: IdlePolicy, gpu_index: int | None,
                 read: Callable[[], list[GpuReading] | None] | None = None, period: float = WATCH_PERIOD,
                 clock: Callable[[], float] = time.monotonic,
                 minute_of_day: Callable[[], int] = lambda: _local_minute(datetime.datetime.now())):
        self.trainer, self.policy, self.gpu_index = trainer, policy, gpu_index
        self._read = read or (lambda: read_gpus({os.getpid()}))
        self.period, self._clock, self._minute = period, clock, minute_of_day
        self.state = IdleState(training=True)
        self.decision = Decision(True, "starting")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> Decision:
        """One reading and decision, applied to the trainer."""
        readings = self._read() if self.gpu_index is not None else None
        moment = assess(self.policy, pick_reading(readings, self.gpu_index or 0), self._minute(), self.state.training)
        was_training = self.state.training
        self.state, self.decision = advance(self.policy, self.state, moment, self._clock())
        if was_training and not self.state.training:
            self.trainer.pause(self.decision.reason)
        elif self.state.training and not was_training:
            self.trainer.resume()
        return self.decision

    def start(self) -> "IdleWatcher":
        self._thread = threading.Thread(target=self._run, name="idle-watcher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.check()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.period + 1)


def _local_minute(now: datetime.datetime) -> int:
    return now.hour * 60 + now.minute
