"""Offline verification of a whole replica: every stored entry replayed through ingest validation, then the
derived tables checked against the entries."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from p2pcompute import crypto
from p2pcompute.errors import InvalidMessage
from p2pcompute.ledger import validate
from p2pcompute.ledger.codec import Entry
from p2pcompute.ledger.pending import PendingPool
from p2pcompute.ledger.store import Store

# Entries replayed per transaction into the scratch replica.
REPLAY_BATCH = 1000


@dataclass(frozen=True)
class Problem:
    entry_id: bytes | None  # None: a problem of the derived tables, not of one entry
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    entries: int
    problems: tuple[Problem, ...]
    equivocators: tuple[bytes, ...]  # valid, but marked: they signed two entries with one seq

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store: Store, scratch_dir: Path | None = None) -> VerifyReport:
    """Re-check every entry, chain and receipt of `store` from its stored bytes.

    The entries are replayed, in the order they were stored, into a scratch replica through the very
    code that ingest and sync use (`Store.append` -> `ledger.validate`), so a replica passes `verify`
    exactly when it could have been built by ingesting its entries. If every entry is valid, the derived
    tables are then compared with what the entries imply (`Store.check_derived`).
    """
    problems: list[Problem] = []
    count = 0
    with _scratch(scratch_dir or store.path.parent) as tmp:
        with Store(Path(tmp) / "replay.sqlite", durable=False) as replay:
            replay.pending = PendingPool(max_entries=2**62, max_bytes=2**62)  # report every orphan, drop none
            chunk: list[tuple[bytes, bytes]] = []
            for _n, entry_id, raw in store.iter_raw():
                count += 1
                if crypto.digest(raw) != entry_id:
                    problems.append(Problem(entry_id, _why_altered(raw)))
                    continue
                chunk.append((entry_id, raw))
                if len(chunk) >= REPLAY_BATCH:
                    _replay(replay, chunk, problems)
                    chunk = []
            _replay(replay, chunk, problems)
            for key in replay.pending.missing():
                for entry in replay.pending.waiting_on(key):
                    problems.append(Problem(entry.id, f"depends on {_describe(key)}, which is missing or invalid"))
            equivocators = tuple(head.author for head in replay.equivocators())
    if not problems:
        problems.extend(Problem(None, reason) for reason in store.check_derived())
    return VerifyReport(count, tuple(problems), equivocators)


def _scratch(preferred: Path) -> tempfile.TemporaryDirectory:
    """A scratch directory next to the replica (same disk, ample room), or in the system's temporary
    directory if the replica's directory is not writable (inspecting someone else's copy)."""
    try:
        return tempfile.TemporaryDirectory(prefix="ledger-verify-", dir=preferred)
    except OSError:
        return tempfile.TemporaryDirectory(prefix="ledger-verify-")


def _replay(replay: Store, chunk: list[tuple[bytes, bytes]], problems: list[Problem]) -> None:
    """Append a chunk; if it is rejected, append its entries one by one to name every bad one."""
    try:
        replay.append([raw for _, raw in chunk])
        return
    except InvalidMessage:
        pass
    for entry_id, raw in chunk:
        try:
            entry = Entry.from_wire(raw)
            validate.check_entry(entry)
            replay.append([entry])
        except InvalidMessage as e:
            problems.append(Problem(entry_id, str(e).removeprefix(f"entry {entry_id.hex()}: ")))


def _why_altered(raw: bytes) -> str:
    reason = "stored bytes do not hash to the entry id (altered after they were stored)"
    try:
        validate.check_entry(Entry.from_wire(raw))
    except InvalidMessage as e:
        return f"{reason}: {e}"
    return reason


def _describe(key: tuple) -> str:
    if key[0] == "entry":
        return f"entry {key[1].hex()}"
    return f"run {key[1].hex()}"
