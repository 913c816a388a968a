"""Whether a swarm of trainer workers is healthy: when its peers fell in step, and the share of time they computed.

The measurement reads only what each worker's trainer reports about itself in its status file (epoch, samples,
`training_seconds` and `epoch_end_seconds`: the seconds its training thread spent in steps that ended an epoch,
i.e. waiting for averaging rounds, downloading state, taking outer steps). `analyze` is pure; `Swarm` starts the
workers (a bootstrap peer and N workers, all at once or one at a time) and `watch` samples them.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

from p2pcompute.devtools.peers import PeerGroup, TrainerWorker
from p2pcompute.errors import NodeProcessError
from p2pcompute.node.launcher import NodeProcess
from p2pcompute.retry import poll_until

IN_STEP = 1  # epochs two peers may be apart and still count as in step (one may have just ended an epoch)
SAMPLE_PERIOD = 0.5  # seconds between looks at the status files (workers rewrite them every second)
START_TIMEOUT = 90.0  # seconds for a worker (cold imports, p2pd) or the bootstrap to come up on a loaded 2-core box
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@dataclasses.dataclass(frozen=True)
class Sample:
    """The peers' self-reports at one moment (harness clock `t`); -1 / 0 for a peer that has not reported yet."""

    t: float
    epochs: tuple[int, ...]
    samples: tuple[int, ...]
    trained: tuple[float, ...]  # training_seconds
    waited: tuple[float, ...]  # epoch_end_seconds

    @classmethod
    def of(cls, statuses: Sequence[dict], t: float) -> "Sample":
        return cls(t, tuple(s.get("epoch", -1) for s in statuses), tuple(s.get("samples_done", 0) for s in statuses),
                   tuple(float(s.get("training_seconds", 0.0)) for s in statuses),
                   tuple(float(s.get("epoch_end_seconds", 0.0)) for s in statuses))

    @property
    def all_training(self) -> bool:
        return all(e >= 0 for e in self.epochs) and all(t > 0 for t in self.trained)

    @property
    def in_step(self) -> bool:
        return self.all_training and max(self.epochs) - min(self.epochs) <= IN_STEP


@dataclasses.dataclass(frozen=True)
class SteadyState:
    """What `analyze` found. Epochs are the slowest peer's; `rounds` counts the epochs from the moment every peer
    trained to the moment they were in step and stayed so; the shares are over the time since then."""

    start_epoch: int | None  # when the last peer began training
    steady_epoch: int | None  # from when all stayed within IN_STEP epochs (None: not, or not since long enough)
    end_epoch: int
    compute_share: float | None  # the lowest of the peers' 1 - (epoch-end seconds / training seconds)
    shares: tuple[float, ...]
    epoch_seconds: float | None  # median seconds per epoch of the slowest peer since the steady point
    samples_per_s: float | None  # the swarm's, since the steady point

    @property
    def rounds(self) -> int | None:
        if self.start_epoch is None or self.steady_epoch is None:
            return None
        return self.steady_epoch - self.start_epoch

    @property
    def measured_epochs(self) -> int:
        return 0 if self.steady_epoch is None else self.end_epoch - self.steady_epoch

    def healthy(self, max_rounds: int, min_share: float) -> bool:
        return (self.rounds is not None and self.rounds <= max_rounds and self.compute_share is not None
                and self.compute_share >= min_share)


def analyze(samples: Sequence[Sample]) -> SteadyState:
    """The steady point of a run watched as `samples` (oldest first): the first sample from which every later one
    is in step; the compute share of each peer from there to the last sample."""
    start = next((i for i, s in enumerate(samples) if s.all_training), None)
    end_epoch = min(samples[-1].epochs) if samples else -1
    if start is None:
        return SteadyState(None, None, end_epoch, None, (), None, None)
    steady = None
    for i in range(len(samples) - 1, start - 1, -1):
        if not samples[i].in_step:
            break
        steady = i
    start_epoch = min(samples[start].epochs)
    if steady is None or min(samples[steady].epochs) == end_epoch:
        return SteadyState(start_epoch, None, end_epoch, None, (), None, None)
    first, last = samples[steady], samples[-1]
    shares = tuple(1 - (w1 - w0) / (t1 - t0) if t1 > t0 else 0.0
                   for w0, w1, t0, t1 in zip(first.waited, last.waited, first.trained, last.trained))
    changes = [s.t for prev, s in zip(samples[steady:], samples[steady + 1:]) if min(s.epochs) > min(prev.epochs)]
    gaps = [b - a for a, b in zip(changes, changes[1:])]
    rate = (sum(last.samples) - sum(first.samples)) / (last.t - first.t) if last.t > first.t else None
    return SteadyState(start_epoch, min(first.epochs), end_epoch, min(shares), shares,
                       statistics.median(gaps) if gaps else None, rate)


