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
from hivemind.averaging.control import AveragingStage
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils import get_dht_time

from p2pcompute.retry import retry_until
from p2pcompute.training.dataplane import RawAllReduceMixin
from p2pcompute.training.tracker import SwarmProgressTracker

logger = logging.getLogger(__name__)

CANCELLED = "cancelled"  # the error of a round whose step we cancelled ourselves
MAX_RECORDED_ROUNDS = 256  # rounds kept in memory for the claims layer to pick up (a few minutes of epochs)
# How long a stopping averager waits for the DHT process to have read its last requests (see _shutdown).
DHT_BARRIER_TIMEOUT = 5.0
# How far past our own epoch a gradient round's group may take us (SwarmOptimizer), beyond what the tracker reports:
# the members of one round are at most one epoch apart in an honest swarm.
MAX_CATCH_UP = 1

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
    # PeerID -> the epoch that member declared in hivemind's gather slot (gradient rounds: see SwarmOptimizer)
    epochs: dict[bytes, int] = dataclasses.field(default_factory=dict)


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
        error = control.exception(timeout=0) if not control.cancelled() else None
        if control.cancelled() or error is not None:
            entry = AveragingRound(kind, False, (), {}, CANCELLED if error is None else repr(error)[:200])
        else:
            gathered = control.result(timeout=0) or {}
            members = tuple(peer.to_bytes() for peer in gathered)
            parts = {peer.to_bytes(): _parts(value) for peer, value in gathered.items()}
            payloads = {peer: payload for peer, (_gather, payload, _weight) in parts.items()}
            weights = {peer: weight for peer, (_gather, _payload, weight) in parts.items() if weight is not None}
            epochs = {peer: gather for peer, (gather, _payload, _weight) in parts.items() if _is_epoch(gather)}
            entry = AveragingRound(kind, True, members, payloads, weights=weights, epochs=epochs)
        log_round(entry)
        with self._lock:
            self._rounds.append(entry)

    def rounds(self) -> list[AveragingRound]:
        with self._lock:
            return list(self._rounds)


def log_round(entry: AveragingRound) -> None:
    """The one INFO line of a round (issue 14: a volunteer reads how rounds go without --debug)."""
    if entry.ok:
        logger.info("%s round done in a group of %d", entry.kind, len(entry.members))
    elif entry.error == CANCELLED:  # our own decision (the epoch moved on, a round skipped, leaving), not news
        logger.debug("%s round cancelled", entry.kind)
    else:
        logger.info("%s round failed: %s", entry.kind, readable_error(entry.error))


def readable_error(error: str) -> str:
    """hivemind's repr of a round's failure, as a volunteer reads it."""
    if "could not find a group" in error:
        return "could not find a group in time"
    return error


def log_download_failure(error: BaseException) -> None:
    """How a failed state download is reported before the next attempt (retry_until's on_failure)."""
    logger.info("state download failed (%s: %s); retrying", type(error).__name__, error)


def _parts(value: Any) -> tuple[Any, Any, float | None]:
    """(hivemind's gather value, our payload, the weight we received) from one member's gathered value (untrusted:
    None where it does not parse): [[hivemind's, payload], weight] on our data plane (dataplane/averagers.py),
    [hivemind's, payload] on hivemind's own."""
    weight = None
    if isinstance(value, list) and len(value) == 2 and (value[1] is None or isinstance(value[1], float)) \
            and isinstance(value[0], list):
        value, weight = value
    if isinstance(value, list) and len(value) == 2:
        return value[0], value[1], weight
    return None, None, weight


def round_epochs(gathered: dict) -> dict[bytes, int]:
    """PeerID -> the epoch that member of a gradient round declared in hivemind's gather slot (SwarmOptimizer fills it
    with the member's local epoch); what does not parse is left out."""
    gathers = {peer.to_bytes(): _parts(value)[0] for peer, value in gathered.items()}
    return {peer: gather for peer, gather in gathers.items() if _is_epoch(gather)}


def _is_epoch(gather: Any) -> bool:
    return type(gather) is int and gather >= 0


