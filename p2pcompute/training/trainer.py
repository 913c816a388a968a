"""The trainer: one run on this node, driven through hivemind.Optimizer (build, late join, train, pause/resume, progress, checkpoints)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from hivemind.utils import get_dht_time

from p2pcompute.credits.audit import StepReveal, WorkCommitment
from p2pcompute.errors import P2PCError, TrainingError
from p2pcompute.runs.artifacts import ArtifactStore
from p2pcompute.runs.datasets import batch_for
from p2pcompute.runs.manifest import Manifest, SignedManifest
from p2pcompute.runs.materialize import run_dataset, run_model
from p2pcompute.runs.models import loss_function
from p2pcompute.runs.optimizers import optimizer_factory
from p2pcompute.training import device as devices
from p2pcompute.training.observed import AveragingRound, RoundObserver, SwarmOptimizer
from p2pcompute.training.checkpoint import checkpoint_name, save_checkpoint
from p2pcompute.training.compression import compression_for
from p2pcompute.training.diloco import LocalUpdatesOptimizer
from p2pcompute.training.local import EvalResult, evaluate, evaluate_loss
from p2pcompute.training.progress import MAX_EVALS, EvalPoint, ProgressRecord, publish_progress
from p2pcompute.training.work import KEEP_EPOCHS, SEGMENT_STEPS, LocalWorkRecorder, SegmentState, WorkRecorder

logger = logging.getLogger(__name__)

# Seconds between progress records in the DHT: `run status` is at most this stale, and a swarm of
# hundreds of peers stores well under the DHT's ~40-180 stores/s measured here.
PROGRESS_PERIOD = 2.0
# A progress record outlives several missed refreshes; a peer that died leaves `run status` this fast.
PROGRESS_TTL = 30.0
LOSS_EMA_ALPHA = 0.1  # smoothing of the reported training loss (about the last 10 steps)
MAX_CONTRIBUTIONS = 1024  # epochs of per-epoch sample counts kept for the claims layer
# Extra seconds, beyond hivemind's own averaging and shutdown timeouts, that shutdown() waits for the
# training thread to let go: the thread may be inside one averaging round when asked to stop.
SHUTDOWN_MARGIN = 10.0
# min_peers: how long the first epoch waits for the other peers before going on with who is there
# (several cold process starts on a loaded 2-core machine).
MIN_PEERS_TIMEOUT = 120.0
PEER_POLL = 0.1  # seconds between looks at hivemind's view of the swarm while waiting for peers

STATUSES = ("starting", "joining", "training", "paused", "finished", "stopped", "failed")


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """Node-local settings (not part of the run): where to train and where files are."""

    device: str = "auto"  # auto, cpu, cuda, cuda:N (the node config's `device`)
    max_memory_fraction: float = 0.9  # GPU memory cap for this process
    cpu_threads: int = 0  # torch intra-op threads of the training thread; 0: devices.cpu_threads' choice; -1: torch's
    # own, left as torch sets it (benchmarks compare against it)
    mixed_precision: bool = True  # autocast on CUDA (bf16 where supported, else fp16 + loss scaling)
    data_dir: Path | None = None  # where out-of-band dataset files are kept
    stdlib_dir: Path | None = None  # override the Python stdlib location (pystdlib dataset)
    artifacts: ArtifactStore | None = None  # where files the run names by sha256 are found (weights, tokenizer)
    shards: Any = None  # runs.sharded.ShardSource: how the node fetches peer-to-peer datasets (p2p)
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0  # save a checkpoint every this many epochs; 0: never
    max_epochs: int | None = None  # stop at this epoch; None: the manifest's max_epochs (0 = no end)
    # Hold the first epoch after one local step until hivemind sees this many peers training (us included):
    # peers starting together would otherwise finish epoch 0 alone, each on its own gradient, and diverge.
    min_peers: int = 1
    min_peers_timeout: float = MIN_PEERS_TIMEOUT
    progress_period: float = PROGRESS_PERIOD
    progress_ttl: float = PROGRESS_TTL
    # claims hook: (round kind) -> data sent to group mates in each averaging round; None: [epoch, samples]
    round_payload: Callable[[str], Any] | None = None
    # audits (training/work.py): epochs of step sketches kept to answer audits; 0: record no work (no commitments).
    # Gradients mode records by default (issuers audit those claims; ~12 % of the demo MLP's training CPU, less for
    # larger models: docs/benchmarks.md). Local mode records only with `work_local` (its audits are not wired: an
    # issuer has no `segment` op to fetch the states, docs/credits.md), as it keeps a training state per segment.
    work_history: int = KEEP_EPOCHS
    work_local: bool = False
    work_segment: int = SEGMENT_STEPS  # local mode: steps per committed segment (a training state kept per segment)


@dataclasses.dataclass(frozen=True)
class TrainerStatus:
    run_id: str
    status: str
    reason: str
    epoch: int
    global_epoch: int
    peers: int  # peers the swarm progress shows (hivemind's tracker)
    loss: float | None
    samples_per_second: float
    samples_done: int
    device: str
    mode: str = ""  # the run's averaging mode: gradients / local
    # share of training wall time spent in the swarm optimizer's step (averaging rounds, outer steps, the
    # update) rather than computing gradients, since (re)joining: how much the swarm makes this peer wait
    sync_share: float = 0.0
    # share of training wall time spent waiting for data (shards of a peer-to-peer dataset not fetched yet)
    data_wait_share: float = 0.0
    # seconds since start() and, of them, seconds in the swarm optimizer's steps that ended an epoch (averaging
    # rounds, state downloads, outer steps): running totals, so that a reader takes the share waited over any window
    training_seconds: float = 0.0
    epoch_end_seconds: float = 0.0
    cpu_threads: int = 0  # torch's intra-op threads in the training thread (0 before it runs)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Trainer:
    """Trains one run on this node. `start()` builds everything and joins (raising on a bad setup);
    a background thread then trains until max_epochs, `shutdown()` or an error. `pause()`/`resume()`
    are the idle policy's hooks: pausing leaves the averaging group cleanly (hivemind's shutdown,
    which also withdraws our progress), resuming joins again and catches up from peers if behind.

    The DHT must have been started with this node's identity (the PeerID seeds our batches).
    """

    def __init__(self, dht, run: Manifest | SignedManifest, identity, options: TrainerOptions = TrainerOptions(),
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        self.dht = dht
        self.manifest = run.manifest if isinstance(run, SignedManifest) else run
        self.identity = identity
        self.options = options
        self._clock, self._wall_clock = clock, wall_clock
        self._observer = RoundObserver(options.round_payload or self._default_payload)
        self._lock = threading.RLock()  # held during a training step; checkpoints and evals take it too
        # the work recorder's own: held while it records or answers (milliseconds), never through a round, so that
        # claims and audits (other threads) are not held up by an epoch end waiting for its group
        self._work_lock = threading.RLock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._pause_reason: str | None = None
        self._thread: threading.Thread | None = None
        self._opt: SwarmOptimizer | LocalUpdatesOptimizer | None = None
        self._saved_opt_state: dict | None = None
        self._status, self._reason = "starting", ""
        self._epoch = 0
        self._step_in_epoch = 0
        self._samples_in_epoch = 0
        self._samples_done = 0
        self._contributions: dict[int, int] = {}
        self._work: WorkRecorder | LocalWorkRecorder | None = None  # what audits need, see start()
        self._loss_ema: float | None = None
        self._evals: list[EvalPoint] = []  # the run's [eval] results on this peer, newest last (at most MAX_EVALS)
        self._rate_mark = (0.0, 0)  # (clock, samples_done) at the last throughput measurement
        self._samples_per_second = 0.0
        self._compute_seconds = self._step_seconds = 0.0  # forward+backward / opt.step() (see TrainerStatus)
        self._epoch_end_seconds = 0.0  # in opt.step() calls that moved the epoch (see TrainerStatus)
        self._started_at: float | None = None
        self._threads_in_use = 0
        self._next_publish = 0.0
        self._peers_deadline: float | None = None  # set while the first epoch waits for min_peers
        max_epochs = options.max_epochs if options.max_epochs is not None else self.manifest.max_epochs
        self.max_epochs = max_epochs

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> "Trainer":
        if self.dht.peer_id != self.identity.peer_id:
            raise TrainingError("the DHT runs under another identity than the trainer's (batches are seeded by it)")
        m = self.manifest
        self.device = devices.select_device(self.options.device, m.hardware.devices)
        devices.limit_memory(self.device, self.options.max_memory_fraction)
        self._amp_dtype = devices.autocast_dtype(self.device) if self.options.mixed_precision else None
        self._scaler = devices.grad_scaler(self.device, self._amp_dtype)
        self._cpu_threads = -1 if self.options.cpu_threads < 0 else devices.cpu_threads(self.options.cpu_threads)
        logger.info("training on %s, %s", self.device, "torch's own CPU threads" if self._cpu_threads < 0 else
                    f"{self._cpu_threads} CPU thread{'' if self._cpu_threads == 1 else 's'}")
        self.dataset = run_dataset(m, self.options.data_dir, self.options.stdlib_dir, self.options.artifacts,
                                   shards=self.options.shards)
        self.model = run_model(m, self.options.artifacts).to(self.device)
        self._loss_fn = loss_function(self.dataset.shape.task)
        # Work is recomputable (and recorded) in gradients mode, where every step of an epoch is taken at its start
        # state; not with delay_state_averaging, where a background round may move the parameters mid-epoch.
        # In local mode, segments of steps are recomputable from the full training state kept at their start.
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self._amp_dtype]
        if self.options.work_history and m.averaging.mode == "gradients" and not m.averaging.delay_state_averaging:
            self._work = WorkRecorder(m.run_id, self.identity.public_key, m.batch_size_per_step,
                                      keep_epochs=self.options.work_history, precision=precision)
        elif self.options.work_history and self.options.work_local and m.averaging.mode == "local":
            self._work = LocalWorkRecorder(m.run_id, self.identity.public_key, m.batch_size_per_step,
                                           segment=self.options.work_segment, keep_epochs=self.options.work_history,
                                           precision=precision)
        self._rate_mark = (self._clock(), 0)
        self._started_at = self._clock()
        if self.options.min_peers > 1:
            self._peers_deadline = self._clock() + self.options.min_peers_timeout
        try:
            self._join()
        except BaseException:
            self.dataset.close()
            raise
        if m.eval is not None and self._epoch == 0:  # the initial model's held-out loss: the baseline of the run
            with self._lock:
                self._evaluate_epoch(0)
        self._thread = threading.Thread(target=self._run, name=f"trainer-{m.run_id_hex[:8]}", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop training, leave the averaging group and withdraw from the run (idempotent)."""
        self._stop.set()
        self._wakeup.set()
        opt = self._opt
        if opt is not None and self._thread is not None:  # the step in progress must not wait out its round
            opt.interrupt()
        if timeout is None:
            a = self.manifest.averaging
            timeout = float(a.averaging_timeout + a.shutdown_timeout) + SHUTDOWN_MARGIN
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the training thread did not stop within %.0f s", timeout)
        elif self._opt is not None:
            self._leave("stopped", "")

    def __enter__(self) -> "Trainer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until training ends (finished, failed or stopped); True if it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- idle policy hooks --------------------------------------------------------------------------

    def pause(self, reason: str) -> None:
        """Leave the averaging group after the current step and stop training until resume()."""
        self._pause_reason = reason or "paused"
        self._wakeup.set()

    def resume(self) -> None:
        self._pause_reason = None
        self._wakeup.set()

    # ---- what others read ---------------------------------------------------------------------------

    def status(self) -> TrainerStatus:
        opt = self._opt
        tracker = opt.tracker if opt is not None else None
        return TrainerStatus(
            run_id=self.manifest.run_id_hex, status=self._status, reason=self._reason, epoch=self._epoch,
            global_epoch=tracker.global_epoch if tracker is not None else self._epoch,
            peers=tracker.global_progress.num_peers if tracker is not None else 0,
            loss=self._loss_ema, samples_per_second=self._samples_per_second, samples_done=self._samples_done,
            device=str(getattr(self, "device", "")), mode=self.manifest.averaging.mode,
            sync_share=self._step_seconds / max(1e-9, self._compute_seconds + self._step_seconds),
            data_wait_share=self._data_wait_share(),
            training_seconds=0.0 if self._started_at is None else self._clock() - self._started_at,
            epoch_end_seconds=self._epoch_end_seconds, cpu_threads=self._threads_in_use,
        )

    def _data_wait_share(self) -> float:
        waited = self.dataset.data_wait_seconds if hasattr(self, "dataset") else 0.0
        return waited / max(1e-9, waited + self._compute_seconds + self._step_seconds)

    def rounds(self) -> list[AveragingRound]:
        """Averaging rounds this peer took part in: group members and each member's payload (claims hook)."""
        return self._observer.rounds()

    def contributions(self) -> dict[int, int]:
        """epoch -> samples this peer accumulated toward that epoch's update (0 if they were discarded). Any thread,
        without the step lock: a step holds it through its epoch end's round (up to averaging_timeout), and the
        worker's status loop, blocked here, neither wrote its status nor saw SIGTERM for that long (CI, 2026-12-08).
        A dict copy is one step under the GIL."""
        return dict(self._contributions)

    @property
    def records_work(self) -> bool:
        """Whether this trainer commits to its work per epoch (what a claim's work_digest names)."""
        return self._work is not None

    def work_commitment(self, epoch: int) -> WorkCommitment | None:
        """What this peer commits to for a completed epoch (its digest is the claim's work_digest), if recorded."""
        with self._work_lock:
            return self._work.commitment(epoch) if self._work is not None else None

    def keep_work(self, epoch: int, keep: bool = True) -> None:
        """Keep (or stop keeping) `epoch`'s work records and start state beyond the last few: a claim of ours for it is
        open, and its issuer may audit it late (training/work.py, `_Pinned`). Any thread; no lock needed."""
        if self._work is not None:
            (self._work.pin if keep else self._work.unpin)(epoch)

    def reveal(self, epoch: int, steps: Sequence[int]) -> list[StepReveal] | None:
        """The answer to an audit of `steps` of `epoch`: the committed step sketches with their Merkle paths."""
        with self._work_lock:
            return self._work.reveal(epoch, steps) if self._work is not None else None

    def segment_state(self, epoch: int, leaf: int) -> SegmentState | None:
        """Local mode: the full training state where segment `leaf` of `epoch` started (an audit replays from it)."""
        with self._work_lock:
            return self._work.segment_state(epoch, leaf) if isinstance(self._work, LocalWorkRecorder) else None

    def start_state(self, epoch: int) -> tuple[bytes, list[torch.Tensor]] | None:
        """(digest, parameters) at the start of a recent epoch, to audit others against (None if not kept)."""
        with self._work_lock:
            return self._work.start_states.get(epoch) if self._work is not None else None

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the current parameters (between steps); default path: checkpoint_dir/<run>-epochN.pt."""
        with self._lock:
            if path is None:
                if self.options.checkpoint_dir is None:
                    raise TrainingError("no checkpoint directory configured")
                path = Path(self.options.checkpoint_dir) / checkpoint_name(self.manifest, self._epoch)
            return save_checkpoint(path, self.model, self.manifest, self._epoch)

    def evaluate(self, size: int) -> float:
        """Loss on the run's fixed held-out batch (the same on every machine)."""
        with self._lock, devices.autocast(self.device, self._amp_dtype):
            return evaluate_loss(self.model, self.dataset, self.manifest.run_id, size, self.device)

    def evaluations(self) -> list[EvalPoint]:
        """The run's [eval] results on this peer so far (the newest MAX_EVALS), oldest first (any thread, no lock:
        see contributions)."""
        return list(self._evals)

    def _evaluate_epoch(self, epoch: int) -> None:
        """The run's evaluation at the start of `epoch` (the model after `epoch` updates), in chunks of
        batch_size_per_step, recorded with the training loss of that moment and published with our progress."""
        policy = self.manifest.eval
        with devices.autocast(self.device, self._amp_dtype):
            result: EvalResult = evaluate(self.model, self.dataset, self.manifest.run_id, policy.samples, self.device,
                                          chunk=self.manifest.batch_size_per_step)
        self._evals.append(EvalPoint.make(epoch, self._loss_ema, result.loss, result.accuracy))
        del self._evals[:-MAX_EVALS]
        logger.info("eval at epoch %d: loss %.4f%s", epoch, result.loss,
                    "" if result.accuracy is None else f", accuracy {result.accuracy:.3f}")

    # ---- the training thread ------------------------------------------------------------------------

    def _run(self) -> None:
        # torch's thread count holds for the thread that sets it (and threads started after): the training thread
        if self._cpu_threads > 0:
            torch.set_num_threads(self._cpu_threads)
        self._threads_in_use = torch.get_num_threads()
        try:
            while not self._stop.is_set():
                if self.max_epochs and self._epoch >= self.max_epochs:
                    self._set_status("finished", f"reached epoch {self.max_epochs}")
                    break
                if self._pause_reason is not None:
                    self._idle_while_paused()
                    continue
                if self._waiting_for_peers():
                    self._maybe_publish()
                    self._stop.wait(PEER_POLL)
                    continue
                self._train_step()
                self._maybe_publish()
        except P2PCError as e:  # an expected failure (the run's data cannot be had here, ...): one line
            logger.error("training failed: %s", e)
            self._set_status("failed", str(e)[:200])
        except Exception as e:  # the thread's last resort: recorded in the status and the log, then we leave
            logger.exception("training failed")
            self._set_status("failed", f"{type(e).__name__}: {e}"[:200])
        finally:
            if self._opt is not None:
                final = self._status if self._status in ("finished", "failed") else "stopped"
                self._leave(final, self._reason)
            self.dataset.close()  # loader threads, shards held in use

    def _train_step(self) -> None:
        with self._lock:
            m, opt = self.manifest, self._opt
            epoch = opt.local_epoch
            if epoch != self._epoch:  # hivemind moved us (state loaded from peers on its own)
                self._new_epoch(epoch, completed=False)
            x, y = batch_for(self.dataset, m.run_id, self.identity.peer_id.to_bytes(), epoch, self._step_in_epoch,
                             m.batch_size_per_step)
            params = list(self.model.parameters())
            if self._work is not None and self._work.epoch != epoch:  # the first step of the epoch: its start
                with self._work_lock:
                    if isinstance(self._work, LocalWorkRecorder):
                        self._work.begin_epoch(epoch, params, opt.inner)
                    else:
                        self._work.begin_epoch(epoch, params)
            started = time.perf_counter()
            downloads = getattr(opt, "downloads", None)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with devices.autocast(self.device, self._amp_dtype):
                loss = self._loss_fn(self.model(x), y)
            if self._scaler is not None:
                self._scaler.scale(loss).backward()
                if isinstance(self._work, WorkRecorder):
                    with self._work_lock:
                        self._work.record_step(epoch, self._step_in_epoch, params,
                                               1.0 / float(self._scaler.get_scale()))
                computed = devices.synchronized_time(self.device)
                self._scaler.step(opt)
                self._scaler.update()
            else:
                loss.backward()
                if isinstance(self._work, WorkRecorder):
                    with self._work_lock:
                        self._work.record_step(epoch, self._step_in_epoch, params)
                computed = devices.synchronized_time(self.device)
                opt.step()
            opt.zero_grad()
            stepped = devices.synchronized_time(self.device)
            self._compute_seconds += computed - started
            self._step_seconds += stepped - computed
            if opt.local_epoch != epoch:
                self._epoch_end_seconds += stepped - computed
            self._step_in_epoch += 1
            self._samples_in_epoch += m.batch_size_per_step
            self._samples_done += m.batch_size_per_step
            value = float(loss.detach())
            self._loss_ema = value if self._loss_ema is None else (
                (1 - LOSS_EMA_ALPHA) * self._loss_ema + LOSS_EMA_ALPHA * value)
            if opt.local_epoch != epoch:
                # an epoch ends by its averaging round (the epoch steps by one, or more when the round's group was
                # ahead of us: SwarmOptimizer catches up with it), or by a state download, which drops its samples
                averaged = opt.local_epoch == epoch + 1 if downloads is None else (
                    opt.local_epoch > epoch and opt.downloads == downloads)
                self._new_epoch(opt.local_epoch, completed=averaged)

    def _waiting_for_peers(self) -> bool:
        """After our first step (which makes hivemind report us to the others), hold the first epoch until
        hivemind's progress tracker counts min_peers peers, or the wait times out. "Our first step" is the current
        optimizer's: after a pause its new tracker reports nothing until it counts samples, and a peer that held
        without stepping stayed invisible, so every peer waited out the whole timeout (seen in the NAT tests: the
        private nodes paused for a reachable peer, then all three waited 120 s and raced through the run alone)."""
        if self._peers_deadline is None or self._opt is None or self._opt.tracker.local_progress.samples_accumulated == 0:
            return False
        self._opt.tracker.hold()  # the swarm stops counting our speed while we hold (a no-op after the first call)
        seen = self._opt.tracker.global_progress.num_peers
        if seen >= self.options.min_peers or self._clock() > self._peers_deadline:
            if seen < self.options.min_peers:
                logger.warning("going on with %d of %d peers: no more joined within %.0f s%s", seen,
                               self.options.min_peers, self.options.min_peers_timeout,
                               " (alone: no round to average with, nobody to witness a claim, so no credits until "
                               "a peer joins)" if seen <= 1 else "")
            self._peers_deadline = None
            return False
        return True

    def _new_epoch(self, epoch: int, completed: bool) -> None:
        """Bookkeeping at an epoch change: what we contributed, batch counters, periodic checkpoints."""
        self._contributions[self._epoch] = self._samples_in_epoch if completed else 0
        if self._work is not None:
            # gradients mode: an epoch that hivemind ended by loading state after its round (not "completed" here)
            # still holds steps all taken at its start state, whose mean was what it averaged: commit to them (a
            # claim names the commitment only if it holds at most the weight sent, services/credits.py)
            with self._work_lock:
                self._work.end_epoch(self._epoch, completed or isinstance(self._work, WorkRecorder))
        while len(self._contributions) > MAX_CONTRIBUTIONS:
            del self._contributions[min(self._contributions)]
        self._epoch, self._step_in_epoch, self._samples_in_epoch = epoch, 0, 0
        policy = self.manifest.eval
        if policy is not None and epoch > 0 and epoch % policy.every == 0 and (
                not self._evals or self._evals[-1].epoch != epoch):
            self._evaluate_epoch(epoch)
        every = self.options.checkpoint_every
        if every and self.options.checkpoint_dir is not None and epoch % every == 0:
            self.save_checkpoint()
        self._next_publish = 0.0  # tell the swarm about the new epoch right away

    def _idle_while_paused(self) -> None:
        if self._opt is not None:
            with self._lock:
                self._leave("paused", self._pause_reason or "")
        self._set_status("paused", self._pause_reason or "")
        self._publish()
        self._wakeup.wait(self.options.progress_period)
        self._wakeup.clear()
        if self._pause_reason is None and not self._stop.is_set():
            self._join()

    # ---- joining and leaving the averaging group ----------------------------------------------------

    def _join(self) -> None:
        """Create the swarm optimizer (averagers, progress tracker) and catch up with the swarm."""
        opt = self._make_optimizer()
        if self._saved_opt_state is not None:
            opt.load_state_dict(self._saved_opt_state)
            self._saved_opt_state = None
        self._opt = opt
        if opt.tracker.global_epoch > opt.local_epoch:
            self._set_status("joining", f"catching up from epoch {opt.local_epoch} to {opt.tracker.global_epoch}")
            self._publish()
            opt.load_state_from_peers()
        if opt.local_epoch != self._epoch:
            self._new_epoch(opt.local_epoch, completed=False)
        self._set_status("training", "")
        self._publish()

    def _make_optimizer(self):
        """gradients mode: hivemind.Optimizer with our averagers; local mode: DiLoCo (training/diloco.py).
        Both average on our raw-frame data plane (training/dataplane/)."""
        m, a = self.manifest, self.manifest.averaging
        codec = compression_for(a.compression)
        tracker_opts = dict(min_refresh_period=float(a.min_refresh_period),
                            max_refresh_period=float(a.max_refresh_period),
                            default_refresh_period=float(a.default_refresh_period),
                            metadata_expiration=float(a.metadata_expiration))
        if a.mode == "local":
            return LocalUpdatesOptimizer(
                observer=self._observer, dht=self.dht, run_id=m.hivemind_prefix,
                params=list(self.model.parameters()),
                optimizer=optimizer_factory(m.optimizer.name, m.optimizer.as_dict(), with_state=True),
                target_batch_size=m.target_batch_size, batch_size_per_step=m.batch_size_per_step,
                outer_lr=float(a.outer_lr), outer_momentum=float(a.outer_momentum), overlap=a.overlap,
                compression=codec, matchmaking_time=float(a.matchmaking_time),
                request_timeout=float(a.request_timeout), averaging_timeout=float(a.averaging_timeout),
                allreduce_timeout=float(a.allreduce_timeout), next_chunk_timeout=float(a.next_chunk_timeout),
                load_state_timeout=float(a.load_state_timeout), shutdown_timeout=float(a.shutdown_timeout),
                target_group_size=a.target_group_size, part_size_bytes=a.part_size_bytes,
                declare_state_period=float(a.declare_state_period), tracker_opts=tracker_opts,
                on_inner_step=self._after_inner_step)
        return SwarmOptimizer(
            observer=self._observer,
            dht=self.dht, run_id=m.hivemind_prefix,
            # a DHT client (a node behind NAT) averages as a client. Passed explicitly: hivemind.Optimizer (1.1.12)
            # leaves its own client_mode None when not given, then offers a client's state for download (ValueError)
            client_mode=self.dht.client_mode,
            target_batch_size=m.target_batch_size, batch_size_per_step=m.batch_size_per_step,
            optimizer=optimizer_factory(m.optimizer.name, m.optimizer.as_dict(), with_state=True),
            params=list(self.model.parameters()),
            average_state_every=a.average_state_every,
            delay_state_averaging=a.delay_state_averaging,
            matchmaking_time=float(a.matchmaking_time),
            averaging_timeout=float(a.averaging_timeout),
            allreduce_timeout=float(a.allreduce_timeout),
            next_chunk_timeout=float(a.next_chunk_timeout),
            load_state_timeout=float(a.load_state_timeout),
            shutdown_timeout=float(a.shutdown_timeout),
            grad_compression=codec,
            state_averaging_compression=codec,
            averager_opts=dict(request_timeout=float(a.request_timeout), target_group_size=a.target_group_size,
                               part_size_bytes=a.part_size_bytes, declare_state_period=float(a.declare_state_period)),
            tracker_opts=tracker_opts,
        )

    def _after_inner_step(self, last: bool) -> None:
        """Local mode, inside opt.step() (training thread, lock held): an inner step was taken."""
        if isinstance(self._work, LocalWorkRecorder):
            with self._work_lock:
                self._work.after_step(list(self.model.parameters()), self._opt.inner, last)

    def _leave(self, status: str, reason: str) -> None:
        """Shut hivemind's optimizer down (goodbye to the tracker, pending rounds cancelled or finished
        with zero weight, averagers stopped), keeping the model and optimizer state for a later resume."""
        opt, self._opt = self._opt, None
        if isinstance(self._work, LocalWorkRecorder):  # a round applied while leaving may move the parameters
            with self._work_lock:
                self._work.end_epoch(self._epoch, completed=False)
        self._saved_opt_state = opt.state_dict()
        opt.shutdown()
        self._set_status(status, reason)
        self._publish()

    # ---- progress -------------------------------------------------------------------------------------

    def _default_payload(self, kind: str) -> list[int]:
        return [self._epoch, self._samples_in_epoch]

    def _set_status(self, status: str, reason: str) -> None:
        self._status, self._reason = status, reason

    def _maybe_publish(self) -> None:
        if self._clock() >= self._next_publish:
            self._publish()

    def _publish(self) -> None:
        now = self._clock()
        mark_time, mark_samples = self._rate_mark
        if now - mark_time > 0:
            self._samples_per_second = (self._samples_done - mark_samples) / (now - mark_time)
        self._rate_mark = (now, self._samples_done)
        self._next_publish = now + self.options.progress_period
        status = "joining" if self._status == "starting" else self._status
        record = ProgressRecord.make(
            epoch=self._epoch, samples_done=self._samples_done, loss=self._loss_ema,
            samples_per_second=self._samples_per_second if status == "training" else 0.0,
            status=status, reason=self._reason, now=self._wall_clock(), device=str(self.device),
            evals=tuple(self._evals))
        publish_progress(self.dht, self.manifest.run_id, self.identity.peer_id, record,
                         get_dht_time() + self.options.progress_ttl)
