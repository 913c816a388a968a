"""Reachability: the /p2pc/reach/1 dial-back check (a public peer dials a node back at the addresses it
advertises, from a libp2p host of its own), the client's question to a few public peers, and the verdict.

Like Petals' `check_direct_reachability`: the answer cannot come from the connection the request arrived on
(it exists already, whichever side opened it), so the server dials from a second, non-listening p2pd (the
"probe", started on the first request and kept). The libp2p handshake proves that the node dialled is the
requester. A server dials only addresses at the IP the request's connection comes from: nobody can make it
dial a third party, and an address behind NAT (a LAN address announced from behind a router) is refused
without a dial, which is the answer. docs/nat.md and docs/protocol.md ("Reachability").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Sequence

from p2pcompute.errors import InvalidMessage, ProtocolError
from p2pcompute.protocol import DAEMON_ERRORS, Limits, Servicer, call, short_peer

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID

logger = logging.getLogger(__name__)

PROTOCOL = "/p2pc/reach/1"
VERSION = 1
MAX_ADDRS = 8  # addresses one request may ask about: a peer record holds at most 8
MAX_ADDR_LEN = 200  # characters of one multiaddr (as in peer records)
DIAL_TIMEOUT = 5.0  # seconds for the probe's dial: a reachable host answers a TCP+TLS handshake well within this
LIMITS = Limits(
    max_request=4096, max_response=1024, max_array_len=16,
    call_timeout=DIAL_TIMEOUT + 5.0,  # the answer comes after the dial (and, once, the probe's ~1 s start)
    # a node checks at start and every [swarm] reach_recheck s (default 600): one request a minute per peer is far above that, and bounds
    # the dials (and p2pd work) one peer can make a server do
    rate_per_s=1 / 60, burst=3.0,
    ban_seconds=600.0,
)
MAX_CONCURRENT_DIALS = 2  # dial-backs one server runs at once, from all requesters together
PEERS_TO_ASK = 3  # public peers a node asks; one that can dial us back is enough
PROBE_START_TIMEOUT = 15.0  # seconds for the probe's p2pd to start (~0.3 s here, more on a loaded machine)
STATES = ("public", "private", "unknown")


@dataclasses.dataclass(frozen=True)
class Reachability:
    """Whether others can dial this node, and why we think so (shown in `node status`)."""

    state: str  # one of STATES
    reason: str

    def to_json(self) -> dict:
        return {"state": self.state, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Answer:
    """One server's answer: did its probe reach us, and what it says about it."""

    peer: str  # the server's short id
    reachable: bool
    detail: str


def decide(answers: Sequence[Answer], asked: int) -> Reachability:
    """The verdict from the answers of the `asked` peers (pure): public if any dialled us back (a peer that
    reaches us proves an address works; one that does not may sit behind a strict firewall itself), private if
    every answer says no, unknown if nobody answered."""
    good = [a for a in answers if a.reachable]
    if good:
        return Reachability("public", f"{good[0].peer} dialled us back ({good[0].detail}); "
                                      f"{len(good)} of {len(answers)} peers could")
    if answers:
        return Reachability("private", f"{len(answers)} public peer(s) could not dial us back "
                                       f"({answers[0].peer}: {answers[0].detail}); others reach us over "
                                       "connections we open and through a relay")
    if asked == 0:
        return Reachability("unknown", "no public peer to check with (no bootstrap peer given)")
    return Reachability("unknown", f"none of the {asked} peer(s) asked answered the dial-back check")


def _check_request(request: Any) -> list[str]:
    if not (isinstance(request, list) and len(request) == 2 and request[0] == VERSION):
        raise ProtocolError(f"expected [{VERSION}, [multiaddr, ...]]")
    addrs = request[1]
    if (not isinstance(addrs, list) or not 0 < len(addrs) <= MAX_ADDRS
            or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_LEN for a in addrs)):
        raise ProtocolError(f"addresses must be 1 to {MAX_ADDRS} multiaddr strings")
    return addrs


def tcp_host(addr) -> str | None:
    """The IP of an /ip4|ip6/X/tcp/P multiaddr (a relay circuit or another transport: None)."""
    protocols = [p.name for p in addr.protocols()]
    if len(protocols) < 2 or protocols[0] not in ("ip4", "ip6") or protocols[1] != "tcp" or "p2p-circuit" in protocols:
        return None
    return addr.value_for_protocol(protocols[0])


class ReachabilityService(Servicer):
    """Serves /p2pc/reach/1 (`start()`/`shutdown()` on the node's loop); `ask()` is the client side."""

    PROTOCOL = PROTOCOL
    LIMITS = LIMITS

    def __init__(self, p2p: "P2P", **kwargs):
        super().__init__(p2p, **kwargs)
        self._probe: "P2P | None" = None
        self._probe_lock = asyncio.Lock()
        self._dials = asyncio.Semaphore(MAX_CONCURRENT_DIALS)
        self.checks = 0  # dial-backs done (for status and tests)

    async def start(self) -> None:
        await self.add_handler()

    async def shutdown(self) -> None:
        await self.remove_handler()
        if self._probe is not None:
            await self._probe.shutdown()
            self._probe = None

    async def _probe_host(self) -> "P2P":
        from hivemind.p2p import P2P

        async with self._probe_lock:
            if self._probe is None:
                # no listening, no relays: a dial from here reaches the requester only at the address we dial
                self._probe = await P2P.create(no_listen=True, host_maddrs=[], use_relay=False, auto_nat=False,
                                               nat_port_map=False, dht_mode="client",
                                               startup_timeout=PROBE_START_TIMEOUT)
            return self._probe

    async def rpc(self, peer: bytes, request: Any) -> Any:
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        addrs = _check_request(request)
        seen_from = await self._remote_hosts(peer)
        candidates = []
        for text in addrs:
            try:
                addr = Multiaddr(text)
            except Exception:  # the multiaddr parser raises assorted types on bad text
                raise InvalidMessage(f"{text[:60]!r} is not a multiaddr") from None
            if "p2p" in [p.name for p in addr.protocols()]:  # p2pd dials the transport part of an address
                if addr.value_for_protocol("p2p") != PeerID(peer).to_base58():
                    continue  # an address of another peer: never dialled
                addr = addr.decapsulate(Multiaddr(f"/p2p/{addr.value_for_protocol('p2p')}"))
            if tcp_host(addr) in seen_from:
                candidates.append(addr)
        if not candidates:
            return [False, f"none of your addresses is at {', '.join(sorted(seen_from)) or 'your address'}, "
                           "where your connection comes from (behind NAT?)"]
        async with self._dials:
            probe = await self._probe_host()
            peer_id = PeerID(peer)
            self.checks += 1
            try:
                await asyncio.wait_for(probe._client.connect(peer_id, candidates), DIAL_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError, OSError) + DAEMON_ERRORS as e:
                first = str(e).splitlines()[0] if str(e) else "timed out"
                return [False, f"could not dial {', '.join(map(str, candidates))}: {first[:150]}"]
            finally:
                try:
                    await probe._client.disconnect(peer_id)
                except DAEMON_ERRORS + (ConnectionError, OSError) as e:  # nothing to close if the dial failed
                    logger.debug("probe disconnect from %s: %s", short_peer(peer), e)
        return [True, f"dialled {', '.join(map(str, candidates))}"]

    async def _remote_hosts(self, peer: bytes) -> set[str]:
        """The IPs our host's connections to `peer` come from (what p2pd sees as their remote address)."""
        hosts = set()
        for info in await self.p2p.list_peers():
            if info.peer_id.to_bytes() == peer:
                hosts.update(h for h in map(tcp_host, info.addrs) if h is not None)
        return hosts


async def ask(p2p: "P2P", peers: Sequence["PeerID"], addrs: Sequence[str]) -> Reachability:
    """Ask up to PEERS_TO_ASK of `peers` (public ones: bootstraps, public nodes) to dial us back at `addrs`."""
    peers = list(dict.fromkeys(peers))[:PEERS_TO_ASK]
    addrs = [a for a in addrs if "/p2p-circuit" not in a][:MAX_ADDRS]

    async def one(peer_id) -> Answer | None:
        try:
            result, _sent, _received = await call(p2p, peer_id, PROTOCOL, LIMITS, [VERSION, addrs],
                                                  "reachability check")
        except ProtocolError as e:
            logger.info("reachability check: %s", e)
            return None
        if not (isinstance(result, list) and len(result) == 2 and isinstance(result[0], bool)
                and isinstance(result[1], str)):
            logger.info("reachability check: malformed answer from %s", short_peer(peer_id.to_bytes()))
            return None
        return Answer(short_peer(peer_id.to_bytes()), result[0], result[1][:200])

    if not addrs:
        return Reachability("unknown", "the node has no TCP address to check")
    answers = [a for a in await asyncio.gather(*(one(p) for p in peers)) if a is not None]
    return decide(answers, len(peers))