# The run's averaging settings that its gradient rounds take too (declare_state_period stays hivemind's: a gradient
# averager's state is downloaded only with the parameters', and declaring it as often would double the DHT traffic)
GRADIENT_AVERAGER_OPTS = ("request_timeout", "target_group_size", "part_size_bytes")
# min_matchmaking_times a gradient or parameter (state) round looks for a group before it gives up (see
# ObservedGradientAverager, ObservedStateAverager): a round begins when its epoch really ends, every peer there
# within a fraction of a second, so a group forms within one matchmaking time or its mates are gone or elsewhere
ROUND_PATIENCE = 3.0


class ObservedAverager(DecentralizedAverager):
    """Mixin placed right above DecentralizedAverager in the MRO, so hivemind's own `super().step(...)`
    calls (GradientAverager.schedule_step, TrainingStateAverager._do) pass through `step` here."""

    _observer: RoundObserver
    _round_kind: str

    # What fills hivemind's gather slot when hivemind leaves it empty (its gradient rounds): see SwarmOptimizer
    gather_default: Optional[Callable[[], Any]] = None
    # The group size last sent to the averager's process by expect_group (None: hivemind's target_group_size)
    _group_target: Optional[int] = None

    # set by interrupt(): the trainer is stopping, no wait for a round or download of ours may outlast that
    interrupted: bool = False
    # How long a round of this averager looks for a group, in multiples of min_matchmaking_time after its start
    # (None: until the step's timeout, hivemind's way). hivemind keeps looking (and retrying) until the deadline.
    matchmaking_patience: Optional[float] = None

    def step(self, gather: Any = None, scheduled_time: Optional[float] = None, weight: Optional[float] = None,
             timeout: Optional[float] = None, allow_retries: bool = True, require_trigger: bool = False,
             wait: bool = True):
        if gather is None and self.gather_default is not None:
            gather = self.gather_default()
        if self.matchmaking_patience is not None and timeout is not None:
            now, looking = get_dht_time(), self.matchmaking_kwargs["min_matchmaking_time"]
            start = now + looking if scheduled_time is None else scheduled_time
            timeout = min(timeout, start - now + self.matchmaking_patience * looking)
        control = super().step([gather, self._observer.payload(self._round_kind)], scheduled_time, weight,
                               timeout, allow_retries, require_trigger, wait=False)
        control.add_done_callback(partial(self._observer.record, self._round_kind))
        self._track(control)
        return control.result() if wait else control

    def _track(self, future) -> None:
        """Remember a round or download in flight, for interrupt(); one started after it is cancelled at once."""
        in_flight = self.__dict__.setdefault("_in_flight", set())
        in_flight.difference_update([f for f in list(in_flight) if f.done()])
        in_flight.add(future)
        if self.interrupted:
            future.cancel()

    def interrupt(self) -> None:
        """The trainer is stopping (any thread): cancel every round and state download of ours in flight, and each
        one started from now on. Whoever waits for one (the training thread in an epoch end, hivemind's step
        executor in a state round) goes on at once, as after a failed round, instead of waiting up to
        averaging_timeout for mates that may be gone (CI, 2026-12-08: a peer stopped while its round waited for
        a mate that had just stopped too took 30+ s to exit; with a frozen mate, the whole averaging_timeout).
        A group already formed finishes or fails in the averager's process without us, as when a peer leaves."""
        self.interrupted = True
        for future in list(self.__dict__.get("_in_flight", ())):
            if not future.done():
                future.cancel()

    def expect_group(self, size: int) -> None:
        """Let this averager's next group begin as soon as it has `size` members (within hivemind's
        target_group_size and min_group_size) instead of waiting out its leader's matchmaking deadline.
        Matchmaking runs in the averager's process: the new size goes there through hivemind's control pipe."""
        cap = self.matchmaking_kwargs["target_group_size"] or size
        size = max(self.matchmaking_kwargs["min_group_size"], min(size, cap))
        if size != self._group_target:
            self._group_target = size
            self._outer_pipe.send(("_expect_group", [size], {}))

    async def _expect_group(self, size: int) -> None:
        self._matchmaking.target_group_size = size

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
        future = super().load_state_from_peers(wait=False, timeout=timeout)
        self._track(future)
        if not wait:
            return future
        result = future.result(timeout=timeout)
        if result is None:
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
    # A gradient round that finds no group gives up after ROUND_PATIENCE matchmaking times and the epoch ends on our
    # own gradients (hivemind's way after a failed round) instead of looking until averaging_timeout: the mates it
    # expected left (a peer that stops says goodbye to the tracker, not to a round already looking for it) or are
    # in another round (see ObservedStateAverager). Measured: a peer whose mate stopped stepping waited 60 s.
    matchmaking_patience = ROUND_PATIENCE

    def __init__(self, *args, observer: RoundObserver, **kwargs):
        self._observer, self._round_kind = observer, "gradients"
        super().__init__(*args, **kwargs)


