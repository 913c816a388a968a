"""Local updates, DiLoCo-style: inner optimizer steps for a whole epoch, then an outer Nesterov step on the swarm's average, overlapped with the next epoch.

Every peer keeps two copies of the model:

* theta, the model it trains: the run's optimizer (the *inner* one) steps it on local batches only;
* phi, the swarm's parameters as of the last outer step (CPU, shared by nothing), with the *outer*
  optimizer's state: SGD with Nesterov momentum (`averaging.outer_lr`, `averaging.outer_momentum`), as in
  DiLoCo (Douillard et al. 2023) and OpenDiLoCo.

An epoch ends when the swarm has processed `target_batch_size` samples (hivemind's ProgressTracker, the
same one hivemind.Optimizer uses, so `run status` and the late-join logic read it unchanged). Then every
peer averages its theta with its group (our raw-frame all-reduce, `dataplane.TunedAverager`'s data plane;
weights = samples each peer trained since its last successful round), and applies

    pseudo-gradient g = phi - mean(theta)        (what the group learnt this epoch, as a descent direction)
    phi <- outer_step(phi, g)                     (Nesterov momentum)
    theta <- theta + (phi_new - theta_at_launch)  (re-base what was trained since the round started)

Without overlap (the default) the peer waits for the round: theta == theta_at_launch, so theta <- phi_new
and every peer of the group starts the next epoch from the same parameters.

With `averaging.overlap = true` the round runs in the background while the next epoch trains and is
applied at the end of that epoch: communication hides behind a whole epoch of compute, for an outer step
that lands one epoch late. Re-basing theta onto phi_new is then unstable: theta keeps its own deviation
from the group mean of the previous launch, which the next epoch's local steps mirror, and that spread
random-walks (measured on the test MLP, 2 peers, 16 Adam steps per epoch: phi converged, local models
drifted from 0.13 to 0.5-1.5 loss). Streaming DiLoCo (Douillard et al. 2025) merges instead,
theta <- MERGE_ALPHA * theta + (1 - MERGE_ALPHA) * phi_new with 0.5, which halves the spread every epoch:
measured, it reaches the loss of the blocking mode (0.07 after 16 epochs, both) and lags it early on.
At shutdown (pause, end of run) the last round is re-based instead, exactly phi_new when no step followed.

Why parameters are averaged (not pseudo-gradients): the average of theta carries every peer's phi with
it, so peers whose phi drifted apart (a failed round, a late joiner that downloaded phi one outer step
before a round in flight landed) are pulled back together by the next round, without downloading the
whole state (hivemind's local-update mode makes a peer that is one epoch behind download everything).

What fails how:
* a round that fails (no group, a mate died, timeout): the peer keeps phi and theta as they are; its
  samples stay "unsent" and weigh in its next round (its work is not lost);
* a peer alone in the swarm takes its outer step on its own theta (phi keeps moving; state served to
  joiners stays current);
* a peer two or more epochs behind the swarm (paused, starved) downloads phi and the outer state from the
  peer with the highest epoch, and so does a peer joining a run past epoch 0; until it has the swarm's
  state it never averages (it would drag the swarm back to its initial parameters). Each download is
  bounded by `load_state_timeout` (hivemind.Optimizer retries forever).

What a peer serves to others (`rpc_download_state`, hivemind's protocol): metadata `{"epoch": e}` and
the tensors phi followed by the outer momentum buffers, every one checked on arrival (count, shape,
dtype, finite: `observed.ObservedAverager.load_state_from_peers`) before anything is overwritten.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch
from hivemind.averaging.control import AveragingStage
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression
from hivemind.utils import get_dht_time

from p2pcompute.runs.optimizers import allocate_state
from p2pcompute.training.dataplane import RawAllReduceMixin
from p2pcompute.retry import Timeout, poll_until, retry_until
from p2pcompute.training.observed import ObservedAverager, RoundObserver, log_download_failure
from p2pcompute.training.tracker import SwarmProgressTracker

logger = logging.getLogger(__name__)

ROUND_KIND = "outer"  # the kind of our rounds in RoundObserver records (credits ride in them)
MERGE_ALPHA = 0.5  # overlap: weight of the local model when merging it with the outer step's result
STATE_VERSION = 1
# Beyond averaging_timeout, how long the end of an epoch waits for the round launched an epoch ago (hivemind
# bounds the round itself by averaging_timeout; this only covers a result stuck between processes).
RESULT_MARGIN = 5.0
# After a failed state download at join, later attempts (one per epoch end) use this much shorter bound: the
# peer trains meanwhile, and a swarm that offers no state now rarely offers it a moment later.
RETRY_LOAD_TIMEOUT = 10.0
# How a round or a download can fail: whatever hivemind's averager process set on the future (MatchmakingException,
# AllreduceException, TimeoutError, CancelledError, P2P errors, ...). A failed round never stops training.
ROUND_FAILURES = (Exception,)
# Seconds an epoch end waits for a view of the swarm that shows at least this peer (see _wait_for_a_view): the DHT's
# rejoin period (swarm/dht.py REJOIN_PERIOD, 5 s) plus two progress reads at the slowest refresh (5 s), plus slack.
VIEW_WAIT = 20.0


class ObservedOuterAverager(RawAllReduceMixin, ObservedAverager):
    """Averages the peers' parameters (theta) on our raw-frame data plane; every round is recorded for the
    claims layer (kind "outer"); serves the swarm state (phi, outer momentum, epoch) to peers that download it."""

    def __init__(self, averaged_tensors, dht, *, observer: RoundObserver,
                 state: Callable[[], tuple[Any, Sequence[torch.Tensor], Sequence[CompressionInfo]]], **kwargs):
        self._observer, self._round_kind = observer, ROUND_KIND
        self._state_source = state
        super().__init__(averaged_tensors, dht, **kwargs)

    def get_current_state(self):
        """Runs in this (host) process when a peer downloads our state."""
        return self._state_source()


class LocalUpdatesOptimizer:
    """The optimizer a Trainer drives in `averaging.mode = "local"`: `step()` after each backward pass,
    `zero_grad()`, `local_epoch`, `tracker` (our SwarmProgressTracker: hivemind's, with heartbeat reports),
    `load_state_from_peers()`, `state_dict()`/`load_state_dict()` (pause/resume), `shutdown()`. See the module
    docstring."""

    def __init__(self, *, dht, run_id: str, params: Sequence[torch.nn.Parameter],
                 optimizer: Callable[[Sequence[torch.nn.Parameter]], torch.optim.Optimizer],
                 target_batch_size: int, batch_size_per_step: int, observer: RoundObserver,
                 outer_lr: float, outer_momentum: float, overlap: bool = False,
                 compression: CompressionBase = NoCompression(), matchmaking_time: float = 5.0,
                 request_timeout: float = 3.0, averaging_timeout: float = 60.0, allreduce_timeout: float = 60.0,
                 next_chunk_timeout: float = 20.0, load_state_timeout: float = 120.0, shutdown_timeout: float = 5.0,
                 target_group_size: int = 64, part_size_bytes: int = 4 << 20, declare_state_period: float = 30.0,
                 tracker_opts: Optional[dict] = None, clock: Callable[[], float] = time.monotonic,
                 on_inner_step: Optional[Callable[[bool], None]] = None):
        self.params = list(params)
        self.batch_size_per_step, self.overlap = batch_size_per_step, overlap
        self.averaging_timeout, self.load_state_timeout = averaging_timeout, load_state_timeout
        self.shutdown_timeout, self.matchmaking_time = shutdown_timeout, matchmaking_time
        self._clock = clock
        self._on_inner_step = on_inner_step  # audits (training/work.py): called after each inner step, True if last
        self.inner = optimizer(self.params)
        # phi and the outer optimizer: plain CPU tensors, written only by the training thread under _lock (the
        # averager's state requests read them under it too)
        self._lock = threading.Lock()
        self.global_params = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        self.outer = torch.optim.SGD(self.global_params, lr=outer_lr, momentum=outer_momentum,
                                     nesterov=outer_momentum > 0)
        if outer_momentum > 0:
            allocate_state(self.outer)  # momentum buffers exist from the start: the served state has a fixed layout
        self._momentum = [self.outer.state[p]["momentum_buffer"] for p in self.global_params] if outer_momentum > 0 else []
        self.local_epoch = 0
        self._phi_epoch = 0  # the epoch whose start phi is (what a download is labelled with)
        self._samples_in_epoch = 0
        self._unsent = 0  # samples trained since the last round that made it into phi (the next round's weight)
        self._pending: Optional[tuple[Any, list[torch.Tensor], int, int]] = None  # control, theta at launch, weight, epoch
        self._scheduled = None  # the next round, matchmaking ahead of the epoch end (StepControl awaiting our trigger)
        self._needs_state = False  # joined a run in progress without its state: train, but do not average yet
        self.failed_rounds = 0
        self.sync_seconds = 0.0  # wall time the training thread spent at epoch ends (waiting, outer steps, copies)
        self.averager = ObservedOuterAverager(
            [p.detach().to("cpu", torch.float32, copy=True) for p in self.params], dht,
            observer=observer, state=self._current_state, prefix=f"{run_id}_outer", start=True,
            target_group_size=target_group_size, min_matchmaking_time=matchmaking_time,
            request_timeout=request_timeout, allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=next_chunk_timeout, shutdown_timeout=shutdown_timeout,
            part_size_bytes=part_size_bytes, compression=compression, declare_state_period=declare_state_period)
        self.tracker = SwarmProgressTracker(dht, run_id, target_batch_size, client_mode=False, start=True,
                                            **(tracker_opts or {}))

    # ---- what a torch optimizer offers (the trainer and GradScaler use these) ------------------------

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """One inner step on the gradients in the parameters; at the end of an epoch, the outer step."""
        self.inner.step()
        self._samples_in_epoch += self.batch_size_per_step
        self._unsent += self.batch_size_per_step
        self.tracker.report_local_progress(self.local_epoch, self._samples_in_epoch)
        self._maybe_schedule()
        ends_epoch = self.tracker.ready_to_update_epoch
        if self._on_inner_step is not None:
            self._on_inner_step(ends_epoch)  # before the outer step moves the parameters
        if ends_epoch:
            started = time.perf_counter()
            try:
                self._end_epoch()
            finally:
                self.sync_seconds += time.perf_counter() - started

    # ---- the end of an epoch -------------------------------------------------------------------------

    def _end_epoch(self) -> None:
        self._wait_for_a_view()
        with self.tracker.pause_updates():
            if not self._needs_state and not self._far_behind():
                self._settle(wait=True, merge=True)  # overlap: the round launched an epoch ago
                if not self._far_behind():  # (waiting may have been long: a frozen or starved peer wakes here)
                    self._launch()
                    if not self.overlap:
                        self._settle(wait=True)
            if self._needs_state or self._far_behind():
                self._catch_up()
                return
            self._next_epoch(max(self.local_epoch + 1, self.tracker.global_epoch))

    def _wait_for_a_view(self) -> None:
        """A tracker that sees no peer at all, not even us, does not mean we are alone: our own reports are missing
        from what it reads, so its DHT is cut off from the swarm (a node woken from a suspend, until swarm/dht.py
        rejoins). Alone, local mode takes an outer step per epoch on its own samples; a woken straggler did that
        at ~20 epochs/s and reached the run's last epoch before its DHT healed. Wait (bounded) for a view."""
        if self.tracker.global_progress.num_peers > 0:
            return
        try:
            poll_until(lambda: self.tracker.global_progress.num_peers > 0, VIEW_WAIT, interval=0.1,
                       what="a view of the swarm", clock=self._clock)
        except Timeout:
            logger.info("the DHT shows no peer of the run, not even us, after %.0f s; training on alone", VIEW_WAIT)

    def _far_behind(self) -> bool:
        """Two or more epochs behind the swarm (paused, starved, frozen): averaging our stale parameters in would
        only drag the swarm back; we take its state instead."""
        if self.tracker.global_epoch <= self.local_epoch + 1:
            return False
        if not self._needs_state:
            logger.info("epoch %d, the swarm is at %d: downloading its state", self.local_epoch,
                        self.tracker.global_epoch)
            self._needs_state = True
        return True

    def _catch_up(self) -> None:
        """Download the swarm's state (a short bound after the first try); if none comes, train on and try again
        at the next epoch end, without averaging meanwhile."""
        self._settle(wait=False)
        if self._scheduled is not None:
            self._release(self._scheduled)
            self._scheduled = None
        if self._download_state(RETRY_LOAD_TIMEOUT if self.local_epoch else self.load_state_timeout):
            self._samples_in_epoch = 0
            return
        self._next_epoch(max(self.local_epoch + 1, self.tracker.global_epoch))

    def _maybe_schedule(self) -> None:
        """Start matchmaking for this epoch's round matchmaking_time before the swarm's estimated epoch end, as
        hivemind.Optimizer does for gradient rounds: the group is formed when the epoch ends, instead of the
        epoch end waiting matchmaking_time (a group below target_group_size waits all of it)."""
        if self._scheduled is not None or self._needs_state or self.tracker.global_progress.num_peers <= 1:
            return
        if self.tracker.estimated_next_update_time - get_dht_time() > self.matchmaking_time:
            return
        if self._pending is not None and not self._pending[0].done():
            return  # overlap: the averager is still busy with the previous round
        self._scheduled = self.averager.step(gather=self.local_epoch, timeout=self.averaging_timeout,
                                             require_trigger=True, wait=False)

    def _next_epoch(self, epoch: int) -> None:
        self.local_epoch = self.tracker.update_epoch(epoch)
        self._samples_in_epoch = 0
        self._advertise_state()

    def _advertise_state(self) -> None:
        """Offer our state for download at our epoch; a client-mode averager (a peer behind NAT) cannot be
        downloaded from (hivemind refuses the priority)."""
        if not self.averager.client_mode:
            self.averager.state_sharing_priority = self.local_epoch

    def _launch(self) -> None:
        """Start this epoch's round with our theta (or, alone in the swarm, take the outer step on it)."""
        with torch.no_grad(), self.averager.get_tensors() as tensors:
            for tensor, param in zip(tensors, self.params):
                tensor.copy_(param)
        launch = [p.detach().clone() for p in self.params]
        weight = max(1, self._unsent)
        control, self._scheduled = self._scheduled, None
        if control is not None and (control.done() or control.triggered):
            control = None  # it failed while matchmaking (or was cancelled): start afresh
        if self.tracker.global_progress.num_peers <= 1:
            if control is not None:
                self._release(control)
            with self.averager.get_tensors() as tensors:
                self._apply(tensors, launch, self.local_epoch + 1)
            self._unsent = 0
            return
        if control is None:
            control = self.averager.step(gather=self.local_epoch, weight=float(weight),
                                         timeout=self.averaging_timeout, wait=False)
        else:  # the pre-scheduled round: our tensors are in place, go
            control.weight = float(weight)
            control.allow_allreduce()
        self._pending = (control, launch, weight, self.local_epoch)

    def _settle(self, wait: bool, merge: bool = False, timeout: Optional[float] = None) -> None:
        """Apply the round in flight, if any (wait=False: only if it is already done; otherwise drop it; timeout:
        how long to wait, by default as long as the round may take). merge: theta is merged with phi_new (an
        epoch of steps followed the launch), not re-based."""
        if self._pending is None:
            return
        control, launch, weight, epoch = self._pending
        self._pending = None
        if not wait and not control.done():
            self._abandon(control)
            return
        try:
            control.result(timeout=self.averaging_timeout + RESULT_MARGIN if timeout is None else timeout)
        except ROUND_FAILURES as e:  # hivemind's MatchmakingException/AllreduceException/TimeoutError/...
            self.failed_rounds += 1
            logger.info("outer round of epoch %d failed (%s); keeping our %d samples for the next one",
                        self.local_epoch, type(e).__name__, self._unsent)
            self._abandon(control)
            return
        with self.averager.get_tensors() as tensors:
            self._apply(tensors, launch, epoch + 1, merge)
        self._unsent = max(0, self._unsent - weight)

    @staticmethod
    def _release(control) -> None:
        """Give up a pre-scheduled round: cancelled while looking for a group; once in a group, mates wait for
        our parts, so it runs with weight 0 (what hivemind.Optimizer does with its scheduled rounds)."""
        if control.done():
            return
        if control.stage == AveragingStage.LOOKING_FOR_GROUP:
            control.cancel()
        elif not control.triggered:
            control.weight = 0.0
            control.allow_allreduce()

    @staticmethod
    def _abandon(control) -> None:
        """Stop waiting for a round. Still looking for a group: cancelled. Group formed: mates expect our parts,
        so the averager finishes it in the background and its result goes unused."""
        if not control.done() and control.stage == AveragingStage.LOOKING_FOR_GROUP:
            control.cancel()

    @torch.no_grad()
    def _apply(self, averaged: Sequence[torch.Tensor], launch: Sequence[torch.Tensor], epoch: int,
               merge: bool = False) -> None:
        """The outer step on the group's mean theta (phi becomes the start of `epoch`), then theta re-based onto
        (or merged with) the new phi."""
        with self._lock:
            for phi, mean in zip(self.global_params, averaged):
                if phi.grad is None:
                    phi.grad = torch.empty_like(phi)
                torch.sub(phi, mean, out=phi.grad)
            self.outer.step()
            self._phi_epoch = epoch
        for param, phi, before in zip(self.params, self.global_params, launch):
            if merge:
                param.mul_(MERGE_ALPHA).add_(phi.to(param.device, param.dtype), alpha=1 - MERGE_ALPHA)
            elif torch.equal(param, before):  # no step since the launch (blocking mode): exactly phi, as on every mate
                param.copy_(phi)
            else:
                param.add_(phi.to(param.device, param.dtype) - before)

    # ---- state: served to others, downloaded from them -----------------------------------------------

    def _current_state(self):
        with self._lock:
            tensors = [t.clone() for t in (*self.global_params, *self._momentum)]
            metadata = {"version": STATE_VERSION, "epoch": self._phi_epoch}
        return metadata, tensors, [CompressionInfo.from_tensor(t, key=i) for i, t in enumerate(tensors)]

    def load_state_from_peers(self, timeout: Optional[float] = None) -> bool:
        """Download phi, the outer momentum and the epoch from the most advanced peer; theta <- phi.
        Returns False (and keeps training on what we have, without averaging) if no peer sent a valid
        state within `timeout` (default: load_state_timeout)."""
        with self.tracker.pause_updates():
            self._settle(wait=False)
            return self._download_state(self.load_state_timeout if timeout is None else timeout)

    def _download_state(self, timeout: float) -> bool:
        def attempt(remaining: float) -> Optional[bool]:
            """True: adopted; False: no peer offers its state, or we are stopping (give up); None: an unusable
            state (try again)."""
            if self.averager.interrupted:
                return False
            result = self.averager.load_state_from_peers(timeout=remaining)
            if result is None:
                return False
            problem = self._check_state(*result)
            if problem is not None:
                logger.warning("a peer sent an unusable state (%s)", problem)
                return None
            self._adopt(*result)
            return True

        # a failed attempt (TimeoutError, a peer's stream failing mid-download) is retried after a pause
        if retry_until(attempt, timeout, retry_on=ROUND_FAILURES, on_failure=log_download_failure, clock=self._clock):
            self._needs_state = False
            return True
        self._needs_state = True
        logger.warning("no peer sent the run's state within %.0f s; training on, without averaging until it arrives",
                       timeout)
        return False

    @staticmethod
    def _check_state(metadata: Any, tensors: Sequence[torch.Tensor]) -> Optional[str]:
        """The tensors were checked against our own layout by the averager (shapes, dtypes, finite)."""
        if metadata.get("version") != STATE_VERSION:
            return f"state version {metadata.get('version')!r}"
        epoch = metadata.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 2**40:
            return f"epoch {epoch!r}"
        return None

    @torch.no_grad()
    def _adopt(self, metadata: dict, tensors: Sequence[torch.Tensor]) -> None:
        with self._lock:
            for mine, theirs in zip((*self.global_params, *self._momentum), tensors):
                mine.copy_(theirs)
            self._phi_epoch = metadata["epoch"]
        for param, phi in zip(self.params, self.global_params):
            param.copy_(phi)
        self._unsent = 0  # what we trained before is dropped with theta
        epoch = max(metadata["epoch"], self.local_epoch)
        self.local_epoch = self.tracker.update_epoch(epoch)
        self._samples_in_epoch = 0
        self._advertise_state()
        logger.info("loaded the swarm's state at epoch %d", epoch)

    # ---- pause/resume and leaving --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed peer needs (the round in flight is applied first if it ends within
        shutdown_timeout; otherwise theta keeps its own progress, which the next round sends)."""
        self._settle(wait=True, timeout=self.shutdown_timeout)
        with self._lock:
            return {"inner": self.inner.state_dict(), "outer": self.outer.state_dict(),
                    "global": [t.clone() for t in self.global_params], "epoch": self.local_epoch,
                    "phi_epoch": self._phi_epoch,
                    "unsent": self._unsent, "needs_state": self._needs_state}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        with self._lock:
            for mine, saved in zip(self.global_params, state["global"]):
                mine.copy_(saved)
            self.outer.load_state_dict(state["outer"])
            self._momentum = ([self.outer.state[p]["momentum_buffer"] for p in self.global_params]
                              if self._momentum else [])
            self._phi_epoch = state["phi_epoch"]
        self._unsent, self._needs_state = state["unsent"], state["needs_state"]
        with self.tracker.pause_updates():
            self.local_epoch = self.tracker.update_epoch(state["epoch"])
        self._advertise_state()

    def interrupt(self) -> None:
        """The trainer is stopping (any thread): the round and download in flight are cancelled, and any started
        later (see ObservedAverager.interrupt); the training thread's epoch end returns at once."""
        self.averager.interrupt()

    def shutdown(self) -> None:
        """Finish (or give up on, after shutdown_timeout) the round in flight, say goodbye to the tracker, stop
        the averager. Trainer.shutdown allows averaging_timeout + shutdown_timeout + a margin for all of it
        (an epoch end may be waiting for a round when it is asked to stop)."""
        try:
            self._settle(wait=True, timeout=self.shutdown_timeout)
            if self._scheduled is not None:
                self._release(self._scheduled)
                self._scheduled = None
        finally:
            self.tracker.shutdown(self.shutdown_timeout)
            self.averager.shutdown()


