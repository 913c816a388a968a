"""Final checkpoints served peer to peer: `/p2pc/checkpoint/1` (chunks of a kept checkpoint file) and the DHT records
that name the nodes keeping one for a run.

Provider records: key `p2pc/v1/final/<run id hex>`, subkey = the provider's PeerID bytes (an owned subkey: only that
peer can write it), value msgpack `[1, epoch, size, sha256 (32 bytes)]`. A request is `[run id (32 bytes), offset,
length]`; the answer `[epoch, size, sha256, bytes]` with at most CHUNK_BYTES of the file from `offset`. The client
checks the whole file's sha256 against what the provider announced before anyone reads it, and the caller then
checks its content (a checkpoint of this run, of the run's shapes) before keeping it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from p2pcompute.crypto import sha256_hasher
from p2pcompute.errors import InvalidMessage, ProtocolError
from p2pcompute.protocol import Limits, PeerLimits, Servicer, short_peer
from p2pcompute.services.checkpoint_store import CheckpointStore

if TYPE_CHECKING:
    from hivemind.p2p import PeerID

logger = logging.getLogger(__name__)

PROTOCOL = "/p2pc/checkpoint/1"
PROVIDERS_KEY_PREFIX = "p2pc/v1/final/"
RECORD_VERSION = 1
CHUNK_BYTES = 1 << 20  # 1 MiB per response: a 1.4 GB checkpoint is ~1400 requests, each small next to the timeout
MAX_CHECKPOINT_BYTES = 2 << 30  # 350M fp32 parameters (the model size cap) are 1.4 GB
MAX_PROVIDER_RECORD = 128
LIMITS = Limits(
    max_request=128, max_response=CHUNK_BYTES + 256, max_array_len=8,
    call_timeout=30.0,  # one 1 MiB chunk through relays on a slow uplink (~35 KB/s) still arrives
    # a download asks chunk after chunk: 200/s (200 MB/s) is above any real link, bounds a flood of requests
    rate_per_s=200.0, burst=400.0,
    ban_seconds=600.0,
)


@dataclasses.dataclass(frozen=True)
class Provider:
    """A node that keeps a run's final checkpoint, as its DHT record says."""

    peer_id: bytes
    epoch: int
    size: int
    sha256: bytes

    def to_wire(self) -> bytes:
        return msgpack.packb([RECORD_VERSION, self.epoch, self.size, self.sha256], use_bin_type=True)

    @classmethod
    def from_wire(cls, peer_id: bytes, data: Any) -> "Provider":
        if not isinstance(data, bytes) or len(data) > MAX_PROVIDER_RECORD:
            raise InvalidMessage("provider record must be short bytes")
        try:
            items = msgpack.unpackb(data, raw=False, max_map_len=0)
        except (ValueError, msgpack.UnpackException):
            raise InvalidMessage("provider record is not msgpack") from None
        if not (isinstance(items, list) and len(items) == 4 and items[0] == RECORD_VERSION
                and all(type(v) is int and v >= 0 for v in items[1:3]) and 0 < items[2] <= MAX_CHECKPOINT_BYTES
                and isinstance(items[3], bytes) and len(items[3]) == 32):
            raise InvalidMessage("provider record has the wrong shape")
        return cls(peer_id, items[1], items[2], items[3])


def providers_key(run_id: bytes) -> str:
    return PROVIDERS_KEY_PREFIX + bytes(run_id).hex()


def announce_provider(dht, run_id: bytes, peer_id: "PeerID", provider: Provider, expiration_time: float):
    """Store (or refresh) our provider record without waiting; returns the DHT's future."""
    return dht.store(providers_key(run_id), subkey=peer_id.to_bytes(), value=provider.to_wire(),
                     expiration_time=expiration_time, return_future=True)


def fetch_providers(dht, run_id: bytes, timeout: float) -> list[Provider]:
    """The nodes announcing a kept final checkpoint of the run, newest epoch first; malformed records skipped."""
    found = dht.get(providers_key(run_id), latest=True, return_future=True).result(timeout)
    if found is None or not isinstance(found.value, dict):
        return []
    providers = []
    for subkey, item in found.value.items():
        try:
            if not isinstance(subkey, bytes):
                raise InvalidMessage("subkey is not a peer id")
            providers.append(Provider.from_wire(subkey, item.value))
        except InvalidMessage as e:
            logger.info("skipping a malformed checkpoint provider record: %s", e)
    return sorted(providers, key=lambda p: -p.epoch)


class CheckpointService(Servicer):
    """Serves the checkpoints of `store` in chunks, and downloads from others (`download`)."""

    PROTOCOL = PROTOCOL
    LIMITS = LIMITS

    def __init__(self, p2p, store: CheckpointStore, limits: PeerLimits | None = None):
        super().__init__(p2p, limits)
        self.store = store

    async def rpc(self, peer: bytes, request: Any) -> Any:
        if not (isinstance(request, list) and len(request) == 3 and isinstance(request[0], bytes)
                and len(request[0]) == 32 and type(request[1]) is int and type(request[2]) is int
                and 0 <= request[1] <= MAX_CHECKPOINT_BYTES and 0 < request[2] <= CHUNK_BYTES):
            raise InvalidMessage("expected [run id, offset, length <= 1 MiB]")
        run_id, offset, length = request
        kept = self.store.get(run_id)
        if kept is None:
            raise InvalidMessage("no final checkpoint of that run is kept here")
        chunk = self.store.read_chunk(kept, offset, length)
        return [kept.epoch, kept.size, bytes.fromhex(kept.sha256), chunk]

    async def download(self, provider: Provider, run_id: bytes, dest: Path) -> int:
        """Fetch a provider's checkpoint of `run_id` into `dest`, chunk by chunk; the file's sha256 must be the one
        announced (else the provider is banned and ProtocolError raised, `dest` removed). Returns the epoch."""
        from hivemind.p2p import PeerID

        peer_id = PeerID(provider.peer_id)
        hasher = sha256_hasher()
        tmp = dest.with_name(dest.name + f".{os.getpid()}.part")
        offset = 0
        try:
            with open(tmp, "wb") as f:
                while offset < provider.size:
                    reply, _sent, _received = await self.call(
                        peer_id, [bytes(run_id), offset, min(CHUNK_BYTES, provider.size - offset)], "checkpoint chunk")
                    if not (isinstance(reply, list) and len(reply) == 4 and isinstance(reply[3], bytes)
                            and reply[1] == provider.size and reply[2] == provider.sha256 and reply[3]):
                        raise self._bad(provider, "its chunk does not match its announced checkpoint")
                    f.write(reply[3])
                    hasher.update(reply[3])
                    offset += len(reply[3])
            if offset != provider.size or hasher.digest() != provider.sha256:
                raise self._bad(provider, "the checkpoint it sent does not hash to what it announced")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return provider.epoch

    def _bad(self, provider: Provider, why: str) -> ProtocolError:
        self.limits.ban(provider.peer_id, f"{PROTOCOL}: {why}")
        return ProtocolError(f"peer {short_peer(provider.peer_id)}: {why}")
