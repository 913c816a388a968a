"""Ledger replication over the node's libp2p host: the /p2pc/ledger/1 servicer (reconcile, fetch, push),
anti-entropy with random peers and push of new entries (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import TYPE_CHECKING, Any

from p2pcompute import crypto
from p2pcompute.errors import InvalidEntry, InvalidMessage, ProtocolError, StoreError, UsageError
from p2pcompute.ledger import reconcile
from p2pcompute.ledger.reconcile import Answer
from p2pcompute.ledger.replica import Replica
from p2pcompute.ledger.ingest import AppendResult
from p2pcompute.protocol import DAEMON_ERRORS, Limits, PeerLimits, Servicer, short_peer

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
LIMITS = Limits(
    max_request=MAX_FRAME, max_response=MAX_FRAME,
    max_array_len=MAX_FETCH_IDS * 16,  # a reconcile answer's ids under one prefix (at most 16 x MAX_FETCH_IDS)
    call_timeout=10.0,  # seconds for one request/response, connection set-up included
    rate_per_s=20.0, burst=50.0,  # anti-entropy is one round per 10 s and peer; pushes come in bursts
    ban_seconds=600.0,  # a peer that sent an invalid entry is ignored this long
)
# Signature checks a peer's pushes may cost us: an Ed25519 check is ~0.1 ms, so 2,000/s bounds one peer to ~20 % of
# a core, and a burst of 10,000 (~1 s of CPU) covers any honest push (new entries come a few at a time; catch-up is
# by our own fetches, not charged). A push over budget is refused after decoding, before any signature is checked
# (a push of 512 payouts with 64 witnesses each asks for ~33,000).
PUSH_SIGNATURES = dataclasses.replace(LIMITS, rate_per_s=2000.0, burst=10000.0)
PUSH_FANOUT = 8  # peers each new entry is pushed to
DEFAULT_SYNC_INTERVAL = 10.0  # seconds between anti-entropy rounds


# ---- message checks ------------------------------------------------------------------------------


def _list(value: Any, max_len: int, what: str) -> list:
    if not isinstance(value, list) or len(value) > max_len:
        raise ProtocolError(f"{what} must be an array of at most {max_len} items")
    return value


def _signatures_in(raws: list[bytes]) -> int:
    """Signature checks these entries would cost (decoding only; an entry that does not decode costs 1 and is
    refused by ingest anyway)."""
    from p2pcompute.ledger.codec import KIND_PAYOUT, Entry

    total = 0
    for raw in raws:
        try:
            entry = Entry.from_wire(raw)
        except InvalidMessage:
            total += 1
            continue
        total += 1 + (2 + len(entry.body.receipt.witnesses) if entry.kind == KIND_PAYOUT else 0)
    return total


def _fingerprint(value: Any) -> tuple[int, bytes]:
    if (not isinstance(value, list) or len(value) != 2 or type(value[0]) is not int or value[0] < 0
            or not isinstance(value[1], bytes) or len(value[1]) != reconcile.FINGERPRINT_SIZE):
        raise ProtocolError("bad fingerprint")
    return value[0], value[1]


def _entry_id(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != reconcile.ID_SIZE:
        raise ProtocolError("bad entry id")
    return value


def _raw_entries(value: Any, max_count: int, max_bytes: int, what: str) -> list[bytes]:
    items = _list(value, max_count, what)
    if not all(isinstance(x, bytes) for x in items) or sum(map(len, items)) > max_bytes:
        raise ProtocolError(f"{what} must be raw entries, at most {max_bytes} bytes in all")
    return items


# ---- the service ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SyncStats:
    rounds: int = 0
    fetched: int = 0
    pushed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class LedgerSync(Servicer):
    """Serves /p2pc/ledger/1 on a P2P instance and syncs with peers. Runs on one asyncio loop."""

    PROTOCOL = PROTOCOL
    LIMITS = LIMITS

    def __init__(self, p2p: "P2P", replica: Replica, *, limits: PeerLimits | None = None,
                 sync_interval: float = DEFAULT_SYNC_INTERVAL, rng: random.Random | None = None):
        super().__init__(p2p, limits)
        self.replica = replica
        self.sync_interval = sync_interval
        self.rng = rng or random.Random()
        self.stats = SyncStats()
        self._signature_budget = PeerLimits(PUSH_SIGNATURES)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.add_handler()
        self.replica.on_added(self._schedule_push)
        if self.sync_interval > 0:
            self._spawn(self._anti_entropy())

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.remove_handler()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- server side ------------------------------------------------------------------------------

    async def rpc(self, peer: bytes, request: Any) -> Any:
        return await self._serve(peer, request)

    async def _serve(self, peer: bytes, request: Any) -> Any:
        if not (isinstance(request, list) and len(request) == 3 and request[0] == VERSION):
            raise ProtocolError(f"expected [{VERSION}, op, payload]")
        _, op, payload = request
        if op == "reconcile":
            asked = []
            for item in _list(payload, reconcile.MAX_PREFIXES_PER_REQUEST, "reconcile request"):
                if not (isinstance(item, list) and len(item) == 3):
                    raise ProtocolError("bad reconcile item")
                asked.append((reconcile.check_prefix(item[0]), *_fingerprint(item[1:])))
            answers = reconcile.answer(self.replica.index, self.replica.ids_under, asked)
            return [[a.prefix, 1, [list(c) for c in a.children]] if a.children is not None
                    else [a.prefix, 2, a.ids] for a in answers]
        if op == "fetch":
            ids = [_entry_id(x) for x in _list(payload, MAX_FETCH_IDS, "fetch request")]
            return self.replica.raw_for_peer(ids, MAX_FETCH_BYTES)
        if op == "push":
            raws = _raw_entries(payload, MAX_PUSH_ENTRIES, MAX_PUSH_BYTES, "push")
            if not self._signature_budget.allow(peer, cost=_signatures_in(raws)):
                raise ProtocolError("signature-check budget exceeded: push fewer entries, more slowly")
            result = await self._ingest_from(peer, raws)
            if result.pending:  # it knows something we lack the basis for: reconcile with it soon
                self._spawn(self._sync_quietly(peer))
            return [len(result.added), len(result.pending)]
        raise ProtocolError(f"unknown op {op!r}")

    async def _ingest_from(self, peer: bytes, raws: list[bytes]) -> AppendResult:
        """Validate and store entries a peer sent (in a worker thread: signature checks and an fsync); a
        message with an invalid entry is refused whole and gets its sender banned (on either side of a call)."""
        try:
            return await asyncio.to_thread(self.replica.append, raws, peer)
        except InvalidEntry as e:
            self.limits.ban(peer, str(e))
            raise

    # ---- client side ------------------------------------------------------------------------------

    async def call_op(self, peer_id: "PeerID", op: str, payload: Any) -> Any:
        result, sent, received = await self.call(peer_id, [VERSION, op, payload], op)
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received
        return result

    async def sync_with(self, peer_id: "PeerID") -> reconcile.Difference:
        """Reconcile with one peer, fetch what we lack and push what it lacks."""
        peer = peer_id.to_bytes()

        async def ask(batch):
            reply = await self.call_op(peer_id, "reconcile", [list(b) for b in batch])
            return self._checked_answer(peer, "reconcile", _parse_reconcile_answer, reply)

        diff = await reconcile.reconcile(self.replica.index, self.replica.ids_under, ask)
        self.stats.rounds += 1
        wanted = sorted(diff.missing_here)
        while wanted:
            batch = wanted[:MAX_FETCH_IDS]
            raws = self._checked_answer(peer, "fetch", _parse_fetch_answer, await self.call_op(peer_id, "fetch", batch))
            got = {crypto.digest(r) for r in raws}  # an entry id is the digest of its bytes
            if not got & set(batch):  # the peer sent nothing we asked for: stop, anti-entropy retries later
                break
            await self._ingest_from(peer, raws)
            self.stats.fetched += len(raws)
            wanted = [i for i in wanted if i not in got]  # an answer cut at the size limit leaves the rest
        await self._push_to(peer_id, sorted(diff.missing_there))
        return diff

    def _checked_answer(self, peer: bytes, what: str, parse, reply: Any) -> Any:
        """Parse a peer's answer; one that is not well formed gets the peer banned (it cannot be a slip of the
        network: frames are checked end to end) and ends this sync with it, never the sync loop."""
        try:
            return parse(reply)
        except InvalidMessage as e:
            self.limits.ban(peer, f"bad {what} answer: {e}")
            raise ProtocolError(f"bad {what} answer from {short_peer(peer)}: {e}", malformed=True) from None

    async def _push_to(self, peer_id: "PeerID", ids: list[bytes]) -> None:
        while ids:
            raws = self.replica.raw_for_peer(ids[:MAX_PUSH_ENTRIES], MAX_PUSH_BYTES)
            if not raws:
                return
            await self.call_op(peer_id, "push", raws)
            self.stats.pushed += len(raws)
            ids = ids[len(raws):]

    async def _sync_quietly(self, peer: bytes) -> None:
        from hivemind.p2p import PeerID

        try:
            await self.sync_with(PeerID(peer))
        except (InvalidMessage, StoreError) as e:  # ProtocolError and InvalidEntry included
            logger.info("sync with %s failed: %s", short_peer(peer), e)

    async def _connected_peers(self) -> list["PeerID"]:
        infos = await self.p2p.list_peers()
        return [i.peer_id for i in infos if not self.limits.banned(i.peer_id.to_bytes())]

    async def _anti_entropy(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval * (0.5 + self.rng.random()))
            try:
                peers = await self._connected_peers()
            except DAEMON_ERRORS + (ConnectionError,) as e:  # try next round
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
        except DAEMON_ERRORS + (ConnectionError,) as e:  # anti-entropy will retry
            logger.info("listing peers failed: %s", e)
            return
        peers = [p for p in peers if p.to_bytes() != source]
        for peer_id in self.rng.sample(peers, min(PUSH_FANOUT, len(peers))):
            try:
                await self._push_to(peer_id, ids)
            except ProtocolError as e:
                logger.debug("push to %s failed: %s", short_peer(peer_id.to_bytes()), e)


def _parse_reconcile_answer(reply: Any) -> list[Answer]:
    answers = []
    for item in _list(reply, reconcile.MAX_PREFIXES_PER_REQUEST, "reconcile answer"):
        if not (isinstance(item, list) and len(item) == 3 and item[1] in (1, 2)):
            raise ProtocolError("bad reconcile answer item")
        prefix = reconcile.check_prefix(item[0])
        if item[1] == 1:
            answers.append(Answer(prefix, children=[_fingerprint(c) for c in _list(item[2], 16, "children")]))
        else:
            answers.append(Answer(prefix, ids=[_entry_id(x) for x in _list(item[2], 1 << 20, "ids")]))
    return answers


def _parse_fetch_answer(reply: Any) -> list[bytes]:
    return _raw_entries(reply, MAX_FETCH_IDS, MAX_FRAME, "fetch answer")


def parse_peer_maddr(maddr: str):
    """A multiaddr that names its peer (…/p2p/<peer id>) as (Multiaddr, PeerID); UsageError otherwise."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    try:
        addr = Multiaddr(maddr)
        peer_text = addr["p2p"]
        peer_id = PeerID.from_base58(peer_text)
        transport = addr.decapsulate(Multiaddr(f"/p2p/{peer_text}"))  # p2pd dials the transport part
    except Exception as e:  # the multiaddr parser raises assorted types on bad text
        raise UsageError(f"{maddr!r} is not a multiaddr ending in /p2p/<peer id>: {e}") from None
    return transport, peer_id


async def sync_once_with_maddr(sync: LedgerSync, maddr: str) -> dict:
    """Connect to the peer at `maddr` and reconcile with it once; returns what moved."""
    addr, peer_id = parse_peer_maddr(maddr)
    try:
        await asyncio.wait_for(sync.p2p._client.connect(peer_id, [addr]), LIMITS.call_timeout)
    except (asyncio.TimeoutError, ConnectionError) + DAEMON_ERRORS as e:
        raise ProtocolError(f"cannot connect to {maddr}: {e or 'timed out'}") from None
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