def download_outer_state(dht, prefix: str, params: Sequence[torch.Tensor], *, momentum: bool, timeout: float,
                         next_chunk_timeout: float = 20.0) -> Optional[tuple[int, list[torch.Tensor]]]:
    """(epoch, phi) from the most advanced peer of a local-mode run, as a client that serves nothing
    (`p2pc run checkpoint`); None if no peer sent a valid state within `timeout`."""
    layout = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
    layout += [torch.zeros_like(t) for t in layout] if momentum else []

    def expected_state():
        return {}, layout, [CompressionInfo.from_tensor(t, key=i) for i, t in enumerate(layout)]

    averager = ObservedOuterAverager(layout[:len(params)], dht, observer=RoundObserver(), state=expected_state,
                                     prefix=prefix, start=True, client_mode=True, allow_state_sharing=False,
                                     next_chunk_timeout=next_chunk_timeout)
    try:
        result = averager.load_state_from_peers(timeout=timeout)
    except ROUND_FAILURES as e:
        logger.info("state download failed: %s", type(e).__name__)
        return None
    finally:
        averager.shutdown()
    if result is None or LocalUpdatesOptimizer._check_state(*result) is not None:
        return None
    metadata, tensors = result
    return metadata["epoch"], list(tensors[:len(params)])
