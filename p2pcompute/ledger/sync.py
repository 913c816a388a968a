"""Ledger replication over the node's libp2p host: the /p2pc/ledger/1 protocol (reconcile, fetch, push),
anti-entropy with random peers, push of new entries, and per-peer limits and bans (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import msgpack
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, DispatchFailure, P2PDaemonError

from p2pcompute.errors import InvalidEntry, InvalidMessage, StoreError
from p2pcompute.ledger import reconcile
from p2pcompute import crypto
from p2pcompute.ledger.codec import Entry
from p2pcompute.ledger.reconcile import Answer, PrefixIndex
from p2pcompute.ledger.ingest import AppendResult
from p2pcompute.ledger.store import Store

if TYPE_CHECKING:
    from hivemind.p2p import P2P, PeerID

logger = logging.getLogger(__name__)

PROTOCOL = "/p2pc/ledger/1"
VERSION = 1
MAX_FRAME = 8 * 1024 * 1024  # the largest message either side reads (a reconcile answer is ~1.3 MB at most)
MAX_FETCH_IDS = 1024  # ids per fetch request
MAX_FETCH_BYTES = 4 * 1024 * 1024  # a fetch answer is cut here; the client asks again for the rest
MAX_PUSH_ENTRIES = 512
MAX_PUSH_BYTES = 4 * 1024 * 1024
CALL_TIMEOUT = 10.0  # seconds for one request/response, connection set-up included
RATE_PER_S = 20.0  # requests a peer may make per second on average ...
RATE_BURST = 50.0  # ... and in a burst
BAN_SECONDS = 600.0  # a peer that sent an invalid entry is ignored this long
PUSH_FANOUT = 8  # peers each new entry is pushed to
DEFAULT_SYNC_INTERVAL = 10.0  # seconds between anti-entropy rounds


class SyncError(InvalidMessage):
    """The remote peer answered with an error, broke the protocol, or did not answer in time."""


# ---- framing -------------------------------------------------------------------------------------


async def write_frame(writer: asyncio.StreamWriter, obj: Any) -> int:
    """Send one frame; returns the bytes written."""
    data = msgpack.packb(obj, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise SyncError(f"refusing to send a {len(data)}-byte frame")
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()
    return 4 + len(data)


async def read_frame(reader: asyncio.StreamReader) -> Any:
    return (await read_frame_sized(reader))[0]


async def read_frame_sized(reader: asyncio.StreamReader) -> tuple[Any, int]:
    """Read one frame, refusing it before reading if it announces more than MAX_FRAME; (object, bytes read)."""
    header = await reader.readexactly(4)
    length = int.from_bytes(header, "big")
    if length > MAX_FRAME:
        raise SyncError(f"peer announced a {length}-byte frame (limit {MAX_FRAME})")
    data = await reader.readexactly(length)
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME,
                               max_array_len=MAX_FETCH_IDS * 16, max_map_len=0, max_ext_len=0), 4 + length
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise SyncError(f"malformed msgpack frame: {e}") from None


async def request_response(p2p: "P2P", peer_id: "PeerID", protocol: str, request: Any, what: str
                           ) -> tuple[Any, int, int]:
    """One request/response exchange on a fresh stream, bounded by CALL_TIMEOUT: the client side of our
    protocols. Returns (result, bytes sent, bytes received); SyncError if the peer is unreachable, does not
    speak `protocol`, answers malformed, or refuses (`[1, reason]`)."""

    async def exchange():
        _info, reader, writer = await p2p.call_binary_stream_handler(peer_id, protocol)
        try:
            sent = await write_frame(writer, request)
            reply, received = await read_frame_sized(reader)
            return reply, sent, received
        finally:
            writer.close()

    try:
        reply, sent, received = await asyncio.wait_for(exchange(), CALL_TIMEOUT)
    except asyncio.TimeoutError:
        raise SyncError(f"{what} to {_short(peer_id.to_bytes())} timed out") from None
    except (asyncio.IncompleteReadError, ConnectionError, OSError, ControlFailure, DispatchFailure,
            P2PDaemonError) as e:  # unreachable peer, or one that does not speak the protocol
        raise SyncError(f"{what} to {_short(peer_id.to_bytes())} failed: {e}") from None
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] in (0, 1)):
        raise SyncError(f"malformed response to {what}")
    if reply[0] == 1:
        raise SyncError(f"peer refused {what}: {reply[1]}")
    return reply[1], sent, received


# ---- message checks ------------------------------------------------------------------------------


def _list(value: Any, max_len: int, what: str) -> list:
    if not isinstance(value, list) or len(value) > max_len:
        raise SyncError(f"{what} must be an array of at most {max_len} items")
    return value


def _fingerprint(value: Any) -> tuple[int, bytes]:
    if (not isinstance(value, list) or len(value) != 2 or type(value[0]) is not int or value[0] < 0
            or not isinstance(value[1], bytes) or len(value[1]) != reconcile.FINGERPRINT_SIZE):
        raise SyncError("bad fingerprint")
    return value[0], value[1]


def _entry_id(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != reconcile.ID_SIZE:
        raise SyncError("bad entry id")
    return value


def _raw_entries(value: Any, max_count: int, max_bytes: int, what: str) -> list[bytes]:
    items = _list(value, max_count, what)
    if not all(isinstance(x, bytes) for x in items) or sum(map(len, items)) > max_bytes:
        raise SyncError(f"{what} must be raw entries, at most {max_bytes} bytes in all")
    return items


# ---- rate limits ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Bucket:
    tokens: float
    updated: float


class PeerLimits:
    """Token bucket per peer plus a ban list; `clock` is passed in so tests control time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, rate: float = RATE_PER_S,
                 burst: float = RATE_BURST, ban_seconds: float = BAN_SECONDS):
        self.clock, self.rate, self.burst, self.ban_seconds = clock, rate, burst, ban_seconds
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
        logger.warning("banning peer %s for %.0f s: %s", _short(peer), self.ban_seconds, why)
        self._banned[peer] = self.clock() + self.ban_seconds

    def allow(self, peer: bytes) -> bool:
        now = self.clock()
        bucket = self._buckets.setdefault(peer, _Bucket(self.burst, now))
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True


