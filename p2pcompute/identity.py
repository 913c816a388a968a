"""Node identity: the Ed25519 key file (libp2p PrivateKey protobuf, shared with p2pd) and PeerID derivation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import base58
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from p2pcompute import crypto
from p2pcompute.errors import InvalidMessage, KeyFileError

KEY_FILENAME = "identity.key"
KEY_FILE_MODE = 0o600
# libp2p: a PeerID whose PublicKey protobuf is at most 42 bytes is the identity multihash of it.
_IDENTITY_MULTIHASH = b"\x00"
PEER_ID_SIZE = 38  # 0x00, 0x24 (length 36), then PublicKey{key_type=Ed25519, data=32 bytes}


def public_key_protobuf(public_key: bytes) -> bytes:
    return crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=public_key).SerializeToString()


def peer_id_from_public_key(public_key: bytes) -> PeerID:
    """The libp2p PeerID of an Ed25519 public key (identity multihash of its PublicKey protobuf)."""
    encoded = public_key_protobuf(public_key)
    return PeerID(_IDENTITY_MULTIHASH + bytes([len(encoded)]) + encoded)


def public_key_from_peer_id(peer_id: bytes | PeerID | str) -> bytes:
    """Recover the Ed25519 public key from a PeerID; raise InvalidMessage for any other kind of id."""
    if isinstance(peer_id, str):
        try:
            peer_id = base58.b58decode(peer_id)
        except ValueError:
            raise InvalidMessage("peer id is not base58") from None
    elif isinstance(peer_id, PeerID):
        peer_id = peer_id.to_bytes()
    if not isinstance(peer_id, bytes) or len(peer_id) != PEER_ID_SIZE or peer_id[:2] != b"\x00\x24":
        raise InvalidMessage("peer id is not an Ed25519 identity PeerID")
    expected_prefix = public_key_protobuf(b"\x00" * crypto.PUBLIC_KEY_SIZE)[:4]
    if peer_id[2:6] != expected_prefix:
        raise InvalidMessage("peer id does not hold an Ed25519 public key")
    return peer_id[6:]


def parse_peer_id(text: str) -> PeerID:
    """Parse a base58 PeerID given by a user or a peer; it must be an Ed25519 identity PeerID."""
    public_key_from_peer_id(text)
    return PeerID.from_base58(text)


class Identity:
    """A node's key: signs everything of ours, and p2pd reads the same file so PeerID == ledger identity."""

    def __init__(self, key: crypto.SigningKey, path: Path | None = None):
        self.key = key
        self.path = path
        self.peer_id = peer_id_from_public_key(key.public_key)

    @property
    def public_key(self) -> bytes:
        return self.key.public_key

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def to_protobuf(self) -> bytes:
        return crypto_pb2.PrivateKey(
            key_type=crypto_pb2.KeyType.Ed25519, data=self.key.seed + self.key.public_key
        ).SerializeToString()

    @classmethod
    def from_protobuf(cls, data: bytes, path: Path | None = None) -> "Identity":
        try:
            message = crypto_pb2.PrivateKey.FromString(data)
        except Exception:  # protobuf raises DecodeError and, for some inputs, other runtime errors
            raise KeyFileError(f"{path or 'key'}: not a libp2p private key") from None
        if message.key_type != crypto_pb2.KeyType.Ed25519:
            raise KeyFileError(f"{path or 'key'}: key type must be Ed25519, got {message.key_type}")
        if len(message.data) != 64:
            raise KeyFileError(f"{path or 'key'}: Ed25519 key data must be 64 bytes (seed + public key)")
        key = crypto.SigningKey(message.data[:32])
        if key.public_key != message.data[32:]:
            raise KeyFileError(f"{path or 'key'}: public key does not match the seed")
        return cls(key, path)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(crypto.SigningKey.generate())

    # ---- files --------------------------------------------------------------------------------

    def write(self, path: Path) -> None:
        """Write the key atomically with mode 0600 (never readable by others, even for an instant)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
        try:
            os.fchmod(fd, KEY_FILE_MODE)
            os.write(fd, self.to_protobuf())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.path = path

    @classmethod
    def load(cls, path: Path) -> "Identity":
        path = Path(path)
        check_key_permissions(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
        return cls.from_protobuf(data, path)

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.write(path)
        return identity


def check_key_permissions(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"key file {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"fix it with: chmod 600 {path}"
        )
