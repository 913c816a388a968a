"""The ledger replica on disk: SQLite (WAL, synchronous=FULL), versioned schema, validated durable appends,
derived balances / run totals / leaderboard, and the lookups the CLI and sync need."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from p2pcompute.crypto import Signer
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.crypto import PUBLIC_KEY_SIZE
from p2pcompute.errors import InvalidEntry, InvalidMessage, MissingDependency, NotFound, StoreError
from p2pcompute.ledger import validate
from p2pcompute.ledger.codec import GENESIS_PREV, KIND_RECEIPT, KIND_RUN_PUBLISH, Body, Entry, sign_entry
from p2pcompute.ledger.pending import PendingPool
from p2pcompute.ledger.validate import EntryRef, Publication

logger = logging.getLogger(__name__)

LEDGER_FILENAME = "ledger.sqlite"
SCHEMA_VERSION = 1
# PRAGMA application_id: marks the file as ours ("p2pc"), so we never migrate someone else's database.
APPLICATION_ID = 0x70327063
# A reader (the CLI while the node runs) or a second writer waits this long for the write lock.
BUSY_TIMEOUT_S = 10.0
# Host parameters per `IN (...)` query: SQLite before 3.32 allowed 999 per statement.
_IN_CHUNK = 500
# Balances and totals are SQLite INTEGERs; sums saturate here instead of overflowing. All amounts are
# non-negative, so min(sum, INT64_MAX) does not depend on the order entries arrived in.
INT64_MAX = 2**63 - 1

_SCHEMA_V1 = """
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
    rate INTEGER NOT NULL,
    quorum INTEGER NOT NULL,
    validators BLOB NOT NULL        -- the policy's validator keys, concatenated (32 bytes each)
);
CREATE INDEX runs_by_publisher ON runs (publisher, run_id);
CREATE TABLE receipts (
    n INTEGER PRIMARY KEY,          -- entries.n of the receipt entry
    author BLOB NOT NULL,           -- the claimant
    seq INTEGER NOT NULL,
    publisher BLOB NOT NULL,
    run_id BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    amount INTEGER NOT NULL
);
CREATE INDEX receipts_by_claim ON receipts (author, publisher, run_id, epoch);
CREATE INDEX receipts_by_run ON receipts (publisher, run_id);

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
    receipts INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX balances_rank ON balances (credits DESC, peer);   -- the leaderboard
CREATE TABLE run_totals (
    publisher BLOB NOT NULL,
    run_id BLOB NOT NULL,
    credits INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    receipts INTEGER NOT NULL,
    PRIMARY KEY (publisher, run_id)
) WITHOUT ROWID;
"""

# index in this list = the schema version the script migrates to
_MIGRATIONS = ["", _SCHEMA_V1]

# Receipts that count towards balances (docs/ledger.md, "Equivocation"): the claimant has not
# equivocated at or below the receipt's seq, and the run has a publication below its publisher's fork
# point (if any).
_COUNTED_RECEIPTS = """
SELECT r.n, r.author, r.publisher, r.run_id, r.samples, r.amount
FROM receipts r
JOIN authors a ON a.author = r.author
JOIN authors p ON p.author = r.publisher
WHERE (a.fork_seq IS NULL OR r.seq < a.fork_seq)
  AND EXISTS (SELECT 1 FROM runs u WHERE u.publisher = r.publisher AND u.run_id = r.run_id
              AND (p.fork_seq IS NULL OR u.seq < p.fork_seq))
"""

_DERIVE_AUTHORS = """
WITH heads AS (SELECT author, max(seq) AS head_seq, count(*) AS n FROM entries GROUP BY author),
     forked AS (SELECT author, min(seq) AS fork_seq
                FROM (SELECT author, seq FROM entries GROUP BY author, seq HAVING count(*) > 1)
                GROUP BY author)
SELECT h.author, h.head_seq,
       (SELECT min(e.id) FROM entries e WHERE e.author = h.author AND e.seq = h.head_seq),
       h.n, f.fork_seq
FROM heads h LEFT JOIN forked f ON f.author = h.author
"""


@dataclass(frozen=True)
class AuthorHead:
    """An author's chain as this replica holds it (what per-author sync compares)."""

    author: bytes
    seq: int
    id: bytes
    entries: int
    fork_seq: int | None  # not None: the author equivocated; entries from this seq on do not count


@dataclass(frozen=True)
class Balance:
    peer: bytes
    credits: int  # micro-credits
    samples: int
    receipts: int