def _short(peer: bytes) -> str:
    import base58

    return base58.b58encode(peer).decode()[-8:]


# ---- the replica: store + prefix index, one place every append goes through ----------------------


class Replica:
    """The node's ledger: appends (local or from peers) go through here so the prefix index stays exact,
    and listeners (push) hear of every entry that was added."""

    def __init__(self, store: Store):
        self.store = store
        self.index = PrefixIndex(self._all_ids())
        self._listeners: list[Callable[[list[bytes], bytes | None], None]] = []

    def _all_ids(self) -> Iterable[bytes]:
        lo = b""
        while True:
            ids = self.store.ids_in_range(lo, None, 50_000)
            yield from ids
            if len(ids) < 50_000:
                return
            lo = ids[-1] + b"\x00"

    def on_added(self, listener: Callable[[list[bytes], bytes | None], None]) -> None:
        """`listener(ids, source)` hears of every added entry; source is the peer that sent them (None: local)."""
        self._listeners.append(listener)

    def append(self, items: Iterable, source: bytes | None = None) -> AppendResult:
        result = self.store.append(items)
        self._added(result.added, source)
        return result

    def append_local(self, signer, kind: str, body, now: int):
        entry = self.store.append_local(signer, kind, body, now)
        self._added([entry.id])
        return entry

    def _added(self, ids, source: bytes | None = None) -> None:
        if not ids:
            return
        self.index.add(ids)
        for listener in self._listeners:
            listener(list(ids), source)

    def ids_under(self, prefix: str) -> list[bytes]:
        lo, hi = reconcile.prefix_bounds(prefix)
        return self.store.ids_in_range(lo, hi, limit=1 << 30)

    def raw_for_peer(self, ids: Iterable[bytes], max_bytes: int) -> list[bytes]:
        """The stored bytes of `ids` we have, dependencies first (run publications, then each author's
        chain by seq), cut at `max_bytes`."""
        rows = []
        for entry_id in ids:
            raw = self.store.get_raw(entry_id)
            if raw is not None:
                entry = Entry.from_wire(raw)
                rows.append(((entry.kind != "run.publish", entry.author, entry.seq), raw))
        rows.sort(key=lambda row: row[0])
        out, size = [], 0
        for _key, raw in rows:
            if size + len(raw) > max_bytes:
                break
            out.append(raw)
            size += len(raw)
        return out


