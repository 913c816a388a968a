"""The node daemon: starts the DHT with the node's key, keeps its peer record fresh, serves the control API."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Callable

from p2pcompute import __version__
from p2pcompute.config import NodeConfig
from p2pcompute.errors import UsageError
from p2pcompute.identity import Identity
from p2pcompute.node import hardware
from p2pcompute.node.control import ControlServer, load_or_create_token, write_private
from p2pcompute.swarm.records import PeerRecord

logger = logging.getLogger(__name__)

MULTIADDRS_FILENAME = "multiaddrs"
REFRESH_FRACTION = 3  # refresh the peer record this many times per TTL so one lost store never expires it
STOPPED_RECORD_TTL = 5.0  # seconds a "stopped" tombstone record stays visible after a clean shutdown


class Node:
    """One volunteer node (or, with role="bootstrap", a DHT-only bootstrap peer).

    `start()` returns once the node is reachable and its multiaddrs file is written; `shutdown()` stops
    everything it started (control API, refresher, DHT process and its p2pd). Also a context manager.
    """

    def __init__(self, config: NodeConfig, role: str = "node", clock: Callable[[], float] = time.time):
        if role not in ("node", "bootstrap"):
            raise ValueError(role)
        self.config = config
        self.role = role
        self.clock = clock
        self.identity: Identity | None = None
        self.dht = None
        self.control: ControlServer | None = None
        self.maddrs: list[str] = []
        self.started_at = 0.0
        self.status = "bootstrap" if role == "bootstrap" else "idle"
        self.run_id = b""
        self._hardware = hardware.Hardware("none", "", 0) if role == "bootstrap" else None
        self._stop = threading.Event()
        self.dht_lock = threading.RLock()  # the DHT handle's pipe is shared by the API, refresher and supervisor
        self._refresher: threading.Thread | None = None
        self._known_peers: list[PeerRecord] = []
        self.store = None  # ledger.store.Store
        self.replica = None  # ledger.replica.Replica
        self.loop = None  # node.loop.BackgroundLoop running our libp2p protocols
        self.sync = None  # services.sync.LedgerSync
        self.supervisor = None  # node.training.TrainingSupervisor
        self.credits = None  # services.credits.CreditsService of the run being (or last) trained

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "Node":
        from p2pcompute.swarm import dht as swarm_dht

        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.identity = Identity.load_or_create(self.config.key_path)
        if self._hardware is None:
            self._hardware = hardware.detect(self.config.device)
        self.started_at = self.clock()
        try:
            self.dht = swarm_dht.start_dht(
                self.identity,
                listen=self.config.listen,
                announce=self.config.announce,
                bootstrap=self.config.bootstrap,
                public=self.config.public,
                startup_timeout=self.config.startup_timeout,
            )
            self.maddrs = [str(a) for a in self.dht.get_visible_maddrs(latest=True)]
            self._start_ledger()
            self._publish()
            self._refresher = threading.Thread(target=self._refresh_loop, name="peer-record", daemon=True)
            self._refresher.start()
            self.control = ControlServer(data_dir, load_or_create_token(data_dir), self.config.control_port)
            self._add_routes(self.control)
            self.control.start()
            write_private(data_dir / MULTIADDRS_FILENAME, ("\n".join(self.maddrs) + "\n").encode())
            if self.role == "node" and self.config.train:
                from p2pcompute.node.training import TrainingSupervisor

                self.supervisor = TrainingSupervisor(self).start()
        except BaseException:
            self.shutdown()
            raise
        logger.info("node %s up at %s", self.identity.peer_id_b58, self.maddrs)
        return self

    def _start_ledger(self) -> None:
        from p2pcompute.ledger.store import Store
        from p2pcompute.ledger.replica import Replica
        from p2pcompute.services.sync import LedgerSync
        from p2pcompute.node.loop import BackgroundLoop

        self.store = Store.in_data_dir(self.config.data_dir)
        self.replica = Replica(self.store)
        self.loop = BackgroundLoop().start()
        p2p = self.loop.run(self.dht.replicate_p2p(), timeout=self.config.startup_timeout)
        self.sync = LedgerSync(p2p, self.replica, sync_interval=self.config.sync_interval)
        self.loop.run(self.sync.start(), timeout=self.config.startup_timeout)

    def _stop_ledger(self) -> None:
        self._stop_credits()
        if self.sync is not None:
            try:
                self.loop.run(self.sync.shutdown(), timeout=10)
            except TimeoutError:
                logger.warning("ledger sync did not stop within 10 s")
            self.sync = None
        if self.loop is not None:
            self.loop.shutdown()
            self.loop = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def shutdown(self) -> None:
        self._stop.set()
        if self.supervisor is not None:
            self.supervisor.shutdown()  # leaves the averaging group cleanly first
            self.supervisor = None
        if self.control is not None:
            self.control.shutdown()
            self.control = None
        if self._refresher is not None:
            self._refresher.join(timeout=10)
            self._refresher = None
        self._stop_ledger()
        if self.dht is not None:
            self.status = "stopped"
            try:
                self._publish(ttl=STOPPED_RECORD_TTL)
            except Exception as e:  # best effort: the DHT or its p2pd may already be gone (Ctrl-C hits them too)
                logger.debug("could not publish the stopped record: %s", e)
            self.dht.shutdown()
            self.dht = None
        with contextlib.suppress(FileNotFoundError):
            (self.config.data_dir / MULTIADDRS_FILENAME).unlink()

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `request_stop()` (or a signal handler) asks the node to stop."""
        return self._stop.wait(timeout)

    def request_stop(self) -> None:
        self._stop.set()

    # ---- training (called by the supervisor) ---------------------------------------------------

    @property
    def hardware(self) -> hardware.Hardware:
        return self._hardware

    def set_training_state(self, status: str, run_id: bytes) -> None:
        """What our peer record says: idle / starting / training / paused, and which run."""
        record_status = {"starting": "training"}.get(status, status)
        if (record_status, run_id) != (self.status, self.run_id):
            self.status, self.run_id = record_status, run_id
            if self.dht is not None and not self._stop.is_set():
                try:
                    self._publish()
                except Exception as e:  # the refresher publishes again within TTL/3
                    logger.info("could not publish the peer record now: %s", e)

    def round_payload(self, signed):
        """What our trainer sends to group mates in each averaging round: the credits service's claims."""

        def payload(kind: str):
            service = self.credits
            if service is None or service.signed.run_id != signed.run_id:
                return None
            return service.payload(kind)

        return payload

    def on_trainer_started(self, trainer, signed) -> None:
        from p2pcompute.services.credits import CreditsService

        self._stop_credits()
        service = CreditsService(self.sync.p2p, self.replica, self.identity, signed, trainer)
        self.loop.run(service.start(), timeout=30)
        self.credits = service

    def on_trainer_stopped(self, trainer) -> None:
        service = self.credits
        if service is not None and service.trainer is trainer and self.loop is not None:
            try:
                self.loop.run(service.finish(), timeout=60)
            except TimeoutError:
                logger.warning("the last claims were not witnessed in time")
            except Exception:  # a credits bug must not take the training supervisor down with it
                logger.exception("credits: finishing the run's claims failed")

    def _stop_credits(self) -> None:
        service, self.credits = self.credits, None
        if service is not None and self.loop is not None:
            try:
                self.loop.run(service.shutdown(), timeout=30)
            except TimeoutError:
                logger.warning("the credits service did not stop in time")

    # ---- peer record ----------------------------------------------------------------------------

    def peer_record(self) -> PeerRecord:
        now_ms = int(self.clock() * 1000)
        hw = self._hardware
        return PeerRecord(
            peer_id=self.identity.peer_id.to_bytes(),
            software=__version__,
            name=self.config.name,
            device=hw.device,
            device_name=hw.device_name,
            memory_bytes=hw.memory_bytes,
            samples_per_s_milli=0,
            status=self.status,
            run_id=self.run_id,
            addrs=tuple(self.maddrs[:8]),
            started_at_ms=int(self.started_at * 1000),
            updated_at_ms=now_ms,
        )

    def _publish(self, ttl: float | None = None) -> bool:
        from p2pcompute.swarm.dht import publish_peer_record

        with self.dht_lock:
            return publish_peer_record(self.dht, self.peer_record(), ttl or self.config.record_ttl)

    def _refresh_loop(self) -> None:
        period = self.config.record_ttl / REFRESH_FRACTION
        first = True
        while first or not self._stop.wait(period):
            try:
                if not first and not self._publish():
                    logger.warning("peer record refresh was not stored by any DHT peer")
                self._known_peers = self.fetch_peers()
            except Exception as e:  # keep refreshing through transient DHT/p2pd errors; log each one
                logger.warning("peer record refresh failed: %s", e)
            first = False

    def fetch_peers(self) -> list[PeerRecord]:
        from p2pcompute.swarm.dht import fetch_peer_records

        with self.dht_lock:
            peers = fetch_peer_records(self.dht)
        return [p for p in peers if p.status != "stopped"]

    # ---- control API ---------------------------------------------------------------------------

    def status_report(self) -> dict:
        return {
            "peer_id": self.identity.peer_id_b58,
            "role": self.role,
            "version": __version__,
            "name": self.config.name,
            "status": self.status,
            "uptime_s": round(self.clock() - self.started_at, 1),
            "multiaddrs": self.maddrs,
            "peers_known": len(self._known_peers),
            "current_run": self.run_id.hex() or None,
            "training": self.supervisor.status() if self.supervisor is not None else None,
            "credits": self._own_credits(),
            "ledger_entries": self.store.count() if self.store is not None else None,
            "device": self._hardware.device,
            "device_name": self._hardware.device_name,
            "data_dir": str(self.config.data_dir),
            "pid": os.getpid(),
        }

    def _own_credits(self) -> int | None:
        """Our balance in micro-credits, from the local replica."""
        if self.store is None:
            return None
        return self.store.balance(self.identity.public_key).credits

    def _api_ledger_top(self, args: dict) -> list[dict]:
        """The leaderboard of this replica (what `p2pc ledger top` reads from the file)."""
        from p2pcompute.identity import peer_id_b58

        limit = args.get("limit", 20)
        if type(limit) is not int or not 1 <= limit <= 1000:
            raise UsageError("limit must be an integer in [1, 1000]")
        return [{"peer_id": peer_id_b58(b.peer), "credits": b.credits, "samples": b.samples, "receipts": b.receipts}
                for b in self.store.top(limit)]

    def _api_ledger_sync(self, args: dict) -> dict:
        """One reconciliation with the peer at args["maddr"] (…/p2p/<peer id>), now."""
        from p2pcompute.services.sync import sync_once_with_maddr

        maddr = args.get("maddr")
        if not isinstance(maddr, str):
            raise UsageError("maddr must be a multiaddr string ending in /p2p/<peer id>")
        return self.loop.run(sync_once_with_maddr(self.sync, maddr), timeout=120)

    def _api_publish_run(self, args: dict) -> dict:
        """Sign a manifest with this node's key, record it in the ledger and announce it in the DHT."""
        from p2pcompute.ledger.codec import KIND_RUN_PUBLISH, RunPublish
        from p2pcompute.runs.manifest import Manifest, sign_manifest
        from p2pcompute.swarm.runs import announce_run
        from p2pcompute.swarm.dht import dht_time

        wire = args.get("manifest")
        if not isinstance(wire, str) or len(wire) > 2 * 64 * 1024:
            raise UsageError("manifest must be the hex of a canonical manifest (at most 64 KiB)")
        try:
            manifest = Manifest.from_wire(bytes.fromhex(wire))
        except ValueError:
            raise UsageError("manifest is not hex") from None
        signed = sign_manifest(manifest, self.identity)
        entry = self.replica.append_local(self.identity, KIND_RUN_PUBLISH, RunPublish.from_manifest(manifest),
                                          int(self.clock() * 1000))
        with self.dht_lock:
            announced = announce_run(self.dht, signed, dht_time())
        return {"run_id": manifest.run_id_hex, "name": manifest.name, "entry_id": entry.id.hex(),
                "announced": announced, "publisher": self.identity.peer_id_b58}

    def _api_runs(self, _args: dict) -> list[dict]:
        """Runs the swarm knows (DHT) and this replica has recorded (ledger), with who trains them now."""
        from p2pcompute.swarm.runs import fetch_runs

        with self.dht_lock:
            announced = fetch_runs(self.dht)
        training: dict[str, list[str]] = {}
        for peer in self._known_peers:
            if peer.run_id and peer.status == "training":
                training.setdefault(peer.run_id.hex(), []).append(peer.to_json()["peer_id"])
        recorded = {s.run_id.hex(): s for s in self.store.runs()} if self.store is not None else {}
        out = []
        for signed in announced:
            run_hex = signed.run_id.hex()
            out.append(dict(signed.manifest.summary(), run_id=run_hex, publisher=signed.publisher_peer_id,
                            in_ledger=run_hex in recorded, peers_training=training.get(run_hex, [])))
        return out

    def _find_run(self, wanted: str):
        """A run announced in the swarm, by id prefix (>= 4 hex digits) or exact name."""
        from p2pcompute.errors import NotFound
        from p2pcompute.node.training import MIN_RUN_PREFIX
        from p2pcompute.swarm.runs import fetch_runs

        if not isinstance(wanted, str) or not wanted:
            raise UsageError("give a run id (or its first 4+ hex digits) or the run's name")
        with self.dht_lock:
            runs = fetch_runs(self.dht)
        matches = {r.run_id: r for r in runs if r.manifest.name == wanted
                   or (len(wanted) >= MIN_RUN_PREFIX and r.run_id.hex().startswith(wanted.lower()))}
        if not matches:
            raise NotFound(f"no run {wanted!r} is announced in the swarm")
        if len(matches) > 1:
            raise UsageError(f"{wanted!r} matches {len(matches)} runs; give more of the run id")
        return next(iter(matches.values()))

    def _api_run_status(self, args: dict) -> dict:
        from p2pcompute.training.progress import fetch_progress, summarize

        signed = self._find_run(args.get("run"))
        with self.dht_lock:
            records = fetch_progress(self.dht, signed.run_id, timeout=30)
        return dict(summarize(records).to_json(), run_id=signed.run_id.hex(), name=signed.manifest.name,
                    max_epochs=signed.manifest.max_epochs, target_batch_size=signed.manifest.target_batch_size)

    def _api_run_checkpoint(self, args: dict) -> dict:
        """Write the run's current parameters to args["path"]: from our own trainer if we train the run,
        else downloaded from a peer that does."""
        from pathlib import Path

        from p2pcompute.training.checkpoint import fetch_checkpoint

        signed = self._find_run(args.get("run"))
        path = args.get("path")
        if not isinstance(path, str) or not Path(path).is_absolute():
            raise UsageError("path must be an absolute file path")
        sup = self.supervisor
        trainer = sup.trainer if sup is not None and sup.signed is not None and sup.signed.run_id == signed.run_id \
            else None
        if trainer is not None:
            written = trainer.save_checkpoint(path)
            return {"path": str(written), "epoch": trainer.status().epoch, "source": "this node"}
        final = sup.final_checkpoints.get(signed.run_id) if sup is not None else None
        if final is not None and final.exists():  # the run ended here: its final parameters are on disk
            import shutil

            from p2pcompute.training.checkpoint import read_checkpoint

            shutil.copyfile(final, path)
            return {"path": path, "epoch": read_checkpoint(path)["epoch"], "source": "this node's final checkpoint"}
        epoch = fetch_checkpoint(self.dht, signed.manifest, path, timeout=float(args.get("timeout", 60)))
        return {"path": path, "epoch": epoch, "source": "a peer"}

    def _api_peers(self, _args: dict) -> list[dict]:
        self._known_peers = self.fetch_peers()
        me = self.identity.peer_id.to_bytes()
        return [dict(p.to_json(), self=p.peer_id == me) for p in self._known_peers]

    def _add_routes(self, control: ControlServer) -> None:
        control.route("GET", "status", lambda _args: self.status_report())
        control.route("GET", "peers", self._api_peers)
        control.route("POST", "ledger/sync", self._api_ledger_sync)
        control.route("POST", "ledger/top", self._api_ledger_top)
        control.route("POST", "runs/publish", self._api_publish_run)
        control.route("GET", "runs", self._api_runs)
        control.route("POST", "runs/status", self._api_run_status)
        control.route("POST", "runs/checkpoint", self._api_run_checkpoint)
        control.route("POST", "shutdown", lambda _args: (self.request_stop(), "stopping")[1])


def run_foreground(node: Node, on_ready: Callable[[Node], None] | None = None) -> None:
    """Start `node`, call `on_ready`, serve until SIGINT/SIGTERM, then shut down cleanly (p2pd included)."""

    def _handle(signum, _frame):
        logger.info("signal %s: shutting down", signum)
        node.request_stop()

    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        node.start()
        if on_ready is not None:
            on_ready(node)
        while not node.wait(timeout=1.0):
            pass
    finally:
        node.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)

