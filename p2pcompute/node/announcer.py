"""This node's peer record in the DHT: what it says, publishing it on change and every TTL/3, the stopped tombstone."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from p2pcompute import __version__
from p2pcompute.identity import Identity
from p2pcompute.node.hardware import Hardware
from p2pcompute.node.shared_dht import SharedDHT
from p2pcompute.swarm.records import PeerRecord

logger = logging.getLogger(__name__)

REFRESH_FRACTION = 3  # refresh the peer record this many times per TTL so one lost store never expires it
STOPPED_RECORD_TTL = 5.0  # seconds a "stopped" tombstone record stays visible after a clean shutdown
MAX_RECORD_ADDRS = 8  # multiaddrs put in the record; the rest are found through the DHT itself


class PeerAnnouncer:
    """Keeps our peer record fresh and the list of peers we know: `start()` publishes it (raising if that fails)
    and starts the refresher; `shutdown()` stops it and leaves a short-lived "stopped" record behind.

    `stop` is the node's stop event when given: once it is set the refresher ends and state changes are no
    longer published (the node is going away; the tombstone says so)."""

    def __init__(self, shared: SharedDHT, identity: Identity, name: str, hardware: Hardware, maddrs: list[str],
                 record_ttl: float, started_at: float, clock: Callable[[], float], status: str = "idle",
                 stop: threading.Event | None = None, reachability: str = "unknown"):
        self.shared = shared
        self.identity = identity
        self.name = name
        self.hardware = hardware
        self.maddrs = maddrs
        self.record_ttl = record_ttl
        self.started_at = started_at
        self.clock = clock
        self.status = status
        self.run_id = b""
        self.reachability = reachability  # swarm.records.REACHABILITY
        self.known_peers: list[PeerRecord] = []
        self._stop = stop if stop is not None else threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PeerAnnouncer":
        self.publish()
        self._thread = threading.Thread(target=self._refresh_loop, name="peer-record", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.status = "stopped"
        try:
            self.publish(ttl=STOPPED_RECORD_TTL)
        except Exception as e:  # best effort: the DHT or its p2pd may already be gone (Ctrl-C hits them too)
            logger.debug("could not publish the stopped record: %s", e)

    def set_state(self, status: str, run_id: bytes) -> None:
        """What our record says (idle / starting / training / paused, and which run); published at once when it
        changes. A node starting on a run already says "training"."""
        status = {"starting": "training"}.get(status, status)
        if (status, run_id) != (self.status, self.run_id):
            self.status, self.run_id = status, run_id
            if not self._stop.is_set():
                try:
                    self.publish()
                except Exception as e:  # the refresher publishes again within TTL/3
                    logger.info("could not publish the peer record now: %s", e)

    def set_reachability(self, state: str) -> None:
        """A re-check changed our reachability: published at once (the refresher retries within TTL/3)."""
        if state != self.reachability:
            self.reachability = state
            if not self._stop.is_set():
                try:
                    self.publish()
                except Exception as e:  # the refresher publishes again within TTL/3
                    logger.info("could not publish the peer record now: %s", e)

    def record(self) -> PeerRecord:
        hw = self.hardware
        return PeerRecord(
            peer_id=self.identity.peer_id.to_bytes(),
            software=__version__,
            name=self.name,
            device=hw.device,
            device_name=hw.device_name,
            memory_bytes=hw.memory_bytes,
            samples_per_s_milli=0,
            status=self.status,
            run_id=self.run_id,
            addrs=tuple(self.maddrs[:MAX_RECORD_ADDRS]),
            started_at_ms=int(self.started_at * 1000),
            updated_at_ms=int(self.clock() * 1000),
            reachability=self.reachability,
        )

    def publish(self, ttl: float | None = None) -> bool:
        from p2pcompute.swarm.dht import publish_peer_record

        with self.shared.held() as dht:
            return publish_peer_record(dht, self.record(), ttl or self.record_ttl)

    def fetch_peers(self) -> list[PeerRecord]:
        """The live peers' records (stopped ones left out), kept as `known_peers`."""
        from p2pcompute.swarm.dht import fetch_peer_records

        with self.shared.held() as dht:
            peers = fetch_peer_records(dht)
        self.known_peers = [p for p in peers if p.status != "stopped"]
        return self.known_peers

    def _refresh_loop(self) -> None:
        period = self.record_ttl / REFRESH_FRACTION
        first = True
        while first or not self._stop.wait(period):
            try:
                if not first and not self.publish():
                    logger.warning("peer record refresh was not stored by any DHT peer")
                self.fetch_peers()
            except Exception as e:  # keep refreshing through transient DHT/p2pd errors; log each one
                logger.warning("peer record refresh failed: %s", e)
            first = False