# ---- the service ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SyncStats:
    rounds: int = 0
    fetched: int = 0
    pushed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class LedgerSync:
    """Serves /p2pc/ledger/1 on a P2P instance and syncs with peers. Runs on one asyncio loop."""

    def __init__(self, p2p: "P2P", replica: Replica, *, limits: PeerLimits | None = None,
                 sync_interval: float = DEFAULT_SYNC_INTERVAL, rng: random.Random | None = None):
        self.p2p = p2p
        self.replica = replica
        self.limits = limits or PeerLimits()
        self.sync_interval = sync_interval
        self.rng = rng or random.Random()
        self.stats = SyncStats()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.p2p.add_binary_stream_handler(PROTOCOL, self._handle)
        self.replica.on_added(self._schedule_push)
        if self.sync_interval > 0:
            self._spawn(self._anti_entropy())

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.p2p.remove_binary_stream_handler(PROTOCOL)
        except Exception as e:  # the daemon may already be gone at shutdown; nothing to undo then
            logger.debug("could not remove the ledger handler: %s", e)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- server side ------------------------------------------------------------------------------

    async def _handle(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = stream_info.peer_id.to_bytes()
        try:
            # read the request first even when refusing it: closing a stream with unread data resets it,
            # and the refusal would never reach the peer
            request = await asyncio.wait_for(read_frame(reader), CALL_TIMEOUT)
            if self.limits.banned(peer):
                await write_frame(writer, [1, "you are banned for sending invalid entries"])
                return
            if not self.limits.allow(peer):
                await write_frame(writer, [1, "rate limit exceeded"])
                return
            try:
                result = await self._serve(peer, request)
                reply = [0, result]
            except (SyncError, InvalidEntry) as e:
                reply = [1, str(e)[:500]]
            except StoreError as e:  # our disk, not the peer's fault: tell it, log it
                logger.error("ledger store failed while serving %s: %s", _short(peer), e)
                reply = [1, "the responder's store failed"]
            await write_frame(writer, reply)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, SyncError) as e:
            logger.info("ledger request from %s failed: %s", _short(peer), e)
        finally:
            writer.close()

    async def _serve(self, peer: bytes, request: Any) -> Any:
        if not (isinstance(request, list) and len(request) == 3 and request[0] == VERSION):
            raise SyncError(f"expected [{VERSION}, op, payload]")
        _, op, payload = request
        if op == "reconcile":
            asked = []
            for item in _list(payload, reconcile.MAX_PREFIXES_PER_REQUEST, "reconcile request"):
                if not (isinstance(item, list) and len(item) == 3):
                    raise SyncError("bad reconcile item")
                asked.append((reconcile.check_prefix(item[0]), *_fingerprint(item[1:])))
            answers = reconcile.answer(self.replica.index, self.replica.ids_under, asked)
            return [[a.prefix, 1, [list(c) for c in a.children]] if a.children is not None
                    else [a.prefix, 2, a.ids] for a in answers]
        if op == "fetch":
            ids = [_entry_id(x) for x in _list(payload, MAX_FETCH_IDS, "fetch request")]
            return self.replica.raw_for_peer(ids, MAX_FETCH_BYTES)
        if op == "push":
            raws = _raw_entries(payload, MAX_PUSH_ENTRIES, MAX_PUSH_BYTES, "push")
            result = await self._ingest_from(peer, raws)
            if result.pending:  # it knows something we lack the basis for: reconcile with it soon
                self._spawn(self._sync_quietly(peer))
            return [len(result.added), len(result.pending)]
        raise SyncError(f"unknown op {op!r}")

    async def _ingest_from(self, peer: bytes, raws: list[bytes]) -> AppendResult:
        """Validate and store entries a peer sent (in a worker thread: signature checks and an fsync)."""
        try:
            return await asyncio.to_thread(self.replica.append, raws, peer)
        except InvalidEntry as e:
            self.limits.ban(peer, str(e))
            raise

    # ---- client side ------------------------------------------------------------------------------

    async def call(self, peer_id: "PeerID", op: str, payload: Any) -> Any:
        result, sent, received = await request_response(self.p2p, peer_id, PROTOCOL, [VERSION, op, payload], op)
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received
        return result

    async def sync_with(self, peer_id: "PeerID") -> reconcile.Difference:
        """Reconcile with one peer, fetch what we lack and push what it lacks."""
        peer = peer_id.to_bytes()

        async def ask(batch):
            items = _list(await self.call(peer_id, "reconcile", [list(b) for b in batch]),
                          reconcile.MAX_PREFIXES_PER_REQUEST, "reconcile answer")
            answers = []
            for item in items:
                if not (isinstance(item, list) and len(item) == 3 and item[1] in (1, 2)):
                    raise SyncError("bad reconcile answer item")
                prefix = reconcile.check_prefix(item[0])
                if item[1] == 1:
                    answers.append(Answer(prefix, children=[_fingerprint(c) for c in _list(item[2], 16, "children")]))
                else:
                    answers.append(Answer(prefix, ids=[_entry_id(x) for x in _list(item[2], 1 << 20, "ids")]))
            return answers

        diff = await reconcile.reconcile(self.replica.index, self.replica.ids_under, ask)
        self.stats.rounds += 1
        wanted = sorted(diff.missing_here)
        while wanted:
            batch = wanted[:MAX_FETCH_IDS]
            raws = _raw_entries(await self.call(peer_id, "fetch", batch), MAX_FETCH_IDS, MAX_FRAME, "fetch answer")
            got = {crypto.digest(r) for r in raws}  # an entry id is the digest of its bytes
            if not got & set(batch):  # the peer sent nothing we asked for: stop, anti-entropy retries later
                break
            await self._ingest_from(peer, raws)
            self.stats.fetched += len(raws)
            wanted = [i for i in wanted if i not in got]  # an answer cut at the size limit leaves the rest
        await self._push_to(peer_id, sorted(diff.missing_there))
        return diff

    async def _push_to(self, peer_id: "PeerID", ids: list[bytes]) -> None:
        while ids:
            raws = self.replica.raw_for_peer(ids[:MAX_PUSH_ENTRIES], MAX_PUSH_BYTES)
            if not raws:
                return
            await self.call(peer_id, "push", raws)
            self.stats.pushed += len(raws)
            ids = ids[len(raws):]

    async def _sync_quietly(self, peer: bytes) -> None:
        from hivemind.p2p import PeerID

        try:
            await self.sync_with(PeerID(peer))
        except (SyncError, InvalidEntry, StoreError) as e:
            logger.info("sync with %s failed: %s", _short(peer), e)

    async def _connected_peers(self) -> list["PeerID"]:
        infos = await self.p2p.list_peers()
        return [i.peer_id for i in infos if not self.limits.banned(i.peer_id.to_bytes())]

    async def _anti_entropy(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval * (0.5 + self.rng.random()))
            try:
                peers = await self._connected_peers()
            except (ControlFailure, DispatchFailure, P2PDaemonError, ConnectionError) as e:  # try next round
                logger.info("listing peers failed: %s", e)
                continue
            if peers:
                await self._sync_quietly(self.rng.choice(peers).to_bytes())

    def _schedule_push(self, ids: list[bytes], source: bytes | None) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._spawn(self._push_new(ids, source))
        else:
            loop.call_soon_threadsafe(lambda: self._spawn(self._push_new(ids, source)))

    async def _push_new(self, ids: list[bytes], source: bytes | None) -> None:
        """Flood newly added entries on to up to PUSH_FANOUT peers, never back to the peer they came from."""
        try:
            peers = await self._connected_peers()
        except (ControlFailure, DispatchFailure, P2PDaemonError, ConnectionError) as e:  # anti-entropy will retry
            logger.info("listing peers failed: %s", e)
            return
        peers = [p for p in peers if p.to_bytes() != source]
        for peer_id in self.rng.sample(peers, min(PUSH_FANOUT, len(peers))):
            try:
                await self._push_to(peer_id, ids)
            except SyncError as e:
                logger.debug("push to %s failed: %s", _short(peer_id.to_bytes()), e)