def epoch_waits(samples: Sequence[Sample], peer: int) -> list[float]:
    """Seconds peer `peer` waited in epoch ends between consecutive changes of its epoch over `samples` (a change
    of several epochs at once, a state download, counts as one)."""
    marks = [s.waited[peer] for prev, s in zip(samples, samples[1:]) if s.epochs[peer] != prev.epochs[peer]]
    return [b - a for a, b in zip(marks, marks[1:])]


def trace(samples: Sequence[Sample]) -> str:
    """One line per change of the peers' epochs: seconds, epochs, seconds waited in epoch ends (for messages)."""
    lines, last = [], None
    for s in samples:
        if s.epochs != last:
            lines.append(f"{s.t - samples[0].t:6.1f} s  epochs {list(s.epochs)}  waited {[round(w, 1) for w in s.waited]}")
            last = s.epochs
    return "\n".join(lines)


def watch(workers: Sequence[TrainerWorker], done: Callable[[list[Sample]], bool], timeout: float,
          clock: Callable[[], float] = time.monotonic) -> list[Sample]:
    """Sample the workers' status files every SAMPLE_PERIOD until `done(samples)` or `timeout` seconds; a worker
    that exits meanwhile raises NodeProcessError with its log's tail."""
    samples: list[Sample] = []
    deadline = clock() + timeout
    while clock() < deadline:
        check_alive(workers)
        samples.append(Sample.of([w.status() for w in workers], clock()))
        if done(samples):
            break
        time.sleep(SAMPLE_PERIOD)
    return samples


def steady_for(epochs: int, give_up_after: int) -> Callable[[list[Sample]], bool]:
    """A `watch` stop rule: `epochs` epochs measured since a steady point, or `give_up_after` epochs since the last
    peer began training without one."""
    def done(samples: list[Sample]) -> bool:
        found = analyze(samples)
        if found.steady_epoch is not None and found.measured_epochs >= epochs:
            return True
        return found.start_epoch is not None and found.end_epoch - found.start_epoch >= give_up_after

    return done


class Swarm(PeerGroup):
    """A `p2pc bootstrap` peer and trainer workers of one spec that bootstrap from it, in `directory`."""

    def __init__(self, directory: Path, spec: Path, worker_args: Sequence[str] = ()):
        super().__init__(directory)
        self.spec = spec
        self.worker_args = list(worker_args)
        self.workers: list[TrainerWorker] = []
        self.bootstrap = self.add(NodeProcess(["bootstrap"], self.directory / "bootstrap", ["--listen", LOOPBACK]))

    def start_bootstrap(self) -> str:
        self.bootstrap.start(timeout=START_TIMEOUT)
        return self.bootstrap.loopback_maddr()

    def start_worker(self, *args: str, name: str | None = None) -> TrainerWorker:
        """A worker `NAME` (default `w<i>`), not waited for: it reports through its status file."""
        worker = TrainerWorker(self.directory, name or f"w{len(self.workers)}", self.spec,
                               ["--initial-peers", self.bootstrap.loopback_maddr(), *self.worker_args, *args])
        self.workers.append(self.add(worker.start(wait=False)))
        return worker

    def start_at_once(self, peers: int) -> list[TrainerWorker]:
        self.start_bootstrap()
        return [self.start_worker() for _ in range(peers)]

    def start_one_at_a_time(self, peers: int, epochs_between: int = 1, timeout: float = 600.0) -> list[TrainerWorker]:
        """Each next worker starts once every running one has trained `epochs_between` epochs since the last start
        (`p2pcompute.retry.Timeout` after `timeout` seconds of one wait)."""
        self.start_bootstrap()
        for _ in range(peers):
            running = list(self.workers)
            marks = [max(0, w.epoch()) for w in running]
            if running:
                def trained() -> bool:
                    check_alive(running)
                    return all(w.epoch() >= m + epochs_between for w, m in zip(running, marks))

                poll_until(trained, timeout, interval=SAMPLE_PERIOD, what="the running workers' next epochs")
            self.start_worker()
        return list(self.workers)


def check_alive(workers: Sequence[TrainerWorker]) -> None:
    """NodeProcessError with the log's tail of the first worker that exited."""
    for worker in workers:
        if not worker.alive():
            raise NodeProcessError(f"{worker.name} exited early: {worker.log_tail()}")
