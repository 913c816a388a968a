"""Node identity: the Ed25519 key file (libp2p PrivateKey protobuf, shared with p2pd) and PeerID derivation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from typing import TYPE_CHECKING

import base58

from p2pcompute import crypto
from p2pcompute.errors import InvalidMessage, KeyFileError

if TYPE_CHECKING:  # importing hivemind costs ~1.7 s (it imports torch): read-only CLI commands avoid it
    from hivemind.p2p import PeerID

KEY_FILENAME = "identity.key"
KEY_FILE_MODE = 0o600
# libp2p: a PeerID whose PublicKey protobuf is at most 42 bytes is the identity multihash of it.
# The PeerID bytes are: 0x00 (identity multihash), 0x24 (length 36), then the PublicKey protobuf
# {key_type: Ed25519 (08 01), data: 32 bytes (12 20 ...)}. The prefix is fixed for every Ed25519 key;
# tests check it against hivemind's crypto_pb2 encoding so it cannot drift from libp2p's.
PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
PEER_ID_SIZE = len(PEER_ID_PREFIX) + crypto.PUBLIC_KEY_SIZE


def public_key_protobuf(public_key: bytes) -> bytes:
    from hivemind.proto import crypto_pb2

    return crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=public_key).SerializeToString()


def peer_id_bytes(public_key: bytes) -> bytes:
    """The libp2p PeerID (raw bytes) of an Ed25519 public key: identity multihash of its PublicKey protobuf."""
    if len(public_key) != crypto.PUBLIC_KEY_SIZE:
        raise InvalidMessage("an Ed25519 public key is 32 bytes")
    return PEER_ID_PREFIX + public_key


def peer_id_b58(public_key: bytes) -> str:
    """The PeerID as users see it (base58, '12D3KooW...')."""
    return base58.b58encode(peer_id_bytes(public_key)).decode()


def peer_id_from_public_key(public_key: bytes) -> "PeerID":
    """The PeerID as a hivemind PeerID object."""
    from hivemind.p2p import PeerID

    return PeerID(peer_id_bytes(public_key))


def public_key_from_peer_id(peer_id: bytes | PeerID | str) -> bytes:
    """Recover the Ed25519 public key from a PeerID; raise InvalidMessage for any other kind of id."""
    if isinstance(peer_id, str):
        try:
            peer_id = base58.b58decode(peer_id)
        except ValueError:
            raise InvalidMessage("peer id is not base58") from None
    elif hasattr(peer_id, "to_bytes"):
        peer_id = peer_id.to_bytes()
    if not isinstance(peer_id, bytes) or len(peer_id) != PEER_ID_SIZE or not peer_id.startswith(PEER_ID_PREFIX):
        raise InvalidMessage("peer id is not an Ed25519 identity PeerID (12D3KooW...)")
    return peer_id[len(PEER_ID_PREFIX):]


def parse_peer_id(text: str) -> bytes:
    """Parse a base58 PeerID given by a user or a peer into its Ed25519 public key; InvalidMessage otherwise."""
    if not isinstance(text, str) or not 40 <= len(text) <= 60:
        raise InvalidMessage(f"{text!r} is not a peer id (expected 12D3KooW...)")
    return public_key_from_peer_id(text)


class Identity:
    """A node's key: signs everything of ours, and p2pd reads the same file so PeerID == ledger identity."""

    def __init__(self, key: crypto.SigningKey, path: Path | None = None):
        self.key = key
        self.path = path
        self.peer_id_b58 = peer_id_b58(key.public_key)

    @property
    def peer_id(self) -> "PeerID":
        return peer_id_from_public_key(self.key.public_key)

    @property
    def public_key(self) -> bytes:
        return self.key.public_key

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def to_protobuf(self) -> bytes:
        from hivemind.proto import crypto_pb2

        return crypto_pb2.PrivateKey(
            key_type=crypto_pb2.KeyType.Ed25519, data=self.key.seed + self.key.public_key
        ).SerializeToString()

    @classmethod
    def from_protobuf(cls, data: bytes, path: Path | None = None) -> "Identity":
        from hivemind.proto import crypto_pb2

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
