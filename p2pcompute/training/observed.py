"""Our subclasses of hivemind's averagers and Optimizer: startable from any thread, every round observed for credit claims.

Changes to hivemind's behaviour, all by subclassing:

* hivemind starts an averager with `run_in_background`, which calls `signal.signal(SIGINT, SIG_IGN)`
  in the *parent*: that works only in the main thread and silently disables Ctrl-C for the whole
  node. Ours ignore SIGINT in the averager child instead, so a trainer can (re)join a run from any
  thread (pause/resume) and the node keeps its Ctrl-C handling.
* Every averaging round (gradients and state) carries our payload in hivemind's all-gather: the
  averager sends `[hivemind's own gather value, payload]` and a `RoundObserver` records, per
  round, the group members and every member's payload. This is where signed claims ride (DESIGN:
  Credits). hivemind reads the gathered values only when `sync_epoch_when_averaging=True`, which we
  never set; otherwise it only counts them.
* Parts travel on our raw-frame data plane (training/dataplane/, RawAllReduceMixin), 1.6-2x faster
  than hivemind's per round (docs/benchmarks.md).
* Shutting down with a round in flight works (hivemind's `_shutdown` raises then, see `_shutdown`).
* A downloaded state is checked against our own layout before use, and hivemind.Optimizer's
  `load_state_from_peers` stops retrying after load_state_timeout (hivemind's loops forever).
* The progress tracker is ours (tracker.py): heartbeat reports, so that a peer that vanished leaves the
  epoch accounting within metadata_expiration.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import signal
import threading
from functools import partial
from typing import Any, Callable, Optional

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager

from p2pcompute.retry import retry_until
from p2pcompute.training.dataplane import RawAllReduceMixin
from p2pcompute.training.tracker import SwarmProgressTracker

logger = logging.getLogger(__name__)

MAX_RECORDED_ROUNDS = 256  # rounds kept in memory for the claims layer to pick up (a few minutes of epochs)
# How long a stopping averager waits for the DHT process to have read its last requests (see _shutdown).
DHT_BARRIER_TIMEOUT = 5.0

Payload = Callable[[str], Any]  # round kind ("gradients" / "state" / "outer") -> msgpack-able data sent to group mates


@dataclasses.dataclass(frozen=True)
class AveragingRound:
    """One finished averaging round as this peer saw it."""

    kind: str  # "gradients", "state" (hivemind.Optimizer) or "outer" (local mode, diloco.py)
    ok: bool
    members: tuple[bytes, ...]  # PeerIDs of the group (bytes), in hivemind's order; empty if the round failed
    payloads: dict[bytes, Any]  # PeerID -> the payload that member sent (untrusted; the claims layer checks it)
    error: str = ""
    # PeerID -> the averaging weight (samples) that member sent us as its reducer, absent if we reduced none of it;
    # under our own PeerID, the weight we sent
    weights: dict[bytes, float] = dataclasses.field(default_factory=dict)


class RoundObserver:
    """Supplies our gather payload for each round and records the outcome of every round (thread-safe)."""

    def __init__(self, payload: Payload | None = None, max_rounds: int = MAX_RECORDED_ROUNDS):
        self._payload = payload
        self._lock = threading.Lock()
        self._rounds: collections.deque[AveragingRound] = collections.deque(maxlen=max_rounds)

    def payload(self, kind: str) -> Any:
        return self._payload(kind) if self._payload is not None else None

    def record(self, kind: str, control) -> None:
        """Done-callback of a StepControl (runs in hivemind's future thread)."""
        error = "cancelled" if control.cancelled() else control.exception(timeout=0)
        if error is not None:
            entry = AveragingRound(kind, False, (), {}, repr(error)[:200])
        else:
            gathered = control.result(timeout=0) or {}
            members = tuple(peer.to_bytes() for peer in gathered)
            parts = {peer.to_bytes(): _our_part(value) for peer, value in gathered.items()}
            payloads = {peer: payload for peer, (payload, _weight) in parts.items()}
            weights = {peer: weight for peer, (_payload, weight) in parts.items() if weight is not None}
            entry = AveragingRound(kind, True, members, payloads, weights=weights)
        with self._lock:
            self._rounds.append(entry)

    def rounds(self) -> list[AveragingRound]:
        with self._lock:
            return list(self._rounds)


def log_download_failure(error: BaseException) -> None:
    """How a failed state download is reported before the next attempt (retry_until's on_failure)."""
    logger.info("state download failed (%s: %s); retrying", type(error).__name__, error)


def _our_part(value: Any) -> tuple[Any, float | None]:
    """(our payload, the weight we received) from one member's gathered value: [[hivemind's, payload], weight]
    on our data plane (dataplane/averagers.py), [hivemind's, payload] on hivemind's own."""
    weight = None
    if isinstance(value, list) and len(value) == 2 and (value[1] is None or isinstance(value[1], float)) \
            and isinstance(value[0], list):
        value, weight = value
    payload = value[1] if isinstance(value, list) and len(value) == 2 else None
    return payload, weight


class ObservedAverager(DecentralizedAverager):
    """Mixin placed right above DecentralizedAverager in the MRO, so hivemind's own `super().step(...)`
    calls (GradientAverager.schedule_step, TrainingStateAverager._do) pass through `step` here."""

    _observer: RoundObserver
    _round_kind: str

    def step(self, gather: Any = None, scheduled_time: Optional[float] = None, weight: Optional[float] = None,
             timeout: Optional[float] = None, allow_retries: bool = True, require_trigger: bool = False,
             wait: bool = True):
        control = super().step([gather, self._observer.payload(self._round_kind)], scheduled_time, weight,
                               timeout, allow_retries, require_trigger, wait=False)
        control.add_done_callback(partial(self._observer.record, self._round_kind))
        return control.result() if wait else control

    def run_in_background(self, await_ready: bool = True, timeout: Optional[float] = None) -> None:
        self.start()
        if await_ready:
            self.wait_until_ready(timeout)

    def run(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
        super().run()

    def load_state_from_peers(self, wait: bool = True, timeout: Optional[float] = None):
        """hivemind's download, with the state checked before anyone uses it: a peer's tensors must match the
        layout of the state we would serve ourselves (count, shapes, dtypes) and be finite. hivemind copies
        whatever arrives; a wrong shape raised inside hivemind.Optimizer's retry loop, forever."""
        result = super().load_state_from_peers(wait=wait, timeout=timeout)
        if not wait or result is None:
            return result
        metadata, tensors = result
        problem = _state_problem(metadata, tensors, self.get_current_state()[1])
        if problem is not None:
            logger.warning("a peer sent an unusable state (%s); ignored", problem)
            return None
        return result

    async def _shutdown(self, timeout: Optional[float]) -> None:
        # hivemind's own _shutdown calls .finalize() on the futures of the running groups (a future holds the
        # group's runner) and adds its None result to a set: with a round in flight it raised
        # "'_asyncio.Future' object has no attribute 'finalize'" and skipped the rest. Same steps, fixed:
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().finalize(cancel=True)
            else:
                future.cancel()
        # Each DHT request carries an MPFuture whose pipe the DHT process fetches from *this* process
        # (multiprocessing's resource sharer). A request still queued when we exit fails there and the
        # DHT process sleeps wait_timeout (3 s) after each such failure, stalling every other caller.
        # One last round trip, answered only after all our earlier requests were read, prevents that.
        try:
            await asyncio.wait_for(self.dht.run_coroutine(_dht_barrier, return_future=True), DHT_BARRIER_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning("the DHT did not answer the averager's last request within %.0f s", DHT_BARRIER_TIMEOUT)


async def _dht_barrier(_dht, _node) -> None:
    return None


def _state_problem(metadata: Any, tensors: Any, expected) -> Optional[str]:
    """Why a downloaded state does not fit ours, or None."""
    if not isinstance(metadata, dict):
        return f"metadata {str(metadata)[:60]!r}"
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(expected):
        return f"{len(tensors) if isinstance(tensors, (list, tuple)) else '?'} tensors instead of {len(expected)}"
    for i, (got, want) in enumerate(zip(tensors, expected)):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return f"tensor {i} is not {tuple(want.shape)} {want.dtype}"
        if got.is_floating_point() and not torch.isfinite(got).all():
            return f"tensor {i} has non-finite values"
    return None


# Averagers of one run must all use the same data plane: ours (RawAllReduceMixin) moves parts as raw frames on
# its own stream protocol, which a peer on hivemind's stock protobuf all-reduce does not speak.
class ObservedGradientAverager(RawAllReduceMixin, GradientAverager, ObservedAverager):
    def __init__(self, *args, observer: RoundObserver, **kwargs):
        self._observer, self._round_kind = observer, "gradients"
        super().__init__(*args, **kwargs)


class ObservedStateAverager(RawAllReduceMixin, TrainingStateAverager, ObservedAverager):
    def __init__(self, *args, observer: RoundObserver, **kwargs):
        self._observer, self._round_kind = observer, "state"
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        """What a peer downloading our state gets, as a snapshot. hivemind hands out the live
        shared-memory tensors, which the averager process serializes later while training keeps
        updating them: measured here, a download came out several epochs newer than its label, and
        it could mix tensors of different epochs. Copies taken under the optimizer lock (no step runs
        meanwhile) are consistent; the epoch label may still be one ahead, as hivemind increments it
        just before the step."""
        with self.lock_optimizer:
            metadata, tensors, infos = super().get_current_state()
            return metadata, [tensor.detach().clone() for tensor in tensors], infos


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer (gradient averaging mode) whose gradient and state averagers are the observed ones
    above, on our data plane. Local updates are diloco.LocalUpdatesOptimizer, not hivemind's."""

    def __init__(self, *, observer: RoundObserver, **kwargs):
        self._observer = observer
        kwargs["grad_averager_factory"] = partial(ObservedGradientAverager, observer=observer)
        super().__init__(**kwargs)

    def load_state_from_peers(self, **kwargs) -> None:
        """hivemind.Optimizer.load_state_from_peers with the retries bounded by load_state_timeout (hivemind
        retries failed downloads forever, and each attempt may take load_state_timeout). A peer that gets no
        state in time trains on from its own and is healed by the next state-averaging round."""
        if self.scheduled_grads is not None and not self.scheduled_grads.done():
            self._tag_along_with_zero_weight(self.scheduled_grads)
            self.scheduled_grads = None
        self.state_averager.step(wait_for_delayed_updates=True)

        def download(remaining: float) -> bool:
            self.state_averager.load_state_from_peers(timeout=remaining, **kwargs)
            if self.grad_averager is not None:
                self.grad_averager.load_state_from_peers(timeout=remaining, **kwargs)
            return True

        with self.tracker.pause_updates():
            # hivemind's own loop catches every exception here too, then retries
            if retry_until(download, self.load_state_timeout, retry_on=(Exception,),
                           on_failure=log_download_failure) is None:
                logger.warning("no peer sent the run's state within %.0f s; training on from our own",
                               self.load_state_timeout)
            if self.tracker.global_epoch - 1 <= self.local_epoch < self.tracker.global_epoch:
                self.state_averager.local_epoch = self.tracker.global_epoch
            self.tracker.report_local_progress(local_epoch=self.local_epoch, samples_accumulated=0)
            if not self.client_mode:
                self.state_averager.state_sharing_priority = self.local_epoch
            if self.use_gradient_averaging:
                self.grad_averager.reset_accumulated_grads_()
                if not self.client_mode:
                    self.grad_averager.state_sharing_priority = self.local_epoch

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> SwarmProgressTracker:
        # hivemind.Optimizer._make_progress_tracker with our class (heartbeat reports, see tracker.py)
        return SwarmProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                    client_mode=self.client_mode, status_loglevel=self.status_loglevel, start=True,
                                    **kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # hivemind.Optimizer._make_state_averager with our class (hivemind builds its class directly), and
        # initialize_optimizer=False: the optimizer factory must allocate its state itself (see
        # runs.optimizers.optimizer_factory(with_state=True)); hivemind's own way shifts Adam's step count.
        return ObservedStateAverager(
            observer=self._observer,
            initialize_optimizer=False,
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )
