"""Our request/response protocols on the node's libp2p host: framing, size limits, per-peer rate limits and
bans, the servicer base (`rpc` on the server side) and the client call (docs/protocol.md, "Framing").

Every protocol of ours (ledger sync, credits, and those to come) is a `Servicer` with its own `Limits`: one
request and one response per stream, each a length-prefixed msgpack frame. The server reads the request
(refusing it before reading if it announces more than the protocol's request limit), checks the sender's
ban and rate, then answers `[0, result]` or `[1, reason]`; the client reads the response under the
protocol's response limit and the call's timeout. A peer that sends a malformed or oversize frame, or
something the protocol marks as provably bad (a forged signature, an invalid entry), is banned for a while.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import msgpack
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, DispatchFailure, P2PDaemonError

from p2pcompute.errors import InvalidEntry, InvalidMessage, InvalidSignature, ProtocolError, StoreError

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID

logger = logging.getLogger(__name__)

HEADER_BYTES = 4  # big-endian length of the msgpack body that follows
MAX_REASON = 300  # characters of a refusal's reason sent back (enough to say why, not a second payload)
# what the p2pd client raises when a peer is unreachable or does not speak a protocol
DAEMON_ERRORS = (ControlFailure, DispatchFailure, P2PDaemonError)
NETWORK_ERRORS = (asyncio.IncompleteReadError, ConnectionError, OSError) + DAEMON_ERRORS


@dataclasses.dataclass(frozen=True)
class Limits:
    """A protocol's limits. Sizes are whole frames (header included); rates are per remote peer."""

    max_request: int  # bytes of one request frame the server reads
    max_response: int  # bytes of one response frame the client reads
    max_array_len: int = 1 << 16  # items in any msgpack array of a frame (bounds the decoder's allocations)
    call_timeout: float = 10.0  # seconds for one request/response, connection set-up included
    rate_per_s: float = 20.0  # requests one peer may make per second on average ...
    burst: float = 50.0  # ... and in a burst
    ban_seconds: float = 600.0  # a peer that sent a malformed frame or provably bad data is ignored this long


# ---- framing ---------------------------------------------------------------------------------------


def encode_frame(obj: Any, max_bytes: int) -> bytes:
    data = msgpack.packb(obj, use_bin_type=True)
    if HEADER_BYTES + len(data) > max_bytes:
        raise ProtocolError(f"refusing to send a {HEADER_BYTES + len(data)}-byte frame (limit {max_bytes})")
    return len(data).to_bytes(HEADER_BYTES, "big") + data


async def write_frame(writer: asyncio.StreamWriter, obj: Any, max_bytes: int) -> int:
    """Send one frame; returns the bytes written."""
    frame = encode_frame(obj, max_bytes)
    writer.write(frame)
    await writer.drain()
    return len(frame)


async def read_frame(reader: asyncio.StreamReader, max_bytes: int, max_array_len: int) -> tuple[Any, int]:
    """Read one frame, refusing it before reading the body if it announces more than `max_bytes`;
    returns (object, bytes read). Maps are refused (our messages are arrays), as are msgpack extensions."""
    length = int.from_bytes(await reader.readexactly(HEADER_BYTES), "big")
    if HEADER_BYTES + length > max_bytes:
        raise ProtocolError(f"peer announced a {HEADER_BYTES + length}-byte frame (limit {max_bytes})", malformed=True)
    data = await reader.readexactly(length)
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=max_bytes,
                              max_array_len=max_array_len, max_map_len=0, max_ext_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"malformed msgpack frame: {e}", malformed=True) from None
    return obj, HEADER_BYTES + length


# ---- per-peer limits -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Bucket:
    tokens: float
    updated: float


