"""What the node remembers of the run it trains, for its page: one point per epoch (this node's and the swarm's loss,
throughput, peers, this node's share of the samples) and the ETA computed from them."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from p2pcompute.node.shared_dht import SharedDHT

if TYPE_CHECKING:
    from p2pcompute.node.training import TrainingSupervisor

logger = logging.getLogger(__name__)

HISTORY_PERIOD = 1.0  # seconds between looks at our trainer: an in-process read, and epochs last seconds or more
MAX_POINTS = 2000  # epochs kept per run: ~200 KB of JSON at most, and a chart has no more pixels than that
SWARM_TIMEOUT = 5.0  # seconds for the one DHT read of the swarm's progress made per epoch
ETA_WINDOW = 10  # the ETA extrapolates the pace of the last this many epochs (the swarm's size changes)


@dataclasses.dataclass(frozen=True)
class EpochPoint:
    """The run when this node reached `epoch` (its local epoch, i.e. the swarm's update it last applied)."""

    epoch: int
    time: float  # unix seconds
    loss: float | None  # this node's recent training loss
    swarm_loss: float | None  # the mean of the training peers' recent losses (their progress records)
    samples_per_second: float  # this node's
    swarm_samples_per_second: float
    peers: int  # peers training the run, as the swarm's progress shows
    samples: int  # samples this node contributed to the epoch just ended (0 when they were discarded)
    # this node's share of the swarm's throughput (its samples/s over the sum of the training peers'): peers may
    # each accumulate up to target_batch_size before a round closes, so samples over the target would say ~100%
    share: float | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def eta_seconds(points: Sequence[EpochPoint], max_epochs: int) -> float | None:
    """Seconds until epoch `max_epochs` at the pace of the last ETA_WINDOW epochs; None when the run has no end
    (max_epochs 0), is done, or there is no pace yet."""
    if not max_epochs or len(points) < 2:
        return None
    last = points[-1]
    if last.epoch >= max_epochs:
        return None
    first = points[max(0, len(points) - 1 - ETA_WINDOW)]
    epochs, seconds = last.epoch - first.epoch, last.time - first.time
    if epochs <= 0 or seconds <= 0:
        return None
    return (max_epochs - last.epoch) * seconds / epochs


class RunHistory:
    """A thread that records an EpochPoint each time our trainer enters a new epoch: `start()`, `shutdown()`,
    `snapshot()`. It starts over when the supervisor moves to another run."""

    def __init__(self, supervisor: "TrainingSupervisor", shared: SharedDHT, period: float = HISTORY_PERIOD,
                 clock: Callable[[], float] = time.time):
        self.supervisor = supervisor
        self.shared = shared
        self.period = period
        self.clock = clock
        self._lock = threading.Lock()
        self._run = None  # the SignedManifest the points are of
        self._points: collections.deque[EpochPoint] = collections.deque(maxlen=MAX_POINTS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "RunHistory":
        self._thread = threading.Thread(target=self._loop, name="run-history", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(SWARM_TIMEOUT + self.period + 1)

    def snapshot(self, tail: int | None = None) -> dict[str, Any] | None:
        """The run's points (the last `tail` of them, or all) and ETA; None before any run was trained."""
        with self._lock:
            run, points = self._run, list(self._points)
        if run is None:
            return None
        m = run.manifest
        shown = points[-tail:] if tail else points
        return {"run_id": run.run_id.hex(), "name": m.name, "max_epochs": m.max_epochs,
                "target_batch_size": m.target_batch_size, "eta_s": eta_seconds(points, m.max_epochs),
                "points": [p.to_json() for p in shown], "points_total": len(points)}

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.record()
            except Exception:  # a failed look (DHT hiccup) loses one point at most; never the thread
                logger.exception("run history: recording a point failed")

    def record(self) -> EpochPoint | None:
        """Look at the trainer once; add and return a point if it entered a new epoch (or a new run)."""
        signed, trainer = self.supervisor.current()
        if trainer is None:
            return None
        status = trainer.status()
        with self._lock:
            if self._run is None or self._run.run_id != signed.run_id:
                self._run, self._points = signed, collections.deque(maxlen=MAX_POINTS)
            last = self._points[-1] if self._points else None
        if last is not None and status.epoch <= last.epoch:
            return None
        point = self._point(signed, trainer, status, last)
        with self._lock:
            if self._run is signed:
                self._points.append(point)
        return point

    def _point(self, signed, trainer, status, last: EpochPoint | None) -> EpochPoint:
        from p2pcompute.training.progress import fetch_progress, summarize

        try:
            with self.shared.held() as dht:
                swarm = summarize(fetch_progress(dht, signed.run_id, timeout=SWARM_TIMEOUT))
        except TimeoutError:
            swarm = None
        samples = trainer.contributions().get(last.epoch, 0) if last is not None else 0
        swarm_rate = swarm.samples_per_second if swarm is not None else 0.0
        return EpochPoint(
            epoch=status.epoch, time=self.clock(), loss=status.loss,
            swarm_loss=swarm.loss if swarm is not None else None,
            samples_per_second=status.samples_per_second,
            swarm_samples_per_second=swarm.samples_per_second if swarm is not None else 0.0,
            peers=swarm.training_peers if swarm is not None else status.peers, samples=samples,
            share=min(1.0, status.samples_per_second / swarm_rate) if swarm_rate > 0 else None,
        )
