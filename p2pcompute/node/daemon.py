"""The node daemon, the composition root: builds the node's parts in order, wires them, and stops them in reverse."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Callable

from p2pcompute.config import NodeConfig
from p2pcompute.identity import Identity
from p2pcompute.node import hardware, reachability
from p2pcompute.node.announcer import PeerAnnouncer
from p2pcompute.node.api import ControlAPI
from p2pcompute.node.control import load_or_create_token, write_private
from p2pcompute.node.control_server import ControlServer
from p2pcompute.node.dashboard import Dashboard
from p2pcompute.node.final_checkpoints import FinalCheckpoints
from p2pcompute.node.history import RunHistory
from p2pcompute.node.data_host import DataHost
from p2pcompute.node.instance_lock import InstanceLock
from p2pcompute.node.ledger_host import LedgerHost
from p2pcompute.node.pacing import PublishPacing
from p2pcompute.node.run_credits import RunCredits
from p2pcompute.node.shared_dht import SharedDHT
from p2pcompute.node.training import SupervisorHooks, TrainingSupervisor
from p2pcompute.node.watchdog import Watchdog
from p2pcompute.services.reach import Reachability, ReachabilityService

logger = logging.getLogger(__name__)

MULTIADDRS_FILENAME = "multiaddrs"
REACH_STOP_TIMEOUT = 10.0  # seconds for the dial-back service (and its probe p2pd) to stop


class Node:
    """One volunteer node (or, with role="bootstrap", a DHT-only bootstrap peer).

    `start()` takes the data dir's lock first (`NodeAlreadyRunning` if another instance holds it) and returns
    once the node is reachable and its multiaddrs file is written; `shutdown()` stops everything it started
    (training, control API, peer record, ledger, DHT process and its p2pd) and releases the lock.
    Also a context manager."""

    def __init__(self, config: NodeConfig, role: str = "node", clock: Callable[[], float] = time.time):
        if role not in ("node", "bootstrap"):
            raise ValueError(role)
        self.config = config
        self.role = role
        self.clock = clock
        self.identity: Identity | None = None
        self.hardware: hardware.Hardware | None = hardware.Hardware("none", "", 0) if role == "bootstrap" else None
        self.maddrs: list[str] = []
        self.shared: SharedDHT | None = None  # the DHT handle and its lock
        self.announcer: PeerAnnouncer | None = None
        self.lock = InstanceLock(config.data_dir)
        self.ledger = LedgerHost(config.data_dir, config.sync_interval, config.startup_timeout)
        self.credits: RunCredits | None = None
        self.audits = None  # services.audits.Audits: the issuer's audits of the claims handed to it
        self.data: DataHost | None = None  # the artifact cache and the shard protocol
        self.supervisor: TrainingSupervisor | None = None
        self.history: RunHistory | None = None
        self.finals: FinalCheckpoints | None = None
        self.api: ControlAPI | None = None
        self.control: ControlServer | None = None
        self.reachability: Reachability | None = None  # settled at start (node/reachability.py)
        self.reach: ReachabilityService | None = None  # the dial-back check we serve for others
        self.rechecks: reachability.ReachabilityWatcher | None = None  # "auto" mode: the check, again and again
        self._stop = threading.Event()

    def start(self) -> "Node":
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.lock.acquire()  # before anything else: a second instance must not touch the running one's files
        self.identity = Identity.load_or_create(config.key_path)
        if self.hardware is None:
            self.hardware = hardware.detect(config.device)
        started_at = self.clock()
        try:
            dht, self.reachability = reachability.start_host(config, self.identity, self.role)
            self.shared = SharedDHT(dht)
            self.maddrs = [str(a) for a in dht.get_visible_maddrs(latest=True)]
            self.announcer = PeerAnnouncer(self.shared, self.identity, config.name, self.hardware, self.maddrs,
                                           config.record_ttl, started_at, self.clock,
                                           status="bootstrap" if self.role == "bootstrap" else "idle", stop=self._stop,
                                           reachability=self.reachability.state)
            self.ledger.start(dht, self.identity)
            if self.reachability.state != "private":  # others ask us to dial them back
                self.reach = ReachabilityService(self.ledger.sync.p2p)
                self.ledger.loop.run(self.reach.start(), timeout=config.startup_timeout)
            self.data = DataHost(config.data_dir, config.data_cache_mb * 2**20, config.record_ttl,
                                 self.identity.peer_id.to_bytes()).start(self.shared, self.ledger.loop,
                                                                         self.ledger.sync.p2p, config.startup_timeout)
            self.announcer.start()
            if config.reach_recheck > 0 and reachability.initial(config, self.role)[0] == "auto":
                self.rechecks = reachability.ReachabilityWatcher(dht, config.bootstrap, self.reachability,
                                                                 config.reach_recheck, self._reachability_changed)
                self.rechecks.start()
            self.finals = FinalCheckpoints(config, self.identity, self.shared, self.ledger.loop,
                                           self.ledger.sync.p2p).start()
            if self.role == "node" and config.train:
                self.credits = RunCredits(self.ledger.loop, self.ledger.sync.p2p, self.ledger.replica, self.identity,
                                          self.ledger.issuer)
                hooks = SupervisorHooks(state_changed=self.announcer.set_state,
                                        round_payload=self.credits.round_payload,
                                        trainer_started=self.credits.trainer_started,
                                        trainer_stopped=self.credits.trainer_stopped,
                                        known_peers=lambda: self.announcer.known_peers,
                                        private=lambda: dht.client_mode)  # an averaging client, whatever re-checks say
                self.supervisor = TrainingSupervisor(config, self.identity, self.shared, self.hardware, hooks,
                                                     finals=self.finals, shards=self.data.source())
                self.history = RunHistory(self.supervisor, self.shared, clock=self.clock)
            self._start_audits(config)
            self.api = ControlAPI(role=self.role, config=config, identity=self.identity, hardware=self.hardware,
                                  shared=self.shared, announcer=self.announcer, ledger=self.ledger,
                                  supervisor=self.supervisor, pacing=PublishPacing(self.hardware.device, self.maddrs),
                                  clock=self.clock, request_stop=self.request_stop, history=self.history,
                                  open_claims=self.credits.open_claims if self.credits is not None else None,
                                  reachability=lambda: self.reachability, finals=self.finals, data=self.data)
            self.control = ControlServer(config.data_dir, load_or_create_token(config.data_dir), config.control_port,
                                         clock=self.clock)
            self.api.add_routes(self.control)
            Dashboard(self.control, self.api.live, self._export_ledger).mount()
            self.control.start()
            write_private(config.data_dir / MULTIADDRS_FILENAME, ("\n".join(self.maddrs) + "\n").encode())
            if self.supervisor is not None:
                self.supervisor.start()
                self.history.start()
        except BaseException:
            self.shutdown()
            raise
        logger.info("node %s up at %s", self.identity.peer_id_b58, self.maddrs)
        return self

    def _start_audits(self, config) -> None:
        """The issuer audits a random share of the claims it is handed by recomputing them (services/audits.py), with
        this node's trainer of the run when it trains it (node/auditing.py)."""
        from p2pcompute.node.auditing import NodeRecompute
        from p2pcompute.services.audits import Audits

        trainer_of = self.credits.trainer_of if self.credits is not None else (lambda _run_id: None)
        recompute = NodeRecompute(self.identity, trainer_of, config.data_dir / "datasets")
        self.audits = Audits(self.ledger.issuer, self.ledger.sync.p2p, self.ledger.loop.run, recompute).start()
        self.ledger.issuer.audits = self.audits

    def shutdown(self) -> None:
        self._stop.set()  # from here on the peer record no longer follows training state changes
        if self.history is not None:
            self.history.shutdown()
            self.history = None
        if self.rechecks is not None:
            self.rechecks.shutdown()
            self.rechecks = None
        if self.supervisor is not None:
            self.supervisor.shutdown()  # leaves the averaging group cleanly first
            self.supervisor = None
        if self.control is not None:
            self.control.shutdown()
            self.control = None
        if self.credits is not None:
            self.credits.shutdown()
            self.credits = None
        if self.reach is not None:
            try:
                self.ledger.loop.run(self.reach.shutdown(), timeout=REACH_STOP_TIMEOUT)
            except TimeoutError:
                logger.warning("the reachability service did not stop within %.0f s", REACH_STOP_TIMEOUT)
            self.reach = None
        if self.finals is not None:
            self.finals.shutdown()
            self.finals = None
        if self.data is not None:
            self.data.shutdown()  # on the ledger's protocol loop: before it stops
            self.data = None
        if self.audits is not None:
            self.ledger.issuer.audits = None
            self.audits.shutdown()  # its calls run on the ledger's protocol loop: before it stops
            self.audits = None
        self.ledger.shutdown()
        if self.announcer is not None:
            self.announcer.shutdown()  # the "stopped" tombstone, while the DHT is still up
            self.announcer = None
        if self.shared is not None:
            self.shared.dht.shutdown()
            self.shared = None
        if self.lock.held:  # a refused start leaves the running instance's files alone
            with contextlib.suppress(FileNotFoundError):
                (self.config.data_dir / MULTIADDRS_FILENAME).unlink()
            self.lock.release()

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `request_stop()` (or a signal handler) asks the node to stop."""
        return self._stop.wait(timeout)

    def request_stop(self) -> None:
        self._stop.set()

    def _reachability_changed(self, new: Reachability) -> None:
        """A re-check moved our reachability: `node status` and our peer record follow (the host keeps its mode)."""
        self.reachability = new
        if self.announcer is not None:
            self.announcer.set_reachability(new.state)

    def _export_ledger(self, fmt: str, sink) -> None:
        from p2pcompute.ledger.views import export

        export(self.ledger.store, fmt, sink)

    def status_report(self) -> dict:
        """What `p2pc node status` shows (the control API's GET status)."""
        return self.api.status()


def run_foreground(node: Node, on_ready: Callable[[Node], None] | None = None) -> None:
    """Make this process `node`: start its watchdog, start the node, call `on_ready`, serve until SIGINT/SIGTERM,
    then shut down cleanly (p2pd included). Should the process die instead, the watchdog stops what it started."""

    def _handle(signum, _frame):
        logger.info("signal %s: shutting down", signum)
        node.request_stop()

    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    watchdog = Watchdog().start()  # first: it sees every process the node starts from here on
    try:
        node.start()
        if on_ready is not None:
            on_ready(node)
        while not node.wait(timeout=1.0):
            pass
    finally:
        node.shutdown()
        watchdog.shutdown()  # not reached if shutdown failed: the watchdog then stops what is left when we exit
        for s, handler in previous.items():
            signal.signal(s, handler)

