"""The ledger's on-disk layout: the SQLite schema, its versioned migrations, and how an entry maps to its rows and back."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable, Iterator

from p2pcompute import canonical
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.errors import InvalidMessage, StoreError
from p2pcompute.ledger.codec import KIND_AUDIT, KIND_PAYOUT, KIND_RUN_PUBLISH, Entry

SCHEMA_VERSION = 2
# PRAGMA application_id: marks the file as ours ("p2pc"), so we never migrate someone else's database.
APPLICATION_ID = 0x70327063

_SCHEMA_V2 = """
-- Every entry exactly as signed. n is the local arrival order: an entry always comes after the entries
-- it depends on, so replaying by n re-validates without reordering. author..kind repeat fields of raw
-- for indexing; rebuild_derived() re-extracts them.
CREATE TABLE entries (
    n INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,        -- digest(raw); range-based set reconciliation walks this index
    author BLOB NOT NULL,
    seq INTEGER NOT NULL,
    prev BLOB NOT NULL,
    timestamp INTEGER NOT NULL,
    kind TEXT NOT NULL,
    raw BLOB NOT NULL
);
CREATE INDEX entries_by_author ON entries (author, seq);

-- Per-entry facts of the two kinds, extracted from raw (rebuildable). Keyed by the entry's n, so that
-- ingest appends to them instead of inserting at random places (as keys by entry id would).
CREATE TABLE runs (
    n INTEGER PRIMARY KEY,          -- entries.n of the run.publish entry
    publisher BLOB NOT NULL,
    run_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    timestamp INTEGER NOT NULL,
    policy BLOB NOT NULL            -- the CreditPolicy, canonical msgpack (credits.policy)
);
CREATE INDEX runs_by_publisher ON runs (publisher, run_id);
CREATE INDEX runs_by_id ON runs (run_id);
CREATE TABLE payouts (
    n INTEGER PRIMARY KEY,          -- entries.n of the payout entry
    issuer BLOB NOT NULL,           -- the entry's author
    seq INTEGER NOT NULL,
    peer BLOB NOT NULL,             -- the claimant, who is paid
    run_id BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    amount INTEGER NOT NULL
);
CREATE INDEX payouts_by_epoch ON payouts (issuer, run_id, epoch, seq, peer, samples);  -- per-epoch tallies
CREATE INDEX payouts_by_issuer ON payouts (issuer, run_id, seq, amount);  -- budget tallies, index-only
CREATE INDEX payouts_by_peer ON payouts (peer, run_id, epoch);
CREATE INDEX payouts_by_run ON payouts (run_id);
CREATE TABLE audits (
    n INTEGER PRIMARY KEY,          -- entries.n of the audit entry
    auditor BLOB NOT NULL,          -- the entry's author, one of the run's issuers
    payout_id BLOB NOT NULL,        -- the payout that failed its audit
    run_id BLOB NOT NULL,
    peer BLOB NOT NULL,             -- whose payouts in the run no longer count (the claw-back)
    epoch INTEGER NOT NULL
);
CREATE INDEX audits_by_peer ON audits (peer, run_id);

