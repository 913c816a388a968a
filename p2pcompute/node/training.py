"""The node's training supervisor: picks a run that fits, runs the Trainer under the idle policy, keeps the run announced."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from p2pcompute.config import NodeConfig
from p2pcompute.errors import P2PCError
from p2pcompute.identity import Identity
from p2pcompute.node.group_wait import group_wait_reason
from p2pcompute.node.hardware import Hardware
from p2pcompute.node.selection import choose_run
from p2pcompute.node.shared_dht import SharedDHT

if TYPE_CHECKING:
    from p2pcompute.node.final_checkpoints import FinalCheckpoints
    from p2pcompute.runs.manifest import SignedManifest
    from p2pcompute.swarm.records import PeerRecord

logger = logging.getLogger(__name__)

SELECT_PERIOD = 5.0  # seconds between looks for a run while the node has none
TRAINER_POLL_PERIOD = 1.0  # seconds between looks at the running trainer (status, re-announcing the run)
SHUTDOWN_TIMEOUT = 120.0  # seconds for the supervisor's thread to end (a trainer leaving its group cleanly)
OWNER_PAUSE_REASON = "paused by the owner"


LAST_ROUNDS = 5  # averaging rounds listed in `node status` (newest last)


def round_json(r) -> dict:
    """One averaging round as `node status` shows it: kind, outcome, group size, and hivemind's error if it failed
    (e.g. "could not find a group": epochs too short for matchmaking, or peers gone)."""
    return {"kind": r.kind, "ok": r.ok, "group_size": len(r.members), "error": r.error or None}


@dataclasses.dataclass(frozen=True)
class SupervisorHooks:
    """What the supervisor tells the node, each called from the supervisor's thread."""

    state_changed: Callable[[str, bytes], None]  # (idle / starting / training / paused, run id or b"")
    round_payload: Callable[["SignedManifest"], Callable[[str], Any]]  # the trainer's per-round payload for a run
    trainer_started: Callable[[Any, "SignedManifest"], None]  # (trainer, its run)
    trainer_stopped: Callable[[Any], None]  # (trainer), after it has shut down
    # the live peers' records as last read from the DHT, and whether this node is private (behind NAT): a private
    # node waits while every other peer of its run is private too (node/group_wait.py)
    known_peers: Callable[[], "Sequence[PeerRecord]"] = lambda: ()
    private: Callable[[], bool] = lambda: False


