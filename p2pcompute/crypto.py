"""The only place raw Ed25519 and hashing are called: the pinned verification rule, signing, digests."""

from __future__ import annotations

import hashlib
from typing import Iterable, Protocol

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from p2pcompute.errors import InvalidSignature

PUBLIC_KEY_SIZE = 32
SEED_SIZE = 32
SIGNATURE_SIZE = 64
DIGEST_SIZE = 32

# Curve25519 field prime and the order of the prime-order subgroup of edwards25519.
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_Y_MASK = (1 << 255) - 1

# The canonical encodings of the 8 points of small order (the torsion subgroup): identity,
# the point of order 2, the two of order 4 and the four of order 8. Non-canonical encodings of
# the same points are rejected earlier by the canonicity check.
_SMALL_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",  # order 1
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
        "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
    )
)


def check_point_encoding(encoded: bytes, what: str) -> None:
    """Raise InvalidSignature unless `encoded` is a canonical encoding of a point not of small order.

    Canonical: the 255-bit y coordinate is below p, and the sign bit is clear when x would be 0
    (y = 1 or y = p - 1), since "-0" is a second encoding of the same point.
    """
    if len(encoded) != PUBLIC_KEY_SIZE:
        raise InvalidSignature(f"{what} must be {PUBLIC_KEY_SIZE} bytes, got {len(encoded)}")
    as_int = int.from_bytes(encoded, "little")
    y = as_int & _Y_MASK
    if y >= _P:
        raise InvalidSignature(f"{what} is not canonically encoded (y >= p)")
    if (as_int >> 255) and y in (1, _P - 1):
        raise InvalidSignature(f"{what} is not canonically encoded (negative zero x)")
    if encoded in _SMALL_ORDER:
        raise InvalidSignature(f"{what} is a point of small order")


def check_public_key(public_key: bytes) -> None:
    check_point_encoding(public_key, "public key")


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Verify an Ed25519 signature under the pinned rule; raise InvalidSignature naming the reason.

    The rule, identical on every replica: the public key and R are canonical and not of small order,
    S < L, and then `cryptography` (OpenSSL) verifies the cofactorless equation.
    """
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_SIZE:
        raise InvalidSignature(f"signature must be {SIGNATURE_SIZE} bytes")
    check_point_encoding(public_key, "public key")
    check_point_encoding(bytes(signature[:32]), "signature R")
    if int.from_bytes(signature[32:], "little") >= _L:
        raise InvalidSignature("signature S is not below the group order")
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), message)
    except (_CryptoInvalidSignature, ValueError):
        raise InvalidSignature("signature does not verify") from None


class SigningKey:
    """An Ed25519 private key. Picklable (DHT validators travel to the DHT process)."""

    __slots__ = ("_key", "_public")

    def __init__(self, seed: bytes):
        if len(seed) != SEED_SIZE:
            raise ValueError(f"Ed25519 seed must be {SEED_SIZE} bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    @property
    def seed(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_key(self) -> bytes:
        return self._public

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __getstate__(self):
        return self.seed

    def __setstate__(self, seed: bytes):
        SigningKey.__init__(self, seed)

    def __repr__(self) -> str:
        return f"SigningKey(public={self._public.hex()[:16]}...)"


def digest(data: bytes) -> bytes:
    """The project's content hash: BLAKE2b-256 (ledger entry ids, run ids)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def digest_chunks(chunks: Iterable[bytes]) -> bytes:
    """digest() of the chunks joined, without joining them (large tensors)."""
    hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.digest()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha256_hasher():
    """An incremental sha256 (update() chunk by chunk, digest() at the end), for data that arrives in pieces."""
    return hashlib.sha256()


def sha256_file(path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (artifacts and checkpoints can be gigabytes)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


class Signer(Protocol):
    """Anything that signs with an Ed25519 key: `identity.Identity` or `crypto.SigningKey`."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...
