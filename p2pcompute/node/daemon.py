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
        self._dht_lock = threading.Lock()  # the DHT handle's pipe is shared by the API and refresher threads
        self._refresher: threading.Thread | None = None
        self._known_peers: list[PeerRecord] = []

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
            self._publish()
            self._refresher = threading.Thread(target=self._refresh_loop, name="peer-record", daemon=True)
            self._refresher.start()
            self.control = ControlServer(data_dir, load_or_create_token(data_dir), self.config.control_port)
            self._add_routes(self.control)
            self.control.start()
            write_private(data_dir / MULTIADDRS_FILENAME, ("\n".join(self.maddrs) + "\n").encode())
        except BaseException:
            self.shutdown()
            raise
        logger.info("node %s up at %s", self.identity.peer_id_b58, self.maddrs)
        return self

    def shutdown(self) -> None:
        self._stop.set()
        if self.control is not None:
            self.control.shutdown()
            self.control = None
        if self._refresher is not None:
            self._refresher.join(timeout=10)
            self._refresher = None
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

        with self._dht_lock:
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

        with self._dht_lock:
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
            "device": self._hardware.device,
            "device_name": self._hardware.device_name,
            "data_dir": str(self.config.data_dir),
            "pid": os.getpid(),
        }

    def _api_peers(self, _args: dict) -> list[dict]:
        self._known_peers = self.fetch_peers()
        me = self.identity.peer_id.to_bytes()
        return [dict(p.to_json(), self=p.peer_id == me) for p in self._known_peers]

    def _add_routes(self, control: ControlServer) -> None:
        control.route("GET", "status", lambda _args: self.status_report())
        control.route("GET", "peers", self._api_peers)
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

