"""The ledger replica on disk: the SQLite connection (WAL, synchronous=FULL), its transactions, and the reads the CLI and sync need."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from p2pcompute.crypto import Signer
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.errors import NotFound, StoreError
from p2pcompute.ledger import derived, ingest, schema
from p2pcompute.ledger.codec import Body, Entry
from p2pcompute.ledger.ingest import AppendResult
from p2pcompute.ledger.pending import PendingPool

LEDGER_FILENAME = "ledger.sqlite"
# A reader (the CLI while the node runs) or a second writer waits this long for the write lock.
BUSY_TIMEOUT_S = 10.0


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
    credits: int  # micro-credits that count
    samples: int
    receipts: int  # payouts that count
    clawed_back: int = 0  # micro-credits issued to this peer that failed audits voided


@dataclass(frozen=True)
class Audit:
    entry_id: bytes
    auditor: bytes
    payout_id: bytes
    run_id: bytes
    peer: bytes
    epoch: int
    timestamp: int


@dataclass(frozen=True)
class RunSummary:
    publisher: bytes
    run_id: bytes
    entry_id: bytes
    seq: int
    timestamp: int
    policy: CreditPolicy
    counted: bool  # False: the publication lies at or past its publisher's fork point (its payouts still count)
    credits: int
    samples: int
    receipts: int


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
                schema.migrate(self._conn, self.path)
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
        batch, repeated = ingest.check_batch(items)
        with self._write() as conn:
            return ingest.ingest(conn, self.pending, batch, repeated, hold_pending)

    def append_local(self, signer: Signer, kind: str, body: Body, now: int) -> Entry:
        """Sign `body` (or `body(view, seq)`, see ingest.append_local) as the next entry of `signer`'s own chain and
        store it durably.

        `now` is the wall clock in integer milliseconds; the timestamp never goes below the previous
        entry's. Raises MissingDependency if a payout's run is not in this replica, StoreError if this
        identity has equivocated (its chain is forked: extending it would only make things worse).
        """
        with self._write() as conn:
            return ingest.append_local(conn, self.pending, signer, kind, body, now)

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
        return None if raw is None else schema.decode_stored(raw, entry_id)

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
        return [schema.decode_stored(raw, entry_id) for entry_id, raw in rows]

    def run_entries(self, run_id: bytes, limit: int = 1000) -> list[Entry]:
        """The run.publish, payout and audit entries of run `run_id` (any publisher), in arrival order."""
        rows = self._query(
            "SELECT id, raw FROM entries WHERE n IN (SELECT n FROM runs WHERE run_id = ?"
            " UNION ALL SELECT n FROM payouts WHERE run_id = ? UNION ALL SELECT n FROM audits WHERE run_id = ?)"
            " ORDER BY n LIMIT ?", (run_id, run_id, run_id, limit)
        )
        return [schema.decode_stored(raw, entry_id) for entry_id, raw in rows]

    def payouts_to(self, peer: bytes, limit: int = 10_000) -> list[tuple[Entry, bool]]:
        """The payouts to `peer`, oldest first, each with whether it counts (not clawed back, issuer not forked)."""
        counted = {r[0] for r in self._query(f"SELECT n FROM ({derived.COUNTED_PAYOUTS} AND p.peer = ?)", (peer,))}
        rows = self._query("SELECT e.n, e.id, e.raw FROM payouts p JOIN entries e ON e.n = p.n WHERE p.peer = ?"
                           " ORDER BY e.n LIMIT ?", (peer, limit))
        return [(schema.decode_stored(raw, entry_id), n in counted) for n, entry_id, raw in rows]

    def iter_raw(self, batch: int = 1000) -> Iterator[tuple[int, bytes, bytes]]:
        """(arrival number, id, raw) of every entry in arrival order, read in pages: dependencies always
        come before what depends on them."""
        yield from schema.iter_stored(self._query, batch)

    # ---- reading: ids for set reconciliation (reconcile.py keeps the fingerprints) -----------------

    def ids_in_range(self, lo: bytes, hi: bytes | None, limit: int = 1000) -> list[bytes]:
        """Entry ids with lo <= id < hi (hi None: no upper bound), ascending."""
        if hi is None:
            rows = self._query("SELECT id FROM entries WHERE id >= ? ORDER BY id LIMIT ?", (lo, limit))
        else:
            rows = self._query("SELECT id FROM entries WHERE id >= ? AND id < ? ORDER BY id LIMIT ?", (lo, hi, limit))
        return [r[0] for r in rows]

    # ---- reading: derived ------------------------------------------------------------------------

    def balance(self, peer: bytes) -> Balance:
        rows = self._query("SELECT credits, samples, receipts FROM balances WHERE peer = ?", (peer,))
        clawed = self._query(f"SELECT coalesce(sum(amount), 0) FROM ({derived.ISSUED_PAYOUTS}{derived.CLAWED_BACK}"
                             " AND p.peer = ?)", (peer,))[0][0]
        return Balance(peer, *(rows[0] if rows else (0, 0, 0)), clawed_back=derived.saturating(clawed))

    def audits(self, run_id: bytes | None = None) -> list[Audit]:
        """Failed audits in arrival order (of one run, or all)."""
        where, params = ("WHERE x.run_id = ?", (run_id,)) if run_id is not None else ("", ())
        rows = self._query("SELECT e.id, x.auditor, x.payout_id, x.run_id, x.peer, x.epoch, e.timestamp FROM audits x"
                           f" JOIN entries e ON e.n = x.n {where} ORDER BY x.n", params)
        return [Audit(*r) for r in rows]

    def top(self, limit: int = 20) -> list[Balance]:
        rows = self._query(
            "SELECT peer, credits, samples, receipts FROM balances ORDER BY credits DESC, peer LIMIT ?", (limit,)
        )
        return [Balance(*r) for r in rows]

    def runs(self) -> list[RunSummary]:
        """Every publication, with its run's totals (a run published twice shows the same totals twice)."""
        rows = self._query(
            "SELECT u.publisher, u.run_id, e.id, u.seq, u.timestamp, u.policy,"
            " a.fork_seq IS NULL OR u.seq < a.fork_seq, t.credits, t.samples, t.receipts"
            " FROM runs u JOIN entries e ON e.n = u.n JOIN authors a ON a.author = u.publisher"
            " LEFT JOIN run_totals t ON t.run_id = u.run_id"
            " ORDER BY u.timestamp, u.run_id"
        )
        return [
            RunSummary(pub, run_id, eid, seq, ts, schema.policy_from_row(policy), bool(counted),
                       credits or 0, samples or 0, receipts or 0)
            for pub, run_id, eid, seq, ts, policy, counted, credits, samples, receipts in rows
        ]

    def run_policy(self, run_id: bytes) -> CreditPolicy | None:
        rows = self._query("SELECT policy FROM runs WHERE run_id = ? LIMIT 1", (run_id,))
        return schema.policy_from_row(rows[0][0]) if rows else None

    def counted_payouts_by(self, issuer: bytes) -> set[bytes]:
        """Ids of the payouts `issuer` signed that count (it has not equivocated at or below them)."""
        counted = f"SELECT id FROM entries WHERE n IN (SELECT n FROM ({derived.COUNTED_PAYOUTS} AND p.issuer = ?))"
        return {r[0] for r in self._query(counted, (issuer,))}

    def payout_for(self, issuer: bytes, run_id: bytes, epoch: int, peer: bytes) -> bytes | None:
        """Id of `issuer`'s payout to `peer` for that epoch, if this replica holds one."""
        rows = self._query(
            "SELECT e.id FROM payouts p JOIN entries e ON e.n = p.n"
            " WHERE p.peer = ? AND p.run_id = ? AND p.epoch = ? AND p.issuer = ? LIMIT 1",
            (peer, run_id, epoch, issuer))
        return rows[0][0] if rows else None

    def paid_peers(self, run_id: bytes, peers) -> set[bytes]:
        """Those of `peers` that this replica holds a payout to for `run_id`."""
        peers = list(peers)
        if not peers:
            return set()
        rows = self._query(f"SELECT DISTINCT peer FROM payouts WHERE run_id = ? AND peer IN ({','.join('?' * len(peers))})",
                           (run_id, *peers))
        return {r[0] for r in rows}

    def paid_epochs(self, peer: bytes, run_id: bytes) -> set[int]:
        """Epochs of `run_id` for which this replica holds a payout to `peer` (by any issuer)."""
        return {r[0] for r in self._query("SELECT epoch FROM payouts WHERE peer = ? AND run_id = ?", (peer, run_id))}

    def equivocators(self) -> list[AuthorHead]:
        rows = self._query(
            "SELECT author, head_seq, head_id, entries, fork_seq FROM authors WHERE fork_seq IS NOT NULL ORDER BY author"
        )
        return [AuthorHead(*r) for r in rows]

    # ---- derived tables: rebuild and check ---------------------------------------------------------

    def rebuild_derived(self) -> None:
        """Recompute every table but the raw entries from the entries themselves, in one transaction."""
        with self._write() as conn:
            derived.rebuild(conn)

    def check_derived(self) -> list[str]:
        """Compare every derived table with what the entries imply; return the disagreements (empty: all
        agree). Read-only; `rebuild_derived()` repairs them."""
        with self._lock, self._db_errors():
            conn = self._conn
            conn.execute("BEGIN")  # one consistent snapshot
            try:
                return derived.check(conn)
            finally:
                conn.execute("ROLLBACK")
