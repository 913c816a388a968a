"""Content-addressed files over the node's libp2p host: the /p2pc/shards/1 servicer (chunks of cached files by sha256)
and the fetcher (providers from the DHT, hash checked, bad providers banned, the file then served by us too)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from p2pcompute import crypto
from p2pcompute.errors import DatasetUnavailable, InvalidMessage, ProtocolError, StoreError
from p2pcompute.protocol import Limits, PeerLimits, Servicer, short_peer
from p2pcompute.runs.artifact_cache import ArtifactCache
from p2pcompute.runs.data_manifest import MAX_SHARD_BYTES, SHA256_SIZE
from p2pcompute.swarm.providers import Holdings

if TYPE_CHECKING:
    from hivemind.p2p import P2P

logger = logging.getLogger(__name__)

PROTOCOL = "/p2pc/shards/1"
VERSION = 1
# One chunk a request: 1 MiB keeps a frame (and the server's read) small, and costs one stream set-up per MiB.
MAX_CHUNK = 1 << 20
PARALLEL_CHUNKS = 4  # chunk requests in flight to one provider: hides a round trip and a stream set-up each
MAX_OFFSET = 1 << 40  # no file we serve is a terabyte; bounds the integer a request may carry
LIMITS = Limits(
    max_request=128,  # [1, "get", 32-byte sha256, offset, length] is ~50 bytes
    max_response=MAX_CHUNK + 64,  # one chunk and its [size, bytes] envelope
    max_array_len=8,
    call_timeout=30.0,  # seconds for one chunk, connection set-up included: 1 MiB over a slow (~50 KiB/s) uplink
    rate_per_s=64.0, burst=128.0,  # chunks a peer may ask for: 64 MiB/s each, well above a volunteer's uplink
    ban_seconds=600.0,  # a peer that served bytes not matching their hash is not asked (nor answered) this long
)
MAX_PROVIDERS_TRIED = 16  # providers one fetch tries before giving up (each may take LIMITS.call_timeout per chunk)
DEFAULT_MAX_BYTES = MAX_SHARD_BYTES  # the largest file fetched when its size is not known beforehand


class BadProvider(Exception):
    """A provider sent something no honest peer holding the file sends (wrong bytes or size, malformed answer)."""


def _request(value: Any) -> tuple[bytes, int, int]:
    if not (isinstance(value, list) and len(value) == 5 and value[0] == VERSION and value[1] == "get"):
        raise ProtocolError(f"expected [{VERSION}, \"get\", sha256, offset, length]")
    _, _, sha256, offset, length = value
    if not isinstance(sha256, bytes) or len(sha256) != SHA256_SIZE:
        raise ProtocolError("sha256 must be 32 bytes")
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise ProtocolError("bad offset")
    if type(length) is not int or not 1 <= length <= MAX_CHUNK:
        raise ProtocolError(f"length must be 1..{MAX_CHUNK}")
    return sha256, offset, length


@dataclasses.dataclass
class ShardStats:
    files_fetched: int = 0
    bytes_fetched: int = 0
    bytes_served: int = 0
    bad_providers: list[str] = dataclasses.field(default_factory=list)  # "<peer>: <why>", newest last

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class ShardService(Servicer):
    """Serves /p2pc/shards/1 from `cache` and fetches files from other peers' (`fetch`). Runs on one asyncio loop.

    `find_providers(collection)` (blocking; run in a worker thread) reads the DHT's provider records;
    `stored(collection)` is called once a fetched file is in the cache (the node then announces it)."""

    PROTOCOL = PROTOCOL
    LIMITS = LIMITS

    def __init__(self, p2p: "P2P", cache: ArtifactCache, find_providers: Callable[[bytes], dict[bytes, Holdings]],
                 stored: Callable[[bytes], None] = lambda collection: None, *, limits: PeerLimits | None = None,
                 rng: random.Random | None = None):
        super().__init__(p2p, limits)
        self.cache = cache
        self.find_providers = find_providers
        self.stored = stored
        self.rng = rng or random.Random()
        self.stats = ShardStats()
        self._inflight: dict[bytes, asyncio.Future] = {}

    # ---- server side --------------------------------------------------------------------------------

    async def rpc(self, peer: bytes, request: Any) -> Any:
        sha256, offset, length = _request(request)
        found = await asyncio.to_thread(self.cache.read_chunk, sha256, offset, length)
        if found is None:
            raise ProtocolError("not held here")
        size, data = found
        if offset > size:
            raise ProtocolError("offset beyond the end of the file")
        self.stats.bytes_served += len(data)
        return [size, data]

    # ---- client side --------------------------------------------------------------------------------

    async def fetch(self, sha256: bytes, *, collection: bytes | None = None, index: int | None = None,
                    size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                    prefer: Sequence[bytes] = ()) -> Path:
        """The cached file holding `sha256`, fetched from a provider of `collection` (default: the file itself)
        holding item `index` (None: the collection's own file) if needed. `size`, when known (a shard's size in its
        manifest), is what every provider must send; `prefer`: PeerIDs to try first. DatasetUnavailable if no
        provider serves it."""
        path = self.cache.path(sha256)
        if path is not None:
            return path
        waiting = self._inflight.get(sha256)
        if waiting is not None:  # another task fetches it already: share its result
            return await asyncio.shield(waiting)
        future = asyncio.get_running_loop().create_future()
        self._inflight[sha256] = future
        try:
            path = await self._fetch(sha256, collection or sha256, index, size, max_bytes, prefer)
            future.set_result(path)
            return path
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            del self._inflight[sha256]

    async def _fetch(self, sha256: bytes, collection: bytes, index: int | None, size: int | None, max_bytes: int,
                     prefer: Sequence[bytes]) -> Path:
        from hivemind.p2p import PeerID

        providers = await asyncio.to_thread(self.find_providers, collection)
        me = self.p2p.peer_id.to_bytes()
        holders = [p for p, h in providers.items() if h.has(index) and p not in prefer]
        self.rng.shuffle(holders)
        candidates = [p for p in [*prefer, *holders] if p != me and not self.limits.banned(p)]
        failures = []
        for peer in candidates[:MAX_PROVIDERS_TRIED]:
            try:
                data = await self._download(PeerID(peer), sha256, size, max_bytes)
                if crypto.sha256(data) != sha256:
                    raise BadProvider(f"sent {len(data)} bytes that do not hash to {sha256.hex()[:12]}")
            except BadProvider as e:
                self.limits.ban(peer, f"{PROTOCOL}: {e}")
                self.stats.bad_providers.append(f"{short_peer(peer)}: {e}")
                failures.append(f"{short_peer(peer)} banned: {e}")
                continue
            except ProtocolError as e:  # unreachable, refused, timed out: not proof of anything
                failures.append(str(e))
                continue
            try:
                path = await asyncio.to_thread(self.cache.put, sha256, data)
            except (InvalidMessage, StoreError) as e:
                raise DatasetUnavailable(f"cannot keep {sha256.hex()[:12]}: {e}") from None
            self.stats.files_fetched += 1
            self.stats.bytes_fetched += len(data)
            logger.info("fetched %s (%d bytes) from %s", sha256.hex()[:12], len(data), short_peer(peer))
            self.stored(collection)
            return path
        detail = "; ".join(failures[-3:]) if failures else "none announced in the DHT"
        raise DatasetUnavailable(f"no provider could serve {sha256.hex()[:12]} ({len(candidates)} known: {detail})")

    async def _download(self, peer_id, sha256: bytes, size: int | None, max_bytes: int) -> bytes:
        """The whole file from one peer: the first chunk says its size, the rest are asked PARALLEL_CHUNKS at a time;
        BadProvider for an answer no honest holder gives."""
        first = await self._chunk(peer_id, sha256, 0, size)
        total = first[0]
        if size is None and total > max_bytes:  # our limit, not the peer's fault: refuse without a ban
            raise ProtocolError(f"{sha256.hex()[:12]} is {total} bytes, above the limit of {max_bytes}")
        if total > max_bytes:
            raise BadProvider(f"says the file has {total} bytes, more than {max_bytes}")
        offsets = range(MAX_CHUNK, total, MAX_CHUNK)
        gate = asyncio.Semaphore(PARALLEL_CHUNKS)

        async def rest(offset: int) -> bytes:
            async with gate:
                return (await self._chunk(peer_id, sha256, offset, total))[1]

        tasks = [asyncio.ensure_future(rest(offset)) for offset in offsets]
        try:
            return b"".join([first[1], *await asyncio.gather(*tasks)])
        finally:  # one bad chunk ends the download from this provider: the others are not waited for
            for task in tasks:
                task.cancel()

    async def _chunk(self, peer_id, sha256: bytes, offset: int, size: int | None) -> tuple[int, bytes]:
        """(file size, bytes) at `offset`: a whole chunk, or up to the end of a file of `size` bytes when known."""
        try:
            reply, _sent, _received = await self.call(peer_id, [VERSION, "get", sha256, offset, MAX_CHUNK], "get")
        except ProtocolError as e:
            if e.malformed:  # Servicer.call banned it already
                raise BadProvider(f"malformed answer: {e}") from None
            raise
        if not (isinstance(reply, list) and len(reply) == 2 and type(reply[0]) is int and isinstance(reply[1], bytes)):
            raise BadProvider("the answer is not [size, bytes]")
        announced, chunk = reply
        if size is not None and announced != size:
            raise BadProvider(f"says the file has {announced} bytes, not {size}")
        if len(chunk) != max(0, min(MAX_CHUNK, announced - offset)):
            raise BadProvider(f"sent {len(chunk)} bytes at offset {offset} of a {announced}-byte file")
        return announced, chunk