class ObservedStateAverager(RawAllReduceMixin, TrainingStateAverager, ObservedAverager):
    # A parameter round that finds no group within this many matchmaking times gives up (the next one, every
    # average_state_every epochs, heals what it missed) instead of looking until averaging_timeout. Two peers an
    # epoch apart are in different rounds at a state epoch, one in this round and the other in a gradient round:
    # each waited the whole averaging_timeout for the other (measured in the cut-link test: both survivors stalled
    # 20 s). Given up, this one goes on to its next epoch's gradient round, where the other still looks for it.
    matchmaking_patience = ROUND_PATIENCE

    def __init__(self, *args, observer: RoundObserver, **kwargs):
        self._observer, self._round_kind = observer, "state"
        super().__init__(*args, **kwargs)

    # Set by SwarmOptimizer for one epoch end: the swarm's parameter round of this epoch went on without us.
    skip_round = False

    def step(self, *args, averaging_round: bool = False, averaging_control=None, averaging_opts=None, **kwargs):
        """TrainingStateAverager.step, without the averaging round (a pre-scheduled one is cancelled) while
        `skip_round` is set."""
        if self.skip_round and averaging_round:
            if averaging_control is not None and not averaging_control.done():
                averaging_control.cancel()
            averaging_round, averaging_control, averaging_opts = False, None, None
        return super().step(*args, averaging_round=averaging_round, averaging_control=averaging_control,
                            averaging_opts=averaging_opts, **kwargs)

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
        # hivemind's Optimizer hands averager_opts to the state averager only (its docstring says both): the gradient
        # rounds ran with hivemind's defaults, a 3 s request_timeout (hence its "request_timeout smaller than
        # min_matchmaking_time" warning in every log at a 2 s matchmaking_time), no group size cap, 512 KiB parts
        grad_opts = {k: v for k, v in (kwargs.get("averager_opts") or {}).items() if k in GRADIENT_AVERAGER_OPTS}
        kwargs["grad_averager_factory"] = partial(ObservedGradientAverager, observer=observer, **grad_opts)
        self.downloads = 0  # state downloads so far (the trainer tells an epoch ended by one from one averaged)
        super().__init__(**kwargs)
        if self.grad_averager is not None:  # each member tells its group the epoch its gradients are from
            self.grad_averager.gather_default = lambda: self.local_epoch

    def interrupt(self) -> None:
        """The trainer is stopping (any thread): every round and download in flight is cancelled (see
        ObservedAverager.interrupt), so that the training thread's step returns at once and it can leave."""
        for averager in (self.grad_averager, self.state_averager):
            if averager is not None:
                averager.interrupt()

    def _expected_group(self) -> int:
        """How many peers this epoch's round can expect: every peer with a live progress report in the run, and
        ourselves (the tracker's count). A peer that joined since is not counted and joins the next round."""
        return max(2, self.tracker.expected_peers)

    def _maybe_schedule_gradient_averaging(self) -> None:
        """No gradient round before the epoch really ends (hivemind starts matchmaking matchmaking_time before its
        estimate of the epoch end, and the group assembles at that estimate). The peers' estimates differ by more
        than matchmaking_time, and so in most epochs two peers assembled their group seconds before the third began
        looking; it missed the round and waited a whole epoch for the next one (measured: 3 peers of the demo run,
        one round of 2 in 3-4, one peer computing 67% of the time). The epoch's real end is seen by all peers within
        a fraction of a second (a peer that ends it reports its new epoch, which ends the others' at their next
        step), so the round's matchmaking starts there (`_begin_averaging_gradients`), with the group complete as
        soon as every peer expected has joined (`_expected_group`): all rounds of 3, 95% computing
        (docs/benchmarks.md, "A healthy swarm")."""
        return None

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        """hivemind's, for a round that starts now: the group begins when the peers training the run have all
        joined, or matchmaking_time after its leader began looking. A control left from an earlier round is
        dropped first: hivemind takes it as "this epoch's pre-scheduled round was used elsewhere" and steps on
        local gradients alone (without pre-scheduling that was every other epoch). A lone peer (the tracker
        sees no other) steps alone, as in hivemind."""
        if self.scheduled_grads is not None and (self.scheduled_grads.triggered or self.scheduled_grads.done()):
            self.scheduled_grads = None
        if self.scheduled_grads is None and self.tracker.global_progress.num_peers > 1:
            self.grad_averager.expect_group(self._expected_group())
            # bounded by averaging_timeout (hivemind's own step here has no deadline and may retry for good)
            self.scheduled_grads = self.grad_averager.schedule_step(timeout=self.averaging_timeout)
        return super()._begin_averaging_gradients(grad_scaler)

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        """hivemind's, then: a peer that was in this gradient round one epoch behind its mates leaves it at their
        epoch, as they do. Without this it stayed one behind for good: hivemind steps its epoch by one after the round
        (its mates by one from theirs), its tracker then shows the swarm ahead, so its next epoch ended at its first
        step and it waited the whole epoch in matchmaking for the swarm's next round. Measured in CI (steady-state
        test, 3 workers of the demo run): one peer sent 0-30k samples of the others' ~450k per round for 6 rounds
        running and waited in epoch ends 73% of the time; the swarm never fell in step. How it got there: its tracker,
        reading the others' last reports of the epoch they had just left, counted that epoch as full and ended ours; our
        round was then their next one (so the tracker cannot tell us: it still showed that older epoch). Its
        parameters moved with the others' all along (every member applies the same averaged gradients): only its
        epoch counter was off. Bounded: at most MAX_CATCH_UP past our epoch, or to what the tracker reports, so a
        member that declares a far epoch moves us no further than one epoch per round."""
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        if maybe_step_control is None or not maybe_step_control.done() or maybe_step_control.cancelled() \
                or maybe_step_control.exception(timeout=0) is not None:
            return
        mates = round_epochs(maybe_step_control.result(timeout=0) or {}).values()
        caught_up = min(max(mates, default=-1), max(self.local_epoch + MAX_CATCH_UP, self.tracker.global_epoch))
        if caught_up > self.local_epoch:
            logger.info("this peer was behind its gradient round's group (epoch %d, the group's %d): it goes on "
                        "at the group's", self.local_epoch, caught_up)
            self.state_averager.local_epoch = caught_up

    def load_state_from_peers(self, **kwargs) -> None:
        """hivemind.Optimizer.load_state_from_peers with the retries bounded by load_state_timeout (hivemind
        retries failed downloads forever, and each attempt may take load_state_timeout). A peer that gets no
        state in time trains on from its own and is healed by the next state-averaging round."""
        if self.scheduled_grads is not None and not self.scheduled_grads.done():
            self._tag_along_with_zero_weight(self.scheduled_grads)
            self.scheduled_grads = None
        self.state_averager.step(wait_for_delayed_updates=True)

        def download(remaining: float) -> bool:
            if self.state_averager.interrupted:  # stopping: no more attempts
                return False
            self.state_averager.load_state_from_peers(timeout=remaining, **kwargs)
            if self.grad_averager is not None:
                self.grad_averager.load_state_from_peers(timeout=remaining, **kwargs)
            return True

        self.downloads += 1
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

    def _update_global_epoch(self, grad_scaler) -> None:
        """hivemind's epoch end, without a parameter round the swarm already went on from. A peer that ends its
        epoch when the others are in the next one (it learned of their epoch change late: a slow refresh, a
        starved CPU) and has no group waiting for it would look for a group of that round alone for the whole
        averaging_timeout (hivemind retries matchmaking until the step's deadline): the others finished that round
        before moving on. Measured (3 trainers of the demo run on 2 cores at load 12): 20-26 s at epoch 4, then a
        state download, while the two others went on (issue 14, "could not find a group"). It skips the round
        instead; the next parameter round heals what it missed."""
        scheduled = self.scheduled_state
        grouped = scheduled is not None and not scheduled.done() and scheduled.stage == AveragingStage.AWAITING_TRIGGER
        behind = self.tracker.global_epoch > self.local_epoch
        self.state_averager.skip_round = behind and not grouped
        # a parameter round, too, begins once every peer expected has joined (not after matchmaking_time)
        self.state_averager.expect_group(self._expected_group())
        try:
            super()._update_global_epoch(grad_scaler)
        finally:
            self.state_averager.skip_round = False

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
