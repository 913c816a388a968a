"""The node's ledger replica: its SQLite store and the sync protocol, served on the node's own protocol loop."""

from __future__ import annotations

import logging
from pathlib import Path

from p2pcompute.node.loop import BackgroundLoop

logger = logging.getLogger(__name__)

SYNC_STOP_TIMEOUT = 10.0  # seconds for the sync protocol to stop serving when the node stops


class LedgerHost:
    """`start(dht)` opens the store and serves `/p2pc/ledger` on the DHT's libp2p host; `shutdown()` undoes it.

    While started, `store`, `replica`, `sync` and `loop` (where our protocols, credits too, run) are set."""

    def __init__(self, data_dir: Path, sync_interval: float, startup_timeout: float):
        self.data_dir = data_dir
        self.sync_interval = sync_interval
        self.startup_timeout = startup_timeout
        self.store = None  # ledger.store.Store
        self.replica = None  # ledger.replica.Replica
        self.loop: BackgroundLoop | None = None
        self.sync = None  # services.sync.LedgerSync

    def start(self, dht) -> "LedgerHost":
        from p2pcompute.ledger.store import Store
        from p2pcompute.ledger.replica import Replica
        from p2pcompute.services.sync import LedgerSync

        self.store = Store.in_data_dir(self.data_dir)
        self.replica = Replica(self.store)
        self.loop = BackgroundLoop().start()
        p2p = self.loop.run(dht.replicate_p2p(), timeout=self.startup_timeout)
        self.sync = LedgerSync(p2p, self.replica, sync_interval=self.sync_interval)
        self.loop.run(self.sync.start(), timeout=self.startup_timeout)
        return self

    def shutdown(self) -> None:
        if self.sync is not None:
            try:
                self.loop.run(self.sync.shutdown(), timeout=SYNC_STOP_TIMEOUT)
            except TimeoutError:
                logger.warning("ledger sync did not stop within %.0f s", SYNC_STOP_TIMEOUT)
            self.sync = None
        if self.loop is not None:
            self.loop.shutdown()
            self.loop = None
        if self.store is not None:
            self.store.close()
            self.store = None
