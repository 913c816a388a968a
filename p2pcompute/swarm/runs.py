"""Run discovery in the DHT: signed manifests under one well-known key, one subkey per run id."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from p2pcompute.errors import InvalidManifest, InvalidMessage

if TYPE_CHECKING:
    import hivemind

    from p2pcompute.runs.manifest import SignedManifest

logger = logging.getLogger(__name__)

RUNS_KEY = "p2pc/v1/runs"  # subkey: run id (32 bytes); value: SignedManifest wire bytes
RUN_RECORD_TTL = 600.0  # seconds; every node training a run re-announces it, so a run outlives its publisher
RUN_ID_SIZE = 32


class RunRecordValidator(RecordValidatorBase):
    """Under the runs key, a value must be a publisher-signed manifest whose hash is the subkey.

    The record needs no owner: the manifest carries its publisher's signature and the run id is its hash,
    so anyone may (re-)announce a run but nobody can alter one or file it under another id."""

    def __init__(self) -> None:
        self._key_id = DHTID.generate(source=RUNS_KEY).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True
        try:
            run_id = msgpack.unpackb(record.subkey, raw=False)
            wire = msgpack.unpackb(record.value, raw=False)
            if not isinstance(run_id, bytes) or len(run_id) != RUN_ID_SIZE or not isinstance(wire, bytes):
                raise InvalidMessage("run record must be bytes under a 32-byte run id")
            signed = _decode(wire)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, InvalidMessage,
                InvalidManifest) as e:
            logger.info("rejected run record: %s", e)
            return False
        if signed.run_id != run_id:
            logger.info("rejected run record: its manifest hashes to another run id")
            return False
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, RunRecordValidator)


def _decode(wire: bytes) -> "SignedManifest":
    from p2pcompute.runs.manifest import SignedManifest

    return SignedManifest.from_wire(wire)


def announce_run(dht: "hivemind.DHT", signed: "SignedManifest", now: float, ttl: float = RUN_RECORD_TTL) -> bool:
    return bool(dht.store(RUNS_KEY, subkey=signed.run_id, value=signed.to_wire(), expiration_time=now + ttl))


def fetch_runs(dht: "hivemind.DHT") -> list["SignedManifest"]:
    """Every run the DHT currently knows, verified (validators already checked; checked again here)."""
    found = dht.get(RUNS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    runs = []
    for run_id, item in found.value.items():
        try:
            signed = _decode(item.value)
        except (InvalidManifest, InvalidMessage) as e:
            logger.info("skipping a bad run record: %s", e)
            continue
        if signed.run_id == run_id:
            runs.append(signed)
    runs.sort(key=lambda s: s.manifest.name)
    return runs
