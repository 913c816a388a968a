"""The node's data: its artifact cache, the /p2pc/shards/1 service on the protocol loop, and its provider records in the DHT."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from p2pcompute.errors import DatasetUnavailable
from p2pcompute.node.loop import BackgroundLoop
from p2pcompute.node.shared_dht import SharedDHT
from p2pcompute.runs.artifact_cache import ArtifactCache, artifacts_dir
from p2pcompute.runs.sharded import ShardSource
from p2pcompute.swarm.providers import Holdings

logger = logging.getLogger(__name__)

REFRESH_FRACTION = 3  # provider records are re-stored this many times per TTL, like peer records
# Collections announced per refresh (one DHT store each every TTL/3, which must stay cheap): a node holding more
# announces its datasets first, then other files, and leaves the rest unannounced (logged).
MAX_ANNOUNCED = 256
# Seconds one fetch may take from the trainer's side: every provider tried in turn, each chunk bounded by the
# shard protocol's call timeout; a 256 MiB shard at ~2 MiB/s is about 2 minutes.
FETCH_TIMEOUT = 600.0
STOP_TIMEOUT = 10.0


class DataHost:
    """`start()` serves the cache and begins announcing what it holds; `fetch(sha256, ...)` (any thread) returns a
    verified file's path, fetching it from peers if needed; `source()` is what a trainer opens datasets with."""

    def __init__(self, data_dir: Path, cap_bytes: int, record_ttl: float, peer_id: bytes):
        self.cache = ArtifactCache(artifacts_dir(data_dir), cap_bytes)
        self.record_ttl = record_ttl
        self.peer_id = peer_id
        self.service = None  # services.shards.ShardService, once started
        self._shared: SharedDHT | None = None
        self._loop: BackgroundLoop | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, shared: SharedDHT, loop: BackgroundLoop, p2p, timeout: float) -> "DataHost":
        from p2pcompute.services.shards import ShardService

        self._shared, self._loop = shared, loop
        self.service = ShardService(p2p, self.cache, self._find, self._stored)
        loop.run(self.service.add_handler(), timeout=timeout)
        self._thread = threading.Thread(target=self._announce_loop, name="data-providers", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            self._thread = None
        if self.service is not None and self._loop is not None:
            try:
                self._loop.run(self.service.remove_handler(), timeout=STOP_TIMEOUT)
            except TimeoutError:
                logger.warning("the shard service did not stop within %.0f s", STOP_TIMEOUT)
            self.service = None

    # ---- what the trainer uses ----------------------------------------------------------------------

    def fetch(self, sha256: bytes, **options) -> Path:
        """The cached file holding `sha256`, fetched from peers if needed (see ShardService.fetch); any thread."""
        path = self.cache.path(sha256)
        if path is not None:
            return path
        try:
            return self._loop.run(self.service.fetch(sha256, **options), timeout=FETCH_TIMEOUT)
        except TimeoutError:
            raise DatasetUnavailable(f"fetching {sha256.hex()[:12]} took more than {FETCH_TIMEOUT:.0f} s") from None

    def source(self) -> ShardSource:
        return ShardSource(self.fetch, self.cache)

    # ---- provider records -----------------------------------------------------------------------------

    def _find(self, collection: bytes) -> dict[bytes, Holdings]:
        from p2pcompute.swarm.providers import find

        with self._shared.held() as dht:
            return find(dht, collection)

    def _stored(self, collection: bytes) -> None:
        self._changed.set()  # announce the new holding now: others may fetch it from us (BitTorrent-style)

    def holdings(self) -> dict[bytes, Holdings]:
        """collection -> what we hold of it: each dataset whose manifest we hold (a bit per shard), and every other
        file as a collection of one."""
        held = self.cache.held()
        out: dict[bytes, Holdings] = {}
        in_datasets: set[bytes] = set()
        for manifest in self.cache.dataset_manifests():
            dataset_id = manifest.dataset_id
            in_datasets.add(dataset_id)
            in_datasets.update(s.sha256 for s in manifest.shards)
            out[dataset_id] = Holdings.of(len(manifest.shards),
                                          {i for i, s in enumerate(manifest.shards) if s.sha256 in held})
        for sha256 in held:
            if sha256 not in in_datasets:
                out[sha256] = Holdings.of(1, {0})
        if len(out) > MAX_ANNOUNCED:
            logger.info("holding %d datasets and files; announcing the first %d", len(out), MAX_ANNOUNCED)
        return dict(list(out.items())[:MAX_ANNOUNCED])

    def announce(self) -> int:
        """Store a provider record for everything held; returns how many were stored by some DHT peer."""
        from p2pcompute.swarm.dht import dht_time
        from p2pcompute.swarm.providers import announce

        stored = 0
        for collection, holdings in self.holdings().items():
            with self._shared.held() as dht:
                stored += announce(dht, self.peer_id, collection, holdings, dht_time() + self.record_ttl)
        return stored

    def _announce_loop(self) -> None:
        period = self.record_ttl / REFRESH_FRACTION
        while not self._stop.is_set():
            self._changed.clear()
            try:
                self.announce()
            except Exception as e:  # keep announcing through transient DHT/p2pd errors; log each one
                logger.warning("announcing held data failed: %s", e)
            self._changed.wait(period)
