"""The node's training supervisor: picks a run that fits, runs the Trainer under the idle policy, keeps the run announced."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from p2pcompute.errors import P2PCError

if TYPE_CHECKING:
    from p2pcompute.node.daemon import Node
    from p2pcompute.runs.manifest import SignedManifest

logger = logging.getLogger(__name__)

SELECT_PERIOD = 5.0  # seconds between looks for a run while the node has none
MIN_RUN_PREFIX = 4  # hex digits of a run id a user must give to pick it (like short git hashes)


def choose_run(runs: Sequence["SignedManifest"], device: str, memory_bytes: int, wanted: str = "",
               skip: frozenset[bytes] = frozenset()) -> tuple["SignedManifest | None", str]:
    """The run to join and why: the one asked for (id prefix or exact name), else the largest model among
    the runs this hardware can take (small runs can be trained by anyone; big ones need the big machines)."""
    candidates = [r for r in runs if r.run_id not in skip]
    if wanted:
        wanted_lower = wanted.lower()
        matches = [r for r in candidates if r.manifest.name == wanted
                   or (len(wanted) >= MIN_RUN_PREFIX and r.run_id.hex().startswith(wanted_lower))]
        if not matches:
            return None, f"run {wanted!r} is not announced in the swarm (yet)"
        if len({r.run_id for r in matches}) > 1:
            return None, f"run {wanted!r} is ambiguous: give more of the run id"
        why_not = matches[0].manifest.hardware.unmet(device, memory_bytes)
        return (None, why_not) if why_not else (matches[0], "asked for")
    fitting = [r for r in candidates if r.manifest.hardware.unmet(device, memory_bytes) is None]
    if not fitting:
        if candidates:
            return None, "no announced run fits this node"
        return None, "every announced run has ended here" if runs else "no run is announced in the swarm"
    best = max(fitting, key=lambda r: (r.manifest.parameter_count, r.run_id))
    return best, "best fit for this hardware"


class TrainingSupervisor:
    """A thread that keeps one Trainer going on the node: `start()`, `shutdown()`, `status()`."""

    def __init__(self, node: "Node", period: float = SELECT_PERIOD):
        self.node = node
        self.period = period
        self.trainer = None
        self.watcher = None
        self.signed: "SignedManifest | None" = None
        self.reason = "looking for a run"
        self._finished: set[bytes] = set()
        self.final_checkpoints: dict[bytes, Path] = {}  # run id -> the parameters when the run ended here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_announce = 0.0

    def start(self) -> "TrainingSupervisor":
        self._thread = threading.Thread(target=self._run, name="training-supervisor", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        self._stop_trainer()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except P2PCError as e:  # a run we cannot train (bad dataset file, ...): say why, try others
                logger.warning("training: %s", e)
                self.reason = str(e)
                if self.signed is not None:
                    self._finished.add(self.signed.run_id)
                self._stop_trainer()
            self._stop.wait(self.period if self.trainer is None else 1.0)

    def _tick(self) -> None:
        from p2pcompute.swarm.dht import dht_time
        from p2pcompute.swarm.runs import RUN_RECORD_TTL, announce_run

        if self.trainer is not None:
            status = self.trainer.status()
            self.node.set_training_state("paused" if status.status == "paused" else "training", self.signed.run_id)
            if status.status in ("finished", "failed", "stopped"):
                logger.info("run %s %s: %s", self.signed.manifest.name, status.status, status.reason)
                self._finished.add(self.signed.run_id)
                if status.status == "finished":  # keep the result: nobody serves a finished run's state
                    self.final_checkpoints[self.signed.run_id] = self.trainer.save_checkpoint()
                self.reason = f"{self.signed.manifest.name} {status.status} {status.reason}".strip()
                self._stop_trainer()
                return
            if time.monotonic() >= self._next_announce:  # keep the run findable while anyone trains it
                with self.node.dht_lock:
                    announce_run(self.node.dht, self.signed, dht_time())
                self._next_announce = time.monotonic() + RUN_RECORD_TTL / 3
            return
        from p2pcompute.swarm.runs import fetch_runs

        with self.node.dht_lock:
            runs = fetch_runs(self.node.dht)
        hw = self.node.hardware
        signed, self.reason = choose_run(runs, hw.device, hw.memory_bytes, self.node.config.run,
                                         frozenset(self._finished))
        if signed is not None:
            self._start_trainer(signed)

    def _start_trainer(self, signed: "SignedManifest") -> None:
        from p2pcompute.training.idle import IdlePolicy, parse_schedule
        from p2pcompute.training.nvml import IdleWatcher
        from p2pcompute.training.trainer import Trainer, TrainerOptions

        config = self.node.config
        logger.info("joining run %s (%s)", signed.manifest.name, signed.run_id.hex())
        options = TrainerOptions(
            device=config.device, max_memory_fraction=config.max_memory_fraction,
            data_dir=config.data_dir / "datasets", checkpoint_dir=config.data_dir / "checkpoints",
            round_payload=self.node.round_payload(signed), min_peers=config.min_peers,
        )
        self.signed = signed
        self.node.set_training_state("starting", signed.run_id)
        self.trainer = Trainer(self.node.dht, signed, self.node.identity, options).start()
        self.node.on_trainer_started(self.trainer, signed)
        policy = IdlePolicy(max_other_utilization=config.idle_gpu_util, max_memory_fraction=config.max_memory_fraction,
                            schedule=parse_schedule(config.schedule))
        gpu_index = 0 if str(self.trainer.device).startswith("cuda") else None
        self.watcher = IdleWatcher(self.trainer, policy, gpu_index).start()
        self.reason = "training"
        self._next_announce = 0.0

    def _stop_trainer(self) -> None:
        if self.watcher is not None:
            self.watcher.shutdown()
            self.watcher = None
        if self.trainer is not None:
            trainer, self.trainer = self.trainer, None
            trainer.shutdown()
            self.node.on_trainer_stopped(trainer)
        self.node.set_training_state("idle", b"")

    def status(self) -> dict:
        out = {"reason": self.reason, "run": None, "trainer": None, "idle": None}
        if self.signed is not None and self.trainer is not None:
            out["run"] = {"run_id": self.signed.run_id.hex(), "name": self.signed.manifest.name}
            out["trainer"] = self.trainer.status().to_json()
        if self.watcher is not None:
            out["idle"] = {"train": self.watcher.decision.train, "reason": self.watcher.decision.reason}
        return out