class PeerLimits:
    """Token bucket per peer plus a ban list; `clock` is passed in so tests control time.

    Buckets of peers that have been quiet long enough to refill are dropped, so the table stays bounded by
    the peers active within the last `burst / rate` seconds."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits, clock
        self._buckets: dict[bytes, _Bucket] = {}
        self._banned: dict[bytes, float] = {}

    def banned(self, peer: bytes) -> bool:
        until = self._banned.get(peer)
        if until is None:
            return False
        if self.clock() >= until:
            del self._banned[peer]
            return False
        return True

    def ban(self, peer: bytes, why: str) -> None:
        logger.warning("banning peer %s for %.0f s: %s", short_peer(peer), self.limits.ban_seconds, why)
        self._banned[peer] = self.clock() + self.limits.ban_seconds

    def allow(self, peer: bytes, cost: float = 1.0) -> bool:
        """Take `cost` tokens from `peer`'s bucket (a request costs 1; a protocol may charge more for the
        signatures a request makes it check); False, taking nothing, if the bucket holds fewer."""
        now = self.clock()
        rate, burst = self.limits.rate_per_s, self.limits.burst
        bucket = self._buckets.setdefault(peer, _Bucket(burst, now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if len(self._buckets) > 4096:  # forget peers whose buckets are full again (they owe nothing)
            refill = burst / rate
            self._buckets = {p: b for p, b in self._buckets.items() if now - b.updated < refill or p == peer}
        if bucket.tokens < cost:
            return False
        bucket.tokens -= cost
        return True


def short_peer(peer: bytes) -> str:
    """The last 8 base58 characters of a PeerID: enough to tell peers apart in a log line."""
    import base58

    return base58.b58encode(peer).decode()[-8:]


# ---- client side -------------------------------------------------------------------------------------


async def call(p2p: "P2P", peer_id: "PeerID", protocol: str, limits: Limits, request: Any, what: str
               ) -> tuple[Any, int, int]:
    """One request/response exchange on a fresh stream, bounded by the protocol's call timeout.
    Returns (result, bytes sent, bytes received); ProtocolError if the peer is unreachable, does not speak
    `protocol`, answers malformed or too large, or refuses (`[1, reason]`)."""

    async def exchange():
        _info, reader, writer = await p2p.call_binary_stream_handler(peer_id, protocol)
        try:
            sent = await write_frame(writer, request, limits.max_request)
            reply, received = await read_frame(reader, limits.max_response, limits.max_array_len)
            return reply, sent, received
        finally:
            writer.close()

    peer = short_peer(peer_id.to_bytes())
    try:
        reply, sent, received = await asyncio.wait_for(exchange(), limits.call_timeout)
    except asyncio.TimeoutError:
        raise ProtocolError(f"{what} to {peer} timed out") from None
    except NETWORK_ERRORS as e:  # unreachable peer, or one that does not speak the protocol
        raise ProtocolError(f"{what} to {peer} failed: {e}") from None
    if not (isinstance(reply, list) and len(reply) == 2 and type(reply[0]) is int and reply[0] in (0, 1)):
        raise ProtocolError(f"malformed response to {what} from {peer}", malformed=True)
    if reply[0] == 1:
        raise ProtocolError(f"peer {peer} refused {what}: {str(reply[1])[:MAX_REASON]}")
    return reply[1], sent, received


# ---- server side -------------------------------------------------------------------------------------


class Servicer:
    """The server side of one protocol: subclasses set PROTOCOL and LIMITS and implement `rpc`.

    `rpc(peer, request)` returns the result or raises: ProtocolError/InvalidMessage (refused, the reason
    goes back), one of BAN_ON (refused and the peer banned: provably bad input), StoreError (our own
    failure: logged, the peer is told only that the responder failed). Handlers run on the node's loop."""

    PROTOCOL: ClassVar[str]
    LIMITS: ClassVar[Limits]
    BAN_ON: ClassVar[tuple[type[Exception], ...]] = (InvalidEntry, InvalidSignature)

    def __init__(self, p2p: "P2P", peer_limits: PeerLimits | None = None):
        self.p2p = p2p
        self.limits = peer_limits or PeerLimits(self.LIMITS)

    async def add_handler(self) -> None:
        await self.p2p.add_binary_stream_handler(self.PROTOCOL, self._handle)

    async def remove_handler(self) -> None:
        try:
            await self.p2p.remove_binary_stream_handler(self.PROTOCOL)
        except Exception as e:  # the daemon may already be gone at shutdown; nothing to undo then
            logger.debug("could not remove the %s handler: %s", self.PROTOCOL, e)

    async def rpc(self, peer: bytes, request: Any) -> Any:
        raise NotImplementedError

    async def call(self, peer_id: "PeerID", request: Any, what: str) -> tuple[Any, int, int]:
        """Our own request to a peer on this protocol; a malformed answer gets the peer banned here."""
        try:
            return await call(self.p2p, peer_id, self.PROTOCOL, self.LIMITS, request, what)
        except ProtocolError as e:
            if e.malformed:
                self.limits.ban(peer_id.to_bytes(), str(e))
            raise

    async def _handle(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id.to_bytes()
        try:
            # read the request first even when refusing it: closing a stream with unread data resets it,
            # and the refusal would never reach the peer
            try:
                request, _size = await asyncio.wait_for(
                    read_frame(reader, self.LIMITS.max_request, self.LIMITS.max_array_len), self.LIMITS.call_timeout)
            except ProtocolError as e:
                self.limits.ban(peer, f"{self.PROTOCOL}: {e}")
                return  # the stream is reset: the body was not read
            reply = await self._answer(peer, request)
            await write_frame(writer, reply, self.LIMITS.max_response)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
            logger.info("%s request from %s failed: %s", self.PROTOCOL, short_peer(peer), e or type(e).__name__)
        finally:
            writer.close()

    async def _answer(self, peer: bytes, request: Any) -> list:
        if self.limits.banned(peer):
            return [1, "you are banned for sending invalid data"]
        if not self.limits.allow(peer):
            return [1, "rate limit exceeded"]
        try:
            return [0, await self.rpc(peer, request)]
        except self.BAN_ON as e:
            self.limits.ban(peer, f"{self.PROTOCOL}: {e}")
            return [1, str(e)[:MAX_REASON]]
        except InvalidMessage as e:  # ProtocolError included
            return [1, str(e)[:MAX_REASON]]
        except StoreError as e:  # our disk, not the peer's fault: tell it, log it
            logger.error("%s: the store failed while serving %s: %s", self.PROTOCOL, short_peer(peer), e)
            return [1, "the responder's store failed"]
