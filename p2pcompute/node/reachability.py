"""How a node settles its reachability: the mode the config asks for, the dial-back check with the bootstrap peers
in "auto" mode, the restart of the libp2p host as a private client when the check says so, and the re-checks."""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import TYPE_CHECKING, Callable, Sequence

from p2pcompute.config import NodeConfig
from p2pcompute.identity import Identity
from p2pcompute.services.reach import Reachability

if TYPE_CHECKING:
    import hivemind

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 20.0  # seconds for the whole start-up check (each peer's call is bounded by reach.LIMITS)


def initial(config: NodeConfig, role: str) -> tuple[str, Reachability | None]:
    """(the mode to start p2pd in, the reachability if it is settled without a check)."""
    mode = config.public
    if role == "bootstrap" and mode in ("auto", "private"):
        return "public", Reachability("public", "a bootstrap peer runs at a reachable address (not checked)")
    if mode == "public":
        return "public", Reachability("public", "forced by --public (public = true): not checked")
    if mode == "private":
        return "private", Reachability("private", 'forced by public = "private": a client behind NAT')
    if mode == "local":
        return "local", Reachability("public", "--local: a loopback/LAN swarm, every peer assumed reachable")
    if all(_loopback(addr) for addr in config.listen):
        return "local", Reachability("public", "listening on loopback only: a local swarm")
    return "auto", None


def _loopback(maddr: str) -> bool:
    parts = maddr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return False
    try:
        return ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False


def check(dht: "hivemind.DHT", bootstrap: Sequence[str], maddrs: Sequence[str]) -> Reachability:
    """Ask the bootstrap peers to dial us back at `maddrs` (our host's own addresses, loopback left out)."""
    import asyncio

    from hivemind.p2p import PeerID

    from p2pcompute.node.loop import BackgroundLoop
    from p2pcompute.services.reach import ask

    peers = []
    for addr in bootstrap:
        try:
            peers.append(PeerID.from_base58(addr.rsplit("/p2p/", 1)[1]))
        except (IndexError, ValueError):  # config checked they end in /p2p/<id>; a bad id is just not asked
            continue
    addrs = [a for a in maddrs if not _loopback(a)]

    async def run() -> Reachability:
        p2p = await dht.replicate_p2p()
        try:
            return await ask(p2p, peers, addrs)
        finally:
            await p2p.shutdown()

    loop = BackgroundLoop("p2pc-reach-check").start()
    try:
        return loop.run(run(), timeout=CHECK_TIMEOUT)
    except (TimeoutError, asyncio.TimeoutError):
        return Reachability("unknown", f"the dial-back check did not finish within {CHECK_TIMEOUT:.0f} s")
    finally:
        loop.shutdown()


def start_host(config: NodeConfig, identity: Identity, role: str) -> tuple["hivemind.DHT", Reachability]:
    """Start the node's DHT and p2pd in the mode its reachability calls for (see docs/nat.md): in "auto" mode a
    reachable host first, then, if no bootstrap peer can dial it back, again as a private client with a relay
    reservation (the DHT and p2pd are restarted before anything else runs on them)."""
    from p2pcompute.swarm.dht import start_dht

    mode, reachability = initial(config, role)

    def start(mode: str):
        return start_dht(identity, listen=config.listen, announce=config.announce, bootstrap=config.bootstrap,
                         mode=mode, startup_timeout=config.startup_timeout)

    dht = start(mode)
    if reachability is not None:
        return dht, reachability
    try:
        reachability = check(dht, config.bootstrap, [str(a) for a in dht.get_visible_maddrs(latest=True)])
    except BaseException:
        dht.shutdown()
        raise
    logger.info("reachability: %s (%s)", reachability.state, reachability.reason)
    if reachability.state == "private":
        dht.shutdown()
        dht = start("private")
    return dht, reachability


def follow(current: Reachability, new: Reachability, host_mode: str) -> Reachability | None:
    """The verdict after a re-check, or None to keep `current`. An `unknown` answer (no public peer answered, or
    each refused: rate limits) says nothing new, so what we knew stays. A changed state replaces it; since the
    libp2p host keeps the mode it started in (`host_mode`: "private" client or "public"), the reason says so when
    the two now differ."""
    if new.state == "unknown" or new.state == current.state:
        return None
    if new.state != host_mode:
        return Reachability(new.state, f"{new.reason} (re-checked; the node keeps running as a {host_mode} peer "
                                       "until it restarts)")
    return new


class ReachabilityWatcher:
    """Re-runs the dial-back check every `period` seconds and calls `changed(reachability)` when the verdict moves
    (see `follow`). `start()`/`shutdown()`; the check runs on the watcher's own thread."""

    def __init__(self, dht: "hivemind.DHT", bootstrap: Sequence[str], current: Reachability, period: float,
                 changed: Callable[[Reachability], None]):
        self.dht = dht
        self.bootstrap = bootstrap
        self.current = current
        self.period = period
        self.changed = changed
        self.host_mode = "private" if dht.client_mode else "public"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "ReachabilityWatcher":
        self._thread = threading.Thread(target=self._loop, name="reachability-recheck", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=CHECK_TIMEOUT + 5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                new = check(self.dht, self.bootstrap, [str(a) for a in self.dht.get_visible_maddrs(latest=True)])
            except Exception as e:  # p2pd or the DHT process going away under us (shutdown): the next round tries
                logger.info("reachability re-check failed: %s", e)
                continue
            verdict = follow(self.current, new, self.host_mode)
            if verdict is not None:
                logger.info("reachability changed: %s -> %s (%s)", self.current.state, verdict.state, verdict.reason)
                self.current = verdict
                self.changed(verdict)