def parse_peer_maddr(maddr: str):
    """A multiaddr that names its peer (…/p2p/<peer id>) as (Multiaddr, PeerID); SyncError otherwise."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    try:
        addr = Multiaddr(maddr)
        peer_text = addr["p2p"]
        peer_id = PeerID.from_base58(peer_text)
        transport = addr.decapsulate(Multiaddr(f"/p2p/{peer_text}"))  # p2pd dials the transport part
    except Exception as e:  # the multiaddr parser raises assorted types on bad text
        raise SyncError(f"{maddr!r} is not a multiaddr ending in /p2p/<peer id>: {e}") from None
    return transport, peer_id


async def sync_once_with_maddr(sync: LedgerSync, maddr: str) -> dict:
    """Connect to the peer at `maddr` and reconcile with it once; returns what moved."""
    addr, peer_id = parse_peer_maddr(maddr)
    try:
        await asyncio.wait_for(sync.p2p._client.connect(peer_id, [addr]), CALL_TIMEOUT)
    except (asyncio.TimeoutError, ControlFailure, P2PDaemonError, ConnectionError) as e:
        raise SyncError(f"cannot connect to {maddr}: {e or 'timed out'}") from None
    before = dataclasses.replace(sync.stats)
    diff = await sync.sync_with(peer_id)
    return {
        "peer_id": peer_id.to_base58(),
        "fetched": sync.stats.fetched - before.fetched,
        "pushed": sync.stats.pushed - before.pushed,
        "missing_here": len(diff.missing_here),
        "missing_there": len(diff.missing_there),
        "rounds": diff.rounds,
        "entries": sync.replica.store.count(),
    }