@dataclass(frozen=True)
class RunSummary:
    publisher: bytes
    run_id: bytes
    entry_id: bytes
    seq: int
    timestamp: int
    policy: CreditPolicy
    counted: bool  # False: the publication lies at or past its publisher's fork point
    credits: int
    samples: int
    receipts: int


@dataclass(frozen=True)
class AppendResult:
    """What an append did. Only `added` entries are acknowledged (durable when append returns)."""

    added: tuple[bytes, ...]  # stored now, in order; may include earlier pending entries this batch completed
    duplicates: tuple[bytes, ...]  # already stored, or repeated in the batch
    pending: tuple[bytes, ...]  # held in memory until their previous entry or run arrives
    dropped: tuple[tuple[bytes, str], ...]  # earlier pending entries found invalid once completed, with why
    equivocators: tuple[bytes, ...]  # authors whose fork point appeared or moved down in this append


class _Head:
    __slots__ = ("seq", "id", "entries", "fork_seq", "dirty")

    def __init__(self, seq: int, entry_id: bytes, entries: int, fork_seq: int | None):
        self.seq, self.id, self.entries, self.fork_seq, self.dirty = seq, entry_id, entries, fork_seq, False


def _saturating(value: int) -> int:
    return value if value <= INT64_MAX else INT64_MAX


def _chunks(items: list, size: int = _IN_CHUNK) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _policy_from_row(rate: int, quorum: int, validators: bytes) -> CreditPolicy:
    keys = tuple(validators[i : i + PUBLIC_KEY_SIZE] for i in range(0, len(validators), PUBLIC_KEY_SIZE))
    return CreditPolicy(rate, quorum, keys)


def _index_rows(entry: Entry, n: int) -> tuple[tuple | None, tuple | None]:
    """The `runs` or `receipts` row of an entry stored as number `n` (one of them, or neither)."""
    if entry.kind == KIND_RUN_PUBLISH:
        policy = entry.body.policy
        return (
            (n, entry.author, entry.body.run_id, entry.seq, entry.timestamp, policy.rate, policy.quorum,
             b"".join(policy.validators)),
            None,
        )
    if entry.kind == KIND_RECEIPT:
        claim = entry.body.receipt.claim
        return None, (
            n, entry.author, entry.seq, claim.publisher, claim.run_id, claim.epoch, claim.samples, entry.body.amount,
        )
    return None, None