-- Derived (rebuildable): chain heads, equivocation marks, balances, run totals.
CREATE TABLE authors (
    author BLOB PRIMARY KEY,
    head_seq INTEGER NOT NULL,
    head_id BLOB NOT NULL,          -- the smallest id among the entries at head_seq
    entries INTEGER NOT NULL,
    fork_seq INTEGER                -- lowest seq with two or more entries (equivocation), NULL if none
) WITHOUT ROWID;
CREATE TABLE balances (
    peer BLOB PRIMARY KEY,
    credits INTEGER NOT NULL,       -- micro-credits, saturating at 2^63 - 1
    samples INTEGER NOT NULL,
    receipts INTEGER NOT NULL       -- payouts received
) WITHOUT ROWID;
CREATE INDEX balances_rank ON balances (credits DESC, peer);   -- the leaderboard
CREATE TABLE run_totals (
    run_id BLOB PRIMARY KEY,
    credits INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    receipts INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Ledger v1 (2026-11) credited claimants through `receipt` entries they signed themselves; v2 pays through
# issuers' `payout` entries. v1 entries do not validate under v2, so a v1 file is not migrated but refused.
_V1_REFUSED = ("holds a version-1 ledger (claimants crediting themselves), which this p2pc no longer accepts: "
               "move it away and sync again")

# index in this list = the schema version the script migrates to (None: refused, see above)
_MIGRATIONS = ["", None, _SCHEMA_V2]


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file at `path` (open on `conn`) to SCHEMA_VERSION, one transaction per version; refuse a
    newer schema and any database that is not a p2pcompute ledger."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id not in (0, APPLICATION_ID):
        raise StoreError(f"{path} is not a p2pcompute ledger (application_id {app_id:#x})")
    if app_id == 0 and version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise StoreError(f"{path} is an SQLite database of something else, not a p2pcompute ledger")
    if version == 1:
        raise StoreError(f"{path} {_V1_REFUSED}")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has ledger schema version {version}; this p2pc reads up to {SCHEMA_VERSION}: upgrade p2pc"
        )
    for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
        # executescript runs the migration and the version bump as one transaction
        conn.executescript(
            f"BEGIN IMMEDIATE; {_MIGRATIONS[target]}; PRAGMA application_id = {APPLICATION_ID};"
            f" PRAGMA user_version = {target}; COMMIT;"
        )


# ---- entries to rows and back ------------------------------------------------------------------


# the per-kind index table of each entry kind, and how many columns its rows have
INDEX_TABLES = {KIND_RUN_PUBLISH: ("runs", 6), KIND_PAYOUT: ("payouts", 8), KIND_AUDIT: ("audits", 6)}


def index_row(entry: Entry, n: int) -> tuple[str, tuple] | None:
    """(table, row) of the per-kind index row of an entry stored as number `n` (None for a kind without one)."""
    body = entry.body
    if entry.kind == KIND_RUN_PUBLISH:
        return "runs", (n, entry.author, body.run_id, entry.seq, entry.timestamp, pack_policy(body.policy))
    if entry.kind == KIND_PAYOUT:
        claim = body.receipt.claim
        return "payouts", (n, entry.author, entry.seq, claim.peer, claim.run_id, claim.epoch, claim.samples,
                           body.amount)
    if entry.kind == KIND_AUDIT:
        return "audits", (n, entry.author, body.payout_id, body.run_id, body.peer, body.epoch)
    return None


def insert_sql(table: str) -> str:
    return f"INSERT INTO {table} VALUES ({', '.join('?' * INDEX_TABLES_BY_NAME[table])})"


INDEX_TABLES_BY_NAME = {table: columns for table, columns in INDEX_TABLES.values()}


def pack_policy(policy: CreditPolicy) -> bytes:
    return canonical.pack(policy.to_obj())


def policy_from_row(packed: bytes) -> CreditPolicy:
    """The CreditPolicy of a `runs` row."""
    try:
        return CreditPolicy.from_obj(canonical.unpack_canonical(packed, max_size=4096, what="policy"))
    except InvalidMessage as e:
        raise StoreError(f"a stored run policy is corrupt ({e}); run `p2pc ledger verify`") from None


def decode_stored(raw: bytes, entry_id: bytes) -> Entry:
    """A stored entry's raw bytes decoded; StoreError if they no longer decode (a corrupt file)."""
    try:
        return Entry.from_wire(raw)
    except InvalidMessage as e:
        raise StoreError(f"stored entry {entry_id.hex()} is corrupt ({e}); run `p2pc ledger verify`") from None


def iter_stored(fetch: Callable[[str, tuple], list[tuple]], page: int) -> Iterator[tuple[int, bytes, bytes]]:
    """(arrival number, id, raw) of every stored entry in arrival order, `page` rows per `fetch(sql, params)`:
    dependencies always come before what depends on them."""
    last = 0
    while True:
        rows = fetch("SELECT n, id, raw FROM entries WHERE n > ? ORDER BY n LIMIT ?", (last, page))
        if not rows:
            return
        yield from rows
        last = rows[-1][0]