class TrainingSupervisor:
    """A thread that keeps one Trainer going on the node: `start()`, `shutdown()`, `status()`.

    It reads the run wish and trainer settings from `config`, looks for runs and keeps its own announced
    through `shared`, and tells the node what happens through `hooks`."""

    def __init__(self, config: NodeConfig, identity: Identity, shared: SharedDHT, hardware: Hardware,
                 hooks: SupervisorHooks, period: float = SELECT_PERIOD, finals: "FinalCheckpoints | None" = None,
                 shards=None):
        self.config = config
        self.identity = identity
        self.shared = shared
        self.hardware = hardware
        self.hooks = hooks
        self.finals = finals  # where a finished run's final checkpoint is kept and served from
        self.period = period
        self.shards = shards  # runs.sharded.ShardSource: how trainers get peer-to-peer datasets
        self._trainer = None
        self._last_rounds: list[dict] = []  # round_json of the last trainer's last rounds, once it stopped
        self._watcher = None
        self._signed: "SignedManifest | None" = None
        self._reason = "looking for a run"
        self._finished: set[bytes] = set()
        self._final_checkpoints: dict[bytes, Path] = {}  # run id -> the parameters when the run ended here
        self._stop = threading.Event()
        self._wake = threading.Event()  # set on stop, pause and resume: the thread looks again at once
        self._thread: threading.Thread | None = None
        self._next_announce = 0.0
        self._pause_lock = threading.Lock()
        self._owner_pause: str | None = None  # set by pause(): holds whatever the idle policy says
        self._idle_pause: str | None = None  # set by the idle watcher (schedule, GPU busy)
        self._group_pause: str | None = None  # set while no averaging group can form for us (node/group_wait.py)

    def start(self) -> "TrainingSupervisor":
        if self.finals is not None:  # runs that finished here before a restart are not trained again
            self._finished.update(kept.run_id for kept in self.finals.store.kept())
        self._thread = threading.Thread(target=self._run, name="training-supervisor", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=SHUTDOWN_TIMEOUT)
        self._stop_trainer()

    # ---- what the node may ask -----------------------------------------------------------------

    def status(self) -> dict:
        """What `node status` shows of training: the run, the trainer (with why it waits, if it does), the outcome of
        its last averaging rounds, the idle policy's decision, the owner's pause."""
        out = {"reason": self._reason, "run": None, "trainer": None, "idle": None, "paused": self.paused,
               "pause_reason": self._owner_pause}
        if self._signed is not None and self._trainer is not None:
            out["run"] = {"run_id": self._signed.run_id.hex(), "name": self._signed.manifest.name}
            out["trainer"] = self._trainer.status().to_json()
        trainer = self._trainer
        out["last_rounds"] = ([round_json(r) for r in trainer.rounds()[-LAST_ROUNDS:]] if trainer is not None
                              else self._last_rounds)  # the last trainer's, once it stopped
        if self._watcher is not None:
            out["idle"] = {"train": self._watcher.decision.train, "reason": self._watcher.decision.reason}
        return out

    @property
    def paused(self) -> bool:
        """True while the owner has paused training (`pause()`), whatever the idle policy says."""
        return self._owner_pause is not None

    def pause(self, reason: str = OWNER_PAUSE_REASON) -> None:
        """The owner's pause: the trainer leaves its averaging group after the current step and waits; no run is
        joined until `resume()`. Kept in memory only: a restarted node trains again."""
        with self._pause_lock:
            self._owner_pause = reason
            self._apply_pauses()
        self._wake.set()

    def resume(self) -> None:
        """Undo `pause()`: training goes on unless the idle policy holds it."""
        with self._pause_lock:
            self._owner_pause = None
            self._apply_pauses()
        self._wake.set()

    def _set_idle_pause(self, reason: str | None) -> None:
        with self._pause_lock:
            self._idle_pause = reason
            self._apply_pauses()

    def _apply_pauses(self) -> None:
        """The trainer runs only when neither the owner, the idle policy nor the group rule holds it (caller holds
        _pause_lock)."""
        trainer = self._trainer
        if trainer is None:
            return
        reason = self._owner_pause or self._idle_pause or self._group_pause
        if reason is not None:
            trainer.pause(reason)
        else:
            trainer.resume()

    def current(self) -> tuple["SignedManifest | None", Any]:
        """(the run, its Trainer) being trained now, or (None, None)."""
        trainer, signed = self._trainer, self._signed
        return (signed, trainer) if trainer is not None else (None, None)

    def trainer_for(self, run_id: bytes):
        """Our running Trainer if it trains `run_id`, else None."""
        trainer, signed = self._trainer, self._signed
        return trainer if trainer is not None and signed is not None and signed.run_id == run_id else None

    def final_checkpoint(self, run_id: bytes) -> Path | None:
        """The checkpoint written when `run_id` finished on this node, if it did."""
        return self._final_checkpoints.get(run_id)

    # ---- the supervisor's thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except P2PCError as e:  # a run we cannot train (bad dataset file, ...): say why, try others
                logger.warning("training: %s", e)
                self._reason = str(e)
                if self._signed is not None:
                    self._finished.add(self._signed.run_id)
                self._stop_trainer()
            self._wake.wait(self.period if self._trainer is None else TRAINER_POLL_PERIOD)
            self._wake.clear()

    def _tick(self) -> None:
        from p2pcompute.swarm.dht import dht_time
        from p2pcompute.swarm.runs import RUN_RECORD_TTL, announce_run

        if self._trainer is not None:
            signed = self._signed
            status = self._trainer.status()
            self.hooks.state_changed("paused" if status.status == "paused" else "training", signed.run_id)
            if status.status in ("finished", "failed", "stopped"):
                logger.info("run %s %s: %s", signed.manifest.name, status.status, status.reason)
                self._finished.add(signed.run_id)
                if status.status == "finished":  # keep the result: nobody serves a finished run's state
                    path = self._trainer.save_checkpoint()
                    self._final_checkpoints[signed.run_id] = path
                    if self.finals is not None:
                        self.finals.keep(signed, path, status.epoch)
                self._reason = f"{signed.manifest.name} {status.status} {status.reason}".strip()
                self._stop_trainer()
                return
            self._check_group(signed)
            if time.monotonic() >= self._next_announce:  # keep the run findable while anyone trains it
                with self.shared.held() as dht:
                    announce_run(dht, signed, dht_time())
                self._next_announce = time.monotonic() + RUN_RECORD_TTL / 3
            return
        from p2pcompute.swarm.runs import fetch_runs

        if self._owner_pause is not None:  # no new run while the owner holds training
            self._reason = self._owner_pause
            self.hooks.state_changed("paused", b"")
            return
        with self.shared.held() as dht:
            runs = fetch_runs(dht)
        signed, self._reason = choose_run(runs, self.hardware.device, self.hardware.memory_bytes, self.config.run,
                                          frozenset(self._finished))
        if signed is not None:
            self._start_trainer(signed)

    def _check_group(self, signed: "SignedManifest") -> None:
        """Hold the trainer while no averaging group can form for us (a private node whose run has only private
        peers left), let it go on once one can; said in `node status`, logged once each way."""
        reason = group_wait_reason(self.hooks.private(), signed.run_id, signed.manifest.name,
                                   self.identity.peer_id.to_bytes(), self.hooks.known_peers())
        if reason == self._group_pause:
            return
        logger.info("%s", reason or f"a reachable peer trains {signed.manifest.name} again: training")
        with self._pause_lock:
            self._group_pause = reason
            self._apply_pauses()
        self._reason = reason or self._owner_pause or self._idle_pause or "training"

    def _start_trainer(self, signed: "SignedManifest") -> None:
        from p2pcompute.runs.artifacts import ArtifactStore
        from p2pcompute.training.idle import IdlePolicy, parse_schedule
        from p2pcompute.training.nvml import IdleWatcher
        from p2pcompute.training.trainer import Trainer, TrainerOptions

        config = self.config
        logger.info("joining run %s (%s)", signed.manifest.name, signed.run_id.hex())
        options = TrainerOptions(
            device=config.device, max_memory_fraction=config.max_memory_fraction, cpu_threads=config.cpu_threads,
            data_dir=config.data_dir / "datasets", checkpoint_dir=config.data_dir / "checkpoints",
            round_payload=self.hooks.round_payload(signed), min_peers=config.min_peers, shards=self.shards,
            artifacts=ArtifactStore.for_data_dir(config.data_dir,
                                                 fetch=self.shards.fetch_artifact if self.shards is not None else None),
        )
        self._signed = signed
        self.hooks.state_changed("starting", signed.run_id)
        self._trainer = Trainer(self.shared.dht, signed, self.identity, options).start()
        self.hooks.trainer_started(self._trainer, signed)
        policy = IdlePolicy(max_other_utilization=config.idle_gpu_util, max_memory_fraction=config.max_memory_fraction,
                            schedule=parse_schedule(config.schedule))
        gpu_index = 0 if str(self._trainer.device).startswith("cuda") else None
        self._watcher = IdleWatcher(_IdleSide(self), policy, gpu_index).start()
        with self._pause_lock:
            self._apply_pauses()  # paused by the owner while this trainer started
        self._reason = "training"
        self._next_announce = 0.0

    def _stop_trainer(self) -> None:
        if self._watcher is not None:
            self._watcher.shutdown()
            self._watcher = None
        self._idle_pause = None  # the next trainer gets a watcher of its own
        self._group_pause = None  # and is judged afresh
        if self._trainer is not None:
            trainer, self._trainer = self._trainer, None
            self._last_rounds = [round_json(r) for r in trainer.rounds()[-LAST_ROUNDS:]]
            trainer.shutdown()
            self.hooks.trainer_stopped(trainer)
        self.hooks.state_changed("idle", b"")


class _IdleSide:
    """What the idle watcher sees as its trainer: its pause/resume go through the supervisor, which also keeps
    the owner's pause in force."""

    def __init__(self, supervisor: TrainingSupervisor):
        self._supervisor = supervisor

    def pause(self, reason: str) -> None:
        self._supervisor._set_idle_pause(reason or "paused by the idle policy")

    def resume(self) -> None:
        self._supervisor._set_idle_pause(None)