class _Ingest:
    """One append inside a write transaction: the LedgerView that validation reads (the store plus the
    entries accepted so far in this batch), and the rows and derived changes to write at the end."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.refs: dict[bytes, EntryRef] = {}
        self.heads: dict[bytes, _Head | None] = {}
        self.pubs: dict[tuple[bytes, bytes], list[Publication]] = {}
        self.new_receipts: dict[tuple, list[EntryRef]] = {}
        self.entry_rows: list[tuple] = []
        self.run_rows: list[tuple] = []
        self.receipt_rows: list[tuple] = []
        self.balance_delta: dict[bytes, list[int]] = {}
        self.run_delta: dict[tuple[bytes, bytes], list[int]] = {}
        self.forked: list[bytes] = []
        self.stored_authors: set[bytes] = set()  # authors with entries stored before this batch
        self.next_n: int | None = None  # entries.n of the next accepted entry (loaded on first use)

    # ---- LedgerView ----------------------------------------------------------------------------

    def entry_ref(self, entry_id: bytes) -> EntryRef | None:
        ref = self.refs.get(entry_id)
        if ref is None:
            row = self.conn.execute(
                "SELECT author, seq, prev, timestamp FROM entries WHERE id = ?", (entry_id,)
            ).fetchone()
            if row is not None:
                ref = self.refs[entry_id] = EntryRef(entry_id, *row)
        return ref

    def fork_seq(self, author: bytes) -> int | None:
        head = self.head(author)
        return None if head is None else head.fork_seq

    def publications(self, publisher: bytes, run_id: bytes) -> list[Publication]:
        key = (publisher, run_id)
        pubs = self.pubs.get(key)
        if pubs is None:
            rows = self.conn.execute(
                "SELECT e.id, u.seq, u.rate, u.quorum, u.validators FROM runs u JOIN entries e ON e.n = u.n"
                " WHERE u.publisher = ? AND u.run_id = ?",
                key,
            ).fetchall()
            pubs = self.pubs[key] = [
                Publication(entry_id, publisher, seq, run_id, _policy_from_row(rate, quorum, validators))
                for entry_id, seq, rate, quorum, validators in rows
            ]
        return pubs

    def receipts_for(self, author: bytes, publisher: bytes, run_id: bytes, epoch: int) -> list[EntryRef]:
        found = list(self.new_receipts.get((author, publisher, run_id, epoch), ()))
        self.head(author)  # loads the author, and with it whether it had entries before this batch
        if author in self.stored_authors:
            for (entry_id,) in self.conn.execute(
                "SELECT e.id FROM receipts r JOIN entries e ON e.n = r.n"
                " WHERE r.author = ? AND r.publisher = ? AND r.run_id = ? AND r.epoch = ?",
                (author, publisher, run_id, epoch),
            ).fetchall():
                found.append(self.entry_ref(entry_id))
        return found

    # ---- batch state ---------------------------------------------------------------------------

    def load_heads(self, authors: Iterable[bytes]) -> None:
        """Fetch the heads of these authors in a few queries, and cache each head's EntryRef (the usual
        `prev` of the next entry)."""
        missing = [a for a in set(authors) if a not in self.heads]
        for chunk in _chunks(missing):
            rows = self.conn.execute(
                "SELECT a.author, a.head_seq, a.head_id, a.entries, a.fork_seq, e.prev, e.timestamp"
                " FROM authors a JOIN entries e ON e.id = a.head_id"
                f" WHERE a.author IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
            for author, seq, head_id, entries, fork_seq, prev, timestamp in rows:
                self.heads[author] = _Head(seq, head_id, entries, fork_seq)
                self.stored_authors.add(author)
                self.refs[head_id] = EntryRef(head_id, author, seq, prev, timestamp)
            for author in chunk:
                self.heads.setdefault(author, None)

    def head(self, author: bytes) -> _Head | None:
        if author not in self.heads:
            self.load_heads([author])
        return self.heads[author]

    def accept(self, entry: Entry) -> None:
        """Record a validated entry: chain head, equivocation mark, index rows, derived deltas."""
        author = entry.author
        head = self.head(author)
        if head is None:
            head = self.heads[author] = _Head(entry.seq, entry.id, 0, None)
        elif entry.seq > head.seq:
            head.seq, head.id = entry.seq, entry.id
        else:
            # Chains are contiguous (every entry's predecessor is stored first), so an author already
            # has an entry at every seq up to its head: this one is a second entry at entry.seq.
            if head.fork_seq is None or entry.seq < head.fork_seq:
                head.fork_seq = entry.seq
                self.forked.append(author)
            if entry.seq == head.seq and entry.id < head.id:
                head.id = entry.id
        head.entries += 1
        head.dirty = True
        ref = self.refs[entry.id] = EntryRef(entry.id, author, entry.seq, entry.prev, entry.timestamp)
        if self.next_n is None:
            self.next_n = self.conn.execute("SELECT coalesce(max(n), 0) + 1 FROM entries").fetchone()[0]
        n, self.next_n = self.next_n, self.next_n + 1
        self.entry_rows.append((n, entry.id, author, entry.seq, entry.prev, entry.timestamp, entry.kind, entry.wire))
        run_row, receipt_row = _index_rows(entry, n)
        if run_row is not None:
            self.run_rows.append(run_row)
            self.publications(author, entry.body.run_id).append(
                Publication(entry.id, author, entry.seq, entry.body.run_id, entry.body.policy)
            )
        if receipt_row is not None:
            claim = entry.body.receipt.claim
            self.receipt_rows.append(receipt_row)
            self.new_receipts.setdefault((author, claim.publisher, claim.run_id, claim.epoch), []).append(ref)
            if self._counts(author, entry.seq, claim.publisher, claim.run_id):
                for delta in (
                    self.balance_delta.setdefault(author, [0, 0, 0]),
                    self.run_delta.setdefault((claim.publisher, claim.run_id), [0, 0, 0]),
                ):
                    delta[0] += entry.body.amount
                    delta[1] += claim.samples
                    delta[2] += 1

    def _counts(self, author: bytes, seq: int, publisher: bytes, run_id: bytes) -> bool:
        fork = self.fork_seq(author)
        if fork is not None and seq >= fork:
            return False
        publisher_fork = self.fork_seq(publisher)
        return any(publisher_fork is None or p.seq < publisher_fork for p in self.publications(publisher, run_id))

    def write(self) -> None:
        """Write rows and derived changes (still inside the caller's transaction)."""
        conn = self.conn
        conn.executemany(
            "INSERT INTO entries (n, id, author, seq, prev, timestamp, kind, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            self.entry_rows,
        )
        conn.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self.run_rows)
        conn.executemany("INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self.receipt_rows)
        conn.executemany(
            "INSERT INTO authors (author, head_seq, head_id, entries, fork_seq) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (author) DO UPDATE SET head_seq = excluded.head_seq, head_id = excluded.head_id,"
            " entries = excluded.entries, fork_seq = excluded.fork_seq",
            [(a, h.seq, h.id, h.entries, h.fork_seq) for a, h in self.heads.items() if h is not None and h.dirty],
        )
        _add_totals(conn, "balances", ("peer",), {(peer,): d for peer, d in self.balance_delta.items()})
        _add_totals(conn, "run_totals", ("publisher", "run_id"), self.run_delta)
        if self.forked:
            _recompute_after_forks(conn, self.forked)


def _add_totals(conn: sqlite3.Connection, table: str, key_columns: tuple[str, ...], deltas: dict) -> None:
    """Add [credits, samples, receipts] deltas to `table` rows, saturating at INT64_MAX."""
    if not deltas:
        return
    where = " AND ".join(f"{c} = ?" for c in key_columns)
    rows = []
    for key, (credits, samples, receipts) in deltas.items():
        old = conn.execute(f"SELECT credits, samples, receipts FROM {table} WHERE {where}", key).fetchone()
        if old is not None:
            credits, samples, receipts = credits + old[0], samples + old[1], receipts + old[2]
        rows.append((*key, _saturating(credits), _saturating(samples), receipts))
    columns = ", ".join(key_columns)
    conn.executemany(
        f"INSERT OR REPLACE INTO {table} ({columns}, credits, samples, receipts) VALUES"
        f" ({', '.join('?' * (len(key_columns) + 3))})",
        rows,
    )


def _sum_counted(conn: sqlite3.Connection, condition: str = "", params: tuple = ()) -> tuple[dict, dict]:
    """Totals of the counted receipts matching `condition`: ({peer: [c, s, r]}, {(publisher, run_id): [c, s, r]})."""
    peers: dict[bytes, list[int]] = {}
    runs: dict[tuple[bytes, bytes], list[int]] = {}
    for _entry_id, author, publisher, run_id, samples, amount in conn.execute(_COUNTED_RECEIPTS + condition, params):
        for total in (peers.setdefault(author, [0, 0, 0]), runs.setdefault((publisher, run_id), [0, 0, 0])):
            total[0] = _saturating(total[0] + amount)
            total[1] = _saturating(total[1] + samples)
            total[2] += 1
    return peers, runs


def _recompute_after_forks(conn: sqlite3.Connection, authors: list[bytes]) -> None:
    """An author's fork point appeared or moved down: recompute every balance and run total it can touch
    (its own receipts, receipts on its runs) from the receipts table, exactly as rebuild_derived does."""
    peers: set[bytes] = set(authors)
    runs: set[tuple[bytes, bytes]] = set()
    for author in authors:
        peers.update(r for (r,) in conn.execute("SELECT DISTINCT author FROM receipts WHERE publisher = ?", (author,)))
        runs.update(conn.execute("SELECT DISTINCT publisher, run_id FROM receipts WHERE author = ?", (author,)))
        runs.update(conn.execute("SELECT DISTINCT publisher, run_id FROM runs WHERE publisher = ?", (author,)))
    for peer in peers:
        totals, _ = _sum_counted(conn, " AND r.author = ?", (peer,))
        conn.execute("DELETE FROM balances WHERE peer = ?", (peer,))
        if peer in totals:
            conn.execute("INSERT INTO balances VALUES (?, ?, ?, ?)", (peer, *totals[peer]))
    for publisher, run_id in runs:
        _, totals = _sum_counted(conn, " AND r.publisher = ? AND r.run_id = ?", (publisher, run_id))
        conn.execute("DELETE FROM run_totals WHERE publisher = ? AND run_id = ?", (publisher, run_id))
        if (publisher, run_id) in totals:
            conn.execute("INSERT INTO run_totals VALUES (?, ?, ?, ?, ?)", (publisher, run_id, *totals[(publisher, run_id)]))


class Store:
    """A ledger replica in one SQLite file. Thread-safe; one writer at a time (also across processes).

    `durable=False` (synchronous=OFF) is only for scratch replicas that are thrown away, such as the
    replay inside `p2pc ledger verify`.
    """

    def __init__(self, path: str | Path, *, create: bool = True, durable: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise NotFound(f"no ledger replica at {self.path}")
        self._lock = threading.RLock()
        self.pending = PendingPool()
        try:
            self._conn = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open ledger store {self.path}: {e}") from None
        try:
            with self._db_errors():
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch the ledger store to WAL mode (got {mode})")
                # FULL: each commit fsyncs the WAL, so an acknowledged entry survives power loss, not only
                # a process crash (NORMAL in WAL mode may lose the last commits on power loss). The cost is
                # one fsync per append batch, which batching makes negligible next to signature checks.
                self._conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'OFF'}")
                self._migrate()
        except BaseException:
            self._conn.close()
            raise

    # ---- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def in_data_dir(cls, data_dir: str | Path, *, create: bool = True) -> "Store":
        return cls(Path(data_dir) / LEDGER_FILENAME, create=create)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _db_errors(self):
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"ledger store {self.path}: {e}") from None

    @contextmanager
    def _write(self):
        """A write transaction: BEGIN IMMEDIATE takes SQLite's write lock up front (no lock upgrade
        deadlocks between processes); COMMIT returns after the WAL is fsynced."""
        with self._lock, self._db_errors():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # the body failed, or COMMIT did (disk full, I/O error)
                    self._conn.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        conn = self._conn
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id not in (0, APPLICATION_ID):
            raise StoreError(f"{self.path} is not a p2pcompute ledger (application_id {app_id:#x})")
        if app_id == 0 and version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(f"{self.path} is an SQLite database of something else, not a p2pcompute ledger")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has ledger schema version {version}; this p2pc reads up to {SCHEMA_VERSION}: upgrade p2pc"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            # executescript runs the migration and the version bump as one transaction
            conn.executescript(
                f"BEGIN IMMEDIATE; {_MIGRATIONS[target]}; PRAGMA application_id = {APPLICATION_ID};"
                f" PRAGMA user_version = {target}; COMMIT;"
            )

    @property
    def schema_version(self) -> int:
        with self._lock, self._db_errors():
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # ---- appending -----------------------------------------------------------------------------

    def append(self, items: Iterable[Entry | bytes], *, hold_pending: bool = True) -> AppendResult:
        """Validate and store a batch of entries (objects or wire bytes, in any order) in one transaction.

        All or nothing: if any entry of the batch is malformed or invalid, raise InvalidEntry naming it and
        store nothing. Entries already stored are skipped. An entry whose previous entry or run is missing
        goes to the pending pool (or, with hold_pending=False, raises MissingDependency and nothing is
        stored). Returns once the added entries are durable.
        """
        batch: dict[bytes, Entry] = {}
        repeated: list[bytes] = []
        for i, item in enumerate(items):
            entry = item if isinstance(item, Entry) else _decode(item, i)
            if entry.id in batch:
                repeated.append(entry.id)
                continue
            try:
                validate.check_entry(entry)
            except InvalidMessage as e:
                raise InvalidEntry(f"entry {entry.id.hex()}: {e}") from None
            batch[entry.id] = entry
        with self._write() as conn:
            return self._ingest(conn, batch, repeated, hold_pending)

    def _ingest(self, conn, batch: dict[bytes, Entry], repeated: list[bytes], hold_pending: bool) -> AppendResult:
        """Contextual validation and writes; the caller holds the write transaction."""
        stored: set[bytes] = set()
        ids = list(batch)
        for chunk in _chunks(ids):
            stored.update(
                i for (i,) in conn.execute(f"SELECT id FROM entries WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            )
        duplicates = repeated + [i for i in ids if i in stored]
        ingest = _Ingest(conn)
        ingest.load_heads(e.author for e in batch.values())
        queue = deque(sorted((e for e in batch.values() if e.id not in stored), key=lambda e: (e.author, e.seq)))
        new_waiting: dict[tuple, list[Entry]] = {}
        new_pending: dict[bytes, tuple[Entry, tuple]] = {}
        added: list[bytes] = []
        dropped: list[tuple[bytes, str]] = []
        while queue:
            entry = queue.popleft()
            if entry.id in ingest.refs:
                continue  # a pending copy of an entry accepted meanwhile
            try:
                validate.check_in_context(entry, ingest)
            except MissingDependency as e:
                if not hold_pending:
                    raise
                # (re)register under what it waits for now: a woken entry may miss something else next
                new_pending[entry.id] = (entry, e.key)
                new_waiting.setdefault(e.key, []).append(entry)
                continue
            except InvalidEntry as e:
                if entry.id in batch:
                    raise InvalidEntry(f"entry {entry.id.hex()}: {e}") from None
                logger.info("dropping pending entry %s: %s", entry.id.hex(), e)
                dropped.append((entry.id, str(e)))
                continue
            new_pending.pop(entry.id, None)
            ingest.accept(entry)
            added.append(entry.id)
            for key in validate.provided_keys(entry):
                queue.extend(new_waiting.pop(key, ()))
                queue.extend(w for w in self.pending.waiting_on(key) if w.id not in ingest.refs)
        ingest.write()
        forked = tuple(dict.fromkeys(ingest.forked))
        result = AppendResult(tuple(added), tuple(duplicates), tuple(new_pending), tuple(dropped), forked)
        # The transaction commits after we return; the pool changes below are in memory only and harmless
        # if the commit failed (pending entries are never acknowledged).
        self.pending.remove(added)
        self.pending.remove(d for d, _ in dropped)
        self.pending.remove(duplicates)
        for entry, key in new_pending.values():
            for evicted in self.pending.add(entry, key):
                logger.info("pending pool full: dropped %s", evicted.hex())
        for author in forked:
            logger.info("equivocation: author %s signed two entries with the same seq", author.hex())
        return result

    def append_local(self, signer: Signer, kind: str, body: Body, now: int) -> Entry:
        """Sign `body` as the next entry of `signer`'s own chain and store it durably.

        `now` is the wall clock in integer milliseconds; the timestamp never goes below the previous
        entry's. Raises MissingDependency if a receipt's run is not in this replica, StoreError if this
        identity has equivocated (its chain is forked: extending it would only make things worse).
        """
        with self._write() as conn:
            ingest = _Ingest(conn)
            head = ingest.head(signer.public_key)
            if head is None:
                seq, prev, timestamp = 0, GENESIS_PREV, now
            elif head.fork_seq is not None:
                raise StoreError(
                    f"this identity signed two entries at seq {head.fork_seq} (its key is used by two nodes?);"
                    " refusing to extend a forked chain"
                )
            else:
                seq, prev, timestamp = head.seq + 1, head.id, max(now, ingest.refs[head.id].timestamp)
            entry = sign_entry(signer, seq, prev, timestamp, kind, body)
            try:
                validate.check_entry(entry)
            except InvalidMessage as e:
                raise InvalidEntry(f"new entry: {e}") from None
            self._ingest(conn, {entry.id: entry}, [], hold_pending=False)
        return entry

    # ---- reading: entries and chains -------------------------------------------------------------

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock, self._db_errors():
            return self._conn.execute(sql, params).fetchall()

    def count(self) -> int:
        return self._query("SELECT count(*) FROM entries")[0][0]

    def get_raw(self, entry_id: bytes) -> bytes | None:
        rows = self._query("SELECT raw FROM entries WHERE id = ?", (entry_id,))
        return rows[0][0] if rows else None

    def get(self, entry_id: bytes) -> Entry | None:
        raw = self.get_raw(entry_id)
        return None if raw is None else _decode_stored(raw, entry_id)

    def has(self, entry_id: bytes) -> bool:
        return bool(self._query("SELECT 1 FROM entries WHERE id = ?", (entry_id,)))

    def head(self, author: bytes) -> AuthorHead | None:
        rows = self._query("SELECT author, head_seq, head_id, entries, fork_seq FROM authors WHERE author = ?", (author,))
        return AuthorHead(*rows[0]) if rows else None

    def heads(self, after: bytes = b"", limit: int = 1000) -> list[AuthorHead]:
        """Per-author heads in author order, paged: pass the last author seen as `after`."""
        rows = self._query(
            "SELECT author, head_seq, head_id, entries, fork_seq FROM authors WHERE author > ? ORDER BY author LIMIT ?",
            (after, limit),
        )
        return [AuthorHead(*r) for r in rows]

    def chain(self, author: bytes, from_seq: int = 0, limit: int = 1000) -> list[Entry]:
        """An author's entries from `from_seq` up, in (seq, id) order (both branches of a fork, if any)."""
        rows = self._query(
            "SELECT id, raw FROM entries WHERE author = ? AND seq >= ? ORDER BY seq, id LIMIT ?", (author, from_seq, limit)
        )
        return [_decode_stored(raw, entry_id) for entry_id, raw in rows]

    def iter_raw(self, batch: int = 1000) -> Iterator[tuple[int, bytes, bytes]]:
        """(arrival number, id, raw) of every entry in arrival order, read in pages: dependencies always
        come before what depends on them."""
        last = 0
        while True:
            rows = self._query("SELECT n, id, raw FROM entries WHERE n > ? ORDER BY n LIMIT ?", (last, batch))
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    # ---- reading: range-based set reconciliation support ----------------------------------------

    def ids_in_range(self, lo: bytes, hi: bytes | None, limit: int = 1000) -> list[bytes]:
        """Entry ids with lo <= id < hi (hi None: no upper bound), ascending."""
        if hi is None:
            rows = self._query("SELECT id FROM entries WHERE id >= ? ORDER BY id LIMIT ?", (lo, limit))
        else:
            rows = self._query("SELECT id FROM entries WHERE id >= ? AND id < ? ORDER BY id LIMIT ?", (lo, hi, limit))
        return [r[0] for r in rows]

    def range_fingerprint(self, lo: bytes, hi: bytes | None, page: int = 10_000) -> tuple[int, bytes]:
        """(count, XOR of the ids) of the entries with lo <= id < hi: what two replicas compare to find
        the ranges where they differ. Scans the range in pages; a cached tree of fingerprints can come later."""
        acc, count = 0, 0
        ids = self.ids_in_range(lo, hi, page)
        while ids:
            for entry_id in ids:
                acc ^= int.from_bytes(entry_id, "big")
            count += len(ids)
            if len(ids) < page:
                break
            ids = self.ids_in_range(ids[-1] + b"\x00", hi, page)  # the next id after the last one
        return count, acc.to_bytes(32, "big")

    # ---- reading: derived ------------------------------------------------------------------------

    def balance(self, peer: bytes) -> Balance:
        rows = self._query("SELECT credits, samples, receipts FROM balances WHERE peer = ?", (peer,))
        return Balance(peer, *rows[0]) if rows else Balance(peer, 0, 0, 0)

    def top(self, limit: int = 20) -> list[Balance]:
        rows = self._query(
            "SELECT peer, credits, samples, receipts FROM balances ORDER BY credits DESC, peer LIMIT ?", (limit,)
        )
        return [Balance(*r) for r in rows]

    def runs(self) -> list[RunSummary]:
        rows = self._query(
            "SELECT u.publisher, u.run_id, e.id, u.seq, u.timestamp, u.rate, u.quorum, u.validators,"
            " a.fork_seq IS NULL OR u.seq < a.fork_seq, t.credits, t.samples, t.receipts"
            " FROM runs u JOIN entries e ON e.n = u.n JOIN authors a ON a.author = u.publisher"
            " LEFT JOIN run_totals t ON t.publisher = u.publisher AND t.run_id = u.run_id"
            " ORDER BY u.timestamp, u.run_id"
        )
        return [
            RunSummary(pub, run_id, eid, seq, ts, _policy_from_row(rate, quorum, vals), bool(counted),
                       (credits or 0) if counted else 0, (samples or 0) if counted else 0,
                       (receipts or 0) if counted else 0)
            for pub, run_id, eid, seq, ts, rate, quorum, vals, counted, credits, samples, receipts in rows
        ]

    def counted_receipts(self, author: bytes) -> set[bytes]:
        """Ids of `author`'s receipts that count towards its balance."""
        counted = f"SELECT id FROM entries WHERE n IN (SELECT n FROM ({_COUNTED_RECEIPTS} AND r.author = ?))"
        return {r[0] for r in self._query(counted, (author,))}

    def equivocators(self) -> list[AuthorHead]:
        rows = self._query(
            "SELECT author, head_seq, head_id, entries, fork_seq FROM authors WHERE fork_seq IS NOT NULL ORDER BY author"
        )
        return [AuthorHead(*r) for r in rows]

    # ---- derived tables: rebuild and check ---------------------------------------------------------

    def rebuild_derived(self) -> None:
        """Recompute every table but the raw entries from the entries themselves, in one transaction."""
        with self._write() as conn:
            conn.execute("DELETE FROM runs")
            conn.execute("DELETE FROM receipts")
            for n, entry_id, raw in self._iter_raw_unlocked(conn):
                entry = _decode_stored(raw, entry_id)
                conn.execute(
                    "UPDATE entries SET author = ?, seq = ?, prev = ?, timestamp = ?, kind = ? WHERE n = ?",
                    (entry.author, entry.seq, entry.prev, entry.timestamp, entry.kind, n),
                )
                run_row, receipt_row = _index_rows(entry, n)
                if run_row is not None:
                    conn.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", run_row)
                if receipt_row is not None:
                    conn.execute("INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", receipt_row)
            conn.execute("DELETE FROM authors")
            conn.execute("INSERT INTO authors " + _DERIVE_AUTHORS)
            conn.execute("DELETE FROM balances")
            conn.execute("DELETE FROM run_totals")
            peers, runs = _sum_counted(conn)
            conn.executemany("INSERT INTO balances VALUES (?, ?, ?, ?)", [(p, *t) for p, t in peers.items()])
            conn.executemany("INSERT INTO run_totals VALUES (?, ?, ?, ?, ?)", [(*k, *t) for k, t in runs.items()])

    def check_derived(self) -> list[str]:
        """Compare every derived table with what the entries imply; return the disagreements (empty: all
        agree). Read-only; `rebuild_derived()` repairs them."""
        problems: list[str] = []
        with self._lock, self._db_errors():
            conn = self._conn
            conn.execute("BEGIN")  # one consistent snapshot
            try:
                for n, entry_id, raw in self._iter_raw_unlocked(conn):
                    problems.extend(_check_entry_rows(conn, n, entry_id, raw))
                expected_authors = set(conn.execute(_DERIVE_AUTHORS))
                stored_authors = set(conn.execute("SELECT author, head_seq, head_id, entries, fork_seq FROM authors"))
                for author in sorted({row[0] for row in expected_authors ^ stored_authors}):
                    problems.append(f"authors: row for {author.hex()} disagrees with the entries")
                peers, runs = _sum_counted(conn)
                stored_peers = {r[0]: list(r[1:]) for r in conn.execute("SELECT peer, credits, samples, receipts FROM balances")}
                for peer in sorted(set(peers) | set(stored_peers)):
                    if peers.get(peer) != stored_peers.get(peer):
                        problems.append(f"balances: {peer.hex()} is {stored_peers.get(peer)}, entries say {peers.get(peer)}")
                stored_runs = {
                    (r[0], r[1]): list(r[2:])
                    for r in conn.execute("SELECT publisher, run_id, credits, samples, receipts FROM run_totals")
                }
                for key in sorted(set(runs) | set(stored_runs)):
                    if runs.get(key) != stored_runs.get(key):
                        problems.append(f"run_totals: run {key[1].hex()} is {stored_runs.get(key)}, entries say {runs.get(key)}")
            finally:
                conn.execute("ROLLBACK")
        return problems

    @staticmethod
    def _iter_raw_unlocked(conn: sqlite3.Connection, page: int = 1000) -> Iterator[tuple[int, bytes, bytes]]:
        last = 0
        while True:
            rows = conn.execute("SELECT n, id, raw FROM entries WHERE n > ? ORDER BY n LIMIT ?", (last, page)).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]


def _check_entry_rows(conn: sqlite3.Connection, n: int, entry_id: bytes, raw: bytes) -> list[str]:
    """Whether the index columns and the runs/receipts row of one entry match its raw bytes."""
    try:
        entry = Entry.from_wire(raw)
    except InvalidMessage as e:
        return [f"entry {entry_id.hex()}: stored bytes do not decode: {e}"]
    problems = []
    if entry.id != entry_id:
        problems.append(f"entry {entry_id.hex()}: stored bytes do not hash to the entry id")
    columns = conn.execute("SELECT author, seq, prev, timestamp, kind FROM entries WHERE n = ?", (n,)).fetchone()
    if columns != (entry.author, entry.seq, entry.prev, entry.timestamp, entry.kind):
        problems.append(f"entry {entry_id.hex()}: index columns disagree with the stored bytes")
    run_row, receipt_row = _index_rows(entry, n)
    if run_row is not None:
        stored = conn.execute("SELECT * FROM runs WHERE n = ?", (n,)).fetchall()
        if stored != [run_row]:
            problems.append(f"runs: row of entry {entry_id.hex()} disagrees with the entry")
    if receipt_row is not None:
        stored = conn.execute("SELECT * FROM receipts WHERE n = ?", (n,)).fetchall()
        if stored != [receipt_row]:
            problems.append(f"receipts: row of entry {entry_id.hex()} disagrees with the entry")
    return problems


def _decode(item: bytes, index: int) -> Entry:
    try:
        return Entry.from_wire(item)
    except InvalidMessage as e:
        raise InvalidEntry(f"entry #{index} of the batch: {e}") from None


def _decode_stored(raw: bytes, entry_id: bytes) -> Entry:
    try:
        return Entry.from_wire(raw)
    except InvalidMessage as e:
        raise StoreError(f"stored entry {entry_id.hex()} is corrupt ({e}); run `p2pc ledger verify`") from None
