"""The node's ledger replica: its SQLite store, the sync protocol and the payouts it issues, served on the node's own protocol loop."""

from __future__ import annotations

import logging
from pathlib import Path

from p2pcompute.node.loop import BackgroundLoop

logger = logging.getLogger(__name__)

SYNC_STOP_TIMEOUT = 10.0  # seconds for the sync protocol to stop serving when the node stops


class LedgerHost:
    """`start(dht, identity)` opens the store and serves `/p2pc/ledger` and `/p2pc/payouts` (for the runs this node
    issues credits of) on the DHT's libp2p host; `shutdown()` undoes it.

    While started, `store`, `replica`, `sync`, `issuer` and `loop` (where our protocols, credits too, run) are set."""

    def __init__(self, data_dir: Path, sync_interval: float, startup_timeout: float):
        self.data_dir = data_dir
        self.sync_interval = sync_interval
        self.startup_timeout = startup_timeout
        self.store = None  # ledger.store.Store
        self.replica = None  # ledger.replica.Replica
        self.loop: BackgroundLoop | None = None
        self.sync = None  # services.sync.LedgerSync
        self.issuer = None  # services.issuer.Issuer
        self._payouts = None  # services.issuer.IssuerService

    def start(self, dht, identity) -> "LedgerHost":
        from p2pcompute.ledger.store import Store
        from p2pcompute.ledger.replica import Replica
        from p2pcompute.services.issuer import Issuer, IssuerService
        from p2pcompute.services.sync import LedgerSync

        self.store = Store.in_data_dir(self.data_dir)
        self.replica = Replica(self.store)
        self.loop = BackgroundLoop().start()
        p2p = self.loop.run(dht.replicate_p2p(), timeout=self.startup_timeout)
        self.sync = LedgerSync(p2p, self.replica, sync_interval=self.sync_interval)
        self.loop.run(self.sync.start(), timeout=self.startup_timeout)
        self.issuer = Issuer(self.replica, identity)
        self._payouts = IssuerService(p2p, self.issuer)
        self.loop.run(self._payouts.add_handler(), timeout=self.startup_timeout)
        return self

    def shutdown(self) -> None:
        if self._payouts is not None:
            self._stop(self._payouts.remove_handler(), "the payouts protocol")
            self._payouts = None
        if self.sync is not None:
            self._stop(self.sync.shutdown(), "ledger sync")
            self.sync = None
        if self.loop is not None:
            self.loop.shutdown()
            self.loop = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def _stop(self, coro, what: str) -> None:
        try:
            self.loop.run(coro, timeout=SYNC_STOP_TIMEOUT)
        except TimeoutError:
            logger.warning("%s did not stop within %.0f s", what, SYNC_STOP_TIMEOUT)
