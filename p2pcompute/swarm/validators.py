"""DHT record validators: owner-signed subkeys (Ed25519, bound to the libp2p PeerID) and the peer-record schema."""

from __future__ import annotations

import logging
import struct

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from p2pcompute import crypto
from p2pcompute.errors import InvalidMessage
from p2pcompute.identity import PEER_ID_PREFIX, PEER_ID_SIZE
from p2pcompute.swarm.records import PeerRecord

logger = logging.getLogger(__name__)

SIGNATURE_DOMAIN = b"p2pc/dht-record/v1\x00"
# A subkey that is exactly a msgpack bin8 holding an Ed25519 PeerID marks a record owned by that peer.
# hivemind's own averager declares itself under subkey=peer_id too, so its records get signed as well.
_OWNED_SUBKEY_PREFIX = bytes([0xC4, PEER_ID_SIZE]) + PEER_ID_PREFIX
_OWNED_SUBKEY_SIZE = 2 + PEER_ID_SIZE
MAX_SIGNED_VALUE_BYTES = 64 * 1024  # bounds decoding work on a record before its signature is checked


def owner_public_key(subkey: bytes) -> bytes | None:
    """The owner's Ed25519 public key if `subkey` (serialized) is an owned subkey, else None."""
    if len(subkey) == _OWNED_SUBKEY_SIZE and subkey.startswith(_OWNED_SUBKEY_PREFIX):
        return subkey[len(_OWNED_SUBKEY_PREFIX):]
    return None


def _signed_message(record: DHTRecord, value: bytes) -> bytes:
    # expiration is signed as its exact IEEE-754 bits so a record cannot be replayed with a later expiry
    return SIGNATURE_DOMAIN + msgpack.packb(
        [record.key, record.subkey, value, struct.pack(">d", record.expiration_time)], use_bin_type=True
    )


class OwnerSignatureValidator(RecordValidatorBase):
    """Records under a subkey equal to a PeerID must be signed by that peer's Ed25519 key.

    The signature travels inside the value as msgpack [value, signature]; hivemind strips it before
    the application sees the value. Only the owner can write (or overwrite) such a record, and a
    record with an older expiration never replaces a newer one (DHT storage rule), so replays fail.
    """

    def __init__(self, key: crypto.SigningKey):
        self._key = key
        self._local_subkey = _OWNED_SUBKEY_PREFIX + key.public_key

    def validate(self, record: DHTRecord) -> bool:
        public_key = owner_public_key(record.subkey)
        if public_key is None:
            return True  # not an owned record
        try:
            value, signature = self._unwrap(record.value)
            crypto.verify(public_key, _signed_message(record, value), signature)
        except InvalidMessage as e:
            logger.info("rejected DHT record under an owned subkey: %s", e)
            return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        if record.subkey != self._local_subkey:
            return record.value
        signature = self._key.sign(_signed_message(record, record.value))
        return msgpack.packb([record.value, signature], use_bin_type=True)

    def strip_value(self, record: DHTRecord) -> bytes:
        if owner_public_key(record.subkey) is None:
            return record.value
        return self._unwrap(record.value)[0]

    @staticmethod
    def _unwrap(signed: bytes) -> tuple[bytes, bytes]:
        if len(signed) > MAX_SIGNED_VALUE_BYTES:
            raise InvalidMessage("signed value too large")
        try:
            parts = msgpack.unpackb(signed, raw=False, max_array_len=2, max_bin_len=MAX_SIGNED_VALUE_BYTES)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise InvalidMessage("signed value is not msgpack [value, signature]") from None
        if not (isinstance(parts, list) and len(parts) == 2 and isinstance(parts[0], bytes)
                and isinstance(parts[1], bytes)):
            raise InvalidMessage("signed value is not msgpack [value, signature]")
        return parts[0], parts[1]

    @property
    def priority(self) -> int:
        return 10  # validate (and strip) before the schema validators look at the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, OwnerSignatureValidator)


class PeerRecordValidator(RecordValidatorBase):
    """The peers key holds only owned subkeys whose value is a well-formed PeerRecord naming that owner."""

    def __init__(self, peers_key: str):
        self._key_id = DHTID.generate(source=peers_key).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True
        public_key = owner_public_key(record.subkey)
        if public_key is None:
            logger.info("rejected peer record: subkey is not a peer id")
            return False
        try:
            value = msgpack.unpackb(record.value, raw=False, max_bin_len=MAX_SIGNED_VALUE_BYTES)
            if not isinstance(value, bytes):
                raise InvalidMessage("peer record must be stored as bytes")
            peer = PeerRecord.from_wire(value)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, InvalidMessage) as e:
            logger.info("rejected peer record: %s", e)
            return False
        if peer.peer_id != PEER_ID_PREFIX + public_key:
            logger.info("rejected peer record: it names a different peer than its owner")
            return False
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, PeerRecordValidator) and other._key_id == self._key_id
