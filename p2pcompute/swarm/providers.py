"""Who holds which content-addressed files: provider records in the DHT, one key per dataset (or file), one subkey per peer.

A dataset's providers are found under `p2pc/v1/have/<dataset id hex>`: each peer that holds the dataset's
manifest stores, under its own PeerID as subkey (owner-signed: swarm/validators.py), a bitfield of the shards it
holds, BitTorrent-style. A file that belongs to no dataset (weights, a tokenizer) is a collection of one: its own
sha256 is the key and the bitfield has one bit. Records expire unless refreshed (node/data_host.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from p2pcompute import canonical
from p2pcompute.errors import InvalidMessage
from p2pcompute.identity import PEER_ID_SIZE, public_key_from_peer_id
from p2pcompute.runs.data_manifest import MAX_SHARDS

if TYPE_CHECKING:
    import hivemind

logger = logging.getLogger(__name__)

KEY_PREFIX = "p2pc/v1/have/"
RECORD_VERSION = 1
MAX_RECORD_BYTES = 16 + MAX_SHARDS // 8  # the bitfield of the largest dataset and a few bytes of header


def providers_key(collection: bytes) -> str:
    return KEY_PREFIX + collection.hex()


@dataclasses.dataclass(frozen=True)
class Holdings(canonical.WireRecord):
    """Which of a collection's `count` items a peer holds: bit i (of byte i // 8, most significant first) is item i."""

    WIRE_NAME = "provider record"
    MAX_WIRE_SIZE = MAX_RECORD_BYTES

    count: int
    bitfield: bytes

    def __post_init__(self) -> None:
        canonical.uint(self.count, 1, MAX_SHARDS, "provider record count")
        canonical.fixed_bytes(self.bitfield, (self.count + 7) // 8, "provider record bitfield")
        if self.count % 8 and self.bitfield[-1] & (0xFF >> (self.count % 8)):
            raise InvalidMessage("provider record: bits beyond the count are set")

    @classmethod
    def of(cls, count: int, held: set[int]) -> "Holdings":
        bits = bytearray((count + 7) // 8)
        for i in held:
            if 0 <= i < count:
                bits[i // 8] |= 0x80 >> (i % 8)
        return cls(count, bytes(bits))

    def has(self, index: int | None) -> bool:
        """Whether item `index` is held; None asks for the collection's own file (its manifest), which every
        provider of the collection holds."""
        if index is None:
            return True
        return 0 <= index < self.count and bool(self.bitfield[index // 8] & (0x80 >> (index % 8)))

    def held(self) -> int:
        return sum(bin(b).count("1") for b in self.bitfield)

    def to_obj(self) -> list:
        return [RECORD_VERSION, self.count, self.bitfield]

    @classmethod
    def from_obj(cls, obj) -> "Holdings":
        version, count, bitfield = canonical.array(obj, 3, "provider record")
        if version != RECORD_VERSION or type(version) is not int:
            raise InvalidMessage(f"provider record version {version!r:.20} is not supported")
        return cls(count, bitfield)


def announce(dht: "hivemind.DHT", peer_id: bytes, collection: bytes, holdings: Holdings, expiration: float) -> bool:
    """Store (or refresh) our holdings of `collection`; the DHT process signs the record with our key."""
    return bool(dht.store(providers_key(collection), subkey=peer_id, value=holdings.to_wire(),
                          expiration_time=expiration))


def find(dht: "hivemind.DHT", collection: bytes) -> dict[bytes, Holdings]:
    """PeerID -> holdings of every live provider of `collection`; malformed records are logged and skipped."""
    found = dht.get(providers_key(collection), latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    providers = {}
    for subkey, item in found.value.items():
        try:
            if not isinstance(subkey, bytes) or len(subkey) != PEER_ID_SIZE:
                raise InvalidMessage("the subkey is not a peer id")
            public_key_from_peer_id(subkey)
            providers[subkey] = Holdings.from_wire(item.value)
        except InvalidMessage as e:
            logger.info("skipping a provider record of %s: %s", collection.hex()[:12], e)
    return providers
