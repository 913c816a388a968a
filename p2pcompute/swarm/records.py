"""Peer records: what each node publishes about itself in the DHT (strict, size-limited wire form)."""

from __future__ import annotations

import dataclasses

import msgpack

from p2pcompute.errors import InvalidMessage
from p2pcompute.identity import PEER_ID_SIZE, public_key_from_peer_id

RECORD_VERSION = 1
MAX_RECORD_BYTES = 2048  # a record is ~300 bytes; the cap bounds what a peer can make every other peer hold
MAX_ADDRS = 8  # a node rarely listens on more than a few addresses (v4, v6, relay)
MAX_ADDR_LEN = 200
STATUSES = ("starting", "idle", "training", "paused", "stopped", "bootstrap")
DEVICES = ("cpu", "cuda", "none")
# whether others can dial the node (node/reachability.py): "public" (a dial-back by a public peer worked, or forced),
# "private" (behind NAT: a client that others reach over its own connections or a relay), "unknown" (not checked)
REACHABILITY = ("unknown", "public", "private")
V1_FIELDS = 13  # records of nodes before the reachability field (read as "unknown")


@dataclasses.dataclass(frozen=True)
class PeerRecord:
    """One node's self-description. No floats: rates are integers in thousandths."""

    peer_id: bytes  # raw libp2p PeerID (Ed25519 identity multihash, 38 bytes)
    software: str  # p2pcompute version
    name: str  # display name chosen by the owner, not an identity
    device: str  # "cpu" / "cuda" / "none" (bootstrap peers)
    device_name: str
    memory_bytes: int  # memory available for training on that device
    samples_per_s_milli: int  # measured training throughput x 1000 (0 if unknown)
    status: str
    run_id: bytes  # b"" or a 32-byte run id
    addrs: tuple[str, ...]
    started_at_ms: int
    updated_at_ms: int
    reachability: str = "unknown"

    def to_wire(self) -> bytes:
        return msgpack.packb(
            [
                RECORD_VERSION,
                self.peer_id,
                self.software,
                self.name,
                self.device,
                self.device_name,
                self.memory_bytes,
                self.samples_per_s_milli,
                self.status,
                self.run_id,
                list(self.addrs),
                self.started_at_ms,
                self.updated_at_ms,
                self.reachability,
            ],
            use_bin_type=True,
        )

    @classmethod
    def from_wire(cls, data: bytes) -> "PeerRecord":
        if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
            raise InvalidMessage("peer record is not bytes or is too large")
        try:
            fields = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=64, max_str_len=512)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise InvalidMessage(f"peer record is not valid msgpack: {e}") from None
        if not isinstance(fields, list) or len(fields) not in (V1_FIELDS, V1_FIELDS + 1):
            raise InvalidMessage(f"peer record must be an array of {V1_FIELDS} or {V1_FIELDS + 1} fields")
        version, peer_id, software, name, device, device_name, memory, sps, status, run_id, addrs, t0, t1 = \
            fields[:V1_FIELDS]
        reachability = fields[V1_FIELDS] if len(fields) > V1_FIELDS else "unknown"
        if version != RECORD_VERSION:
            raise InvalidMessage(f"peer record version {version!r} is not supported")
        if not isinstance(peer_id, bytes) or len(peer_id) != PEER_ID_SIZE:
            raise InvalidMessage("peer record: bad peer id")
        public_key_from_peer_id(peer_id)
        for label, value, limit in (("software", software, 32), ("name", name, 64), ("device_name", device_name, 128)):
            if not isinstance(value, str) or len(value) > limit:
                raise InvalidMessage(f"peer record: {label} must be a string of at most {limit} characters")
        if device not in DEVICES:
            raise InvalidMessage(f"peer record: unknown device {device!r}")
        if status not in STATUSES:
            raise InvalidMessage(f"peer record: unknown status {status!r}")
        if reachability not in REACHABILITY:
            raise InvalidMessage(f"peer record: unknown reachability {reachability!r}")
        for label, value in (("memory_bytes", memory), ("samples_per_s_milli", sps), ("started_at_ms", t0),
                             ("updated_at_ms", t1)):
            if type(value) is not int or not 0 <= value < 2**63:
                raise InvalidMessage(f"peer record: {label} must be a non-negative integer")
        if not isinstance(run_id, bytes) or len(run_id) not in (0, 32):
            raise InvalidMessage("peer record: run id must be empty or 32 bytes")
        if (not isinstance(addrs, list) or len(addrs) > MAX_ADDRS
                or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_LEN and a.startswith("/") for a in addrs)):
            raise InvalidMessage(f"peer record: addrs must be at most {MAX_ADDRS} multiaddr strings")
        return cls(peer_id, software, name, device, device_name, memory, sps, status, run_id, tuple(addrs), t0, t1,
                   reachability)

    def to_json(self) -> dict:
        import base58

        return {
            "peer_id": base58.b58encode(self.peer_id).decode(),
            "name": self.name,
            "software": self.software,
            "device": self.device,
            "device_name": self.device_name,
            "memory_bytes": self.memory_bytes,
            "samples_per_s": self.samples_per_s_milli / 1000,
            "status": self.status,
            "run_id": self.run_id.hex(),
            "addrs": list(self.addrs),
            "started_at_ms": self.started_at_ms,
            "updated_at_ms": self.updated_at_ms,
            "reachability": self.reachability,
        }
