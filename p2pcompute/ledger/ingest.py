"""The append path: a batch checked, validated against the store plus itself, pending entries woken, written all or nothing."""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

from p2pcompute.crypto import Signer
from p2pcompute.errors import InvalidEntry, InvalidMessage, MissingDependency, StoreError
from p2pcompute.ledger import derived, schema, validate
from p2pcompute.ledger.codec import GENESIS_PREV, KIND_AUDIT, KIND_PAYOUT, KIND_RUN_PUBLISH, Body, Entry, sign_entry
from p2pcompute.ledger.pending import PendingPool
from p2pcompute.ledger.validate import EntryRef, PayoutRef, Publication, Tally

logger = logging.getLogger(__name__)

# Host parameters per `IN (...)` query: SQLite before 3.32 allowed 999 per statement.
_IN_CHUNK = 500


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


def _chunks(items: list, size: int = _IN_CHUNK) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Batch:
    """One append inside a write transaction: the LedgerView that validation reads (the store plus the
    entries accepted so far in this batch), and the rows and derived changes to write at the end."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.refs: dict[bytes, EntryRef] = {}
        self.heads: dict[bytes, _Head | None] = {}
        self.pubs: dict[tuple[bytes, bytes], list[Publication]] = {}
        self.policies: dict[bytes, object] = {}  # run_id -> CreditPolicy (or None: not here)
        self.new_payouts: dict[tuple[bytes, bytes], list[PayoutRef]] = {}  # (issuer, run_id) -> payouts of this batch
        self.entry_rows: list[tuple] = []
        self.index_rows: dict[str, list[tuple]] = {}  # table -> rows
        self.clawed: set[tuple[bytes, bytes]] = set()  # (peer, run_id) whose payouts an audit in this batch voids
        self.balance_delta: dict[bytes, list[int]] = {}
        self.run_delta: dict[bytes, list[int]] = {}
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
                "SELECT e.id, u.seq, u.policy FROM runs u JOIN entries e ON e.n = u.n"
                " WHERE u.publisher = ? AND u.run_id = ?",
                key,
            ).fetchall()
            pubs = self.pubs[key] = [
                Publication(entry_id, publisher, seq, run_id, schema.policy_from_row(policy))
                for entry_id, seq, policy in rows
            ]
        return pubs

    def run_policy(self, run_id: bytes):
        if self.policies.get(run_id) is None:
            row = self.conn.execute("SELECT policy FROM runs WHERE run_id = ? LIMIT 1", (run_id,)).fetchone()
            self.policies[run_id] = None if row is None else schema.policy_from_row(row[0])
        return self.policies[run_id]

    def tally(self, issuer: bytes, run_id: bytes, epoch: int, peer: bytes, below_seq: int,
              with_budget: bool = True) -> Tally:
        same, epoch_samples = self.conn.execute(
            "SELECT coalesce(sum(peer = ?), 0), coalesce(sum(samples), 0) FROM payouts"
            " WHERE issuer = ? AND run_id = ? AND epoch = ? AND seq < ?", (peer, issuer, run_id, epoch, below_seq),
        ).fetchone()
        run_amount = 0
        if with_budget:  # one index-only scan of the issuer's payouts in the run: only runs with a budget pay it
            run_amount = self.conn.execute(
                "SELECT coalesce(sum(amount), 0) FROM payouts WHERE issuer = ? AND run_id = ? AND seq < ?",
                (issuer, run_id, below_seq)).fetchone()[0]
        for p in self.new_payouts.get((issuer, run_id), ()):
            if p.ref.seq < below_seq:
                same += p.epoch == epoch and p.peer == peer
                epoch_samples += p.samples if p.epoch == epoch else 0
                run_amount += p.amount if with_budget else 0
        return Tally(same, epoch_samples, run_amount)

    def payouts_of(self, issuer: bytes, run_id: bytes) -> list[PayoutRef]:
        found = list(self.new_payouts.get((issuer, run_id), ()))
        for entry_id, epoch, peer, samples, amount in self.conn.execute(
            "SELECT e.id, p.epoch, p.peer, p.samples, p.amount FROM payouts p JOIN entries e ON e.n = p.n"
            " WHERE p.issuer = ? AND p.run_id = ?",
            (issuer, run_id),
        ).fetchall():
            found.append(PayoutRef(self.entry_ref(entry_id), run_id, epoch, peer, samples, amount))
        return found

    def payout(self, entry_id: bytes) -> PayoutRef | None:
        for payouts in self.new_payouts.values():
            for p in payouts:
                if p.ref.id == entry_id:
                    return p
        row = self.conn.execute(
            "SELECT p.run_id, p.epoch, p.peer, p.samples, p.amount FROM payouts p JOIN entries e ON e.n = p.n"
            " WHERE e.id = ?", (entry_id,)).fetchone()
        return None if row is None else PayoutRef(self.entry_ref(entry_id), *row)

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
        indexed = schema.index_row(entry, n)
        if indexed is not None:
            self.index_rows.setdefault(indexed[0], []).append(indexed[1])
        if entry.kind == KIND_AUDIT:
            self.clawed.add((entry.body.peer, entry.body.run_id))
        if entry.kind == KIND_RUN_PUBLISH:
            self.publications(author, entry.body.run_id).append(
                Publication(entry.id, author, entry.seq, entry.body.run_id, entry.body.policy)
            )
            self.policies[entry.body.run_id] = entry.body.policy
        if entry.kind == KIND_PAYOUT:
            claim = entry.body.receipt.claim
            self.new_payouts.setdefault((author, claim.run_id), []).append(
                PayoutRef(ref, claim.run_id, claim.epoch, claim.peer, claim.samples, entry.body.amount))
            if self._counts(author, entry.seq):
                for delta in (self.balance_delta.setdefault(claim.peer, [0, 0, 0]),
                              self.run_delta.setdefault(claim.run_id, [0, 0, 0])):
                    delta[0] += entry.body.amount
                    delta[1] += claim.samples
                    delta[2] += 1

    def _counts(self, issuer: bytes, seq: int) -> bool:
        """derived.COUNTED_PAYOUTS for one payout, as the batch sees the ledger."""
        fork = self.fork_seq(issuer)
        return fork is None or seq < fork

    def write(self) -> None:
        """Write rows and derived changes (still inside the caller's transaction)."""
        conn = self.conn
        conn.executemany(
            "INSERT INTO entries (n, id, author, seq, prev, timestamp, kind, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            self.entry_rows,
        )
        for table, rows in self.index_rows.items():
            conn.executemany(schema.insert_sql(table), rows)
        heads = [(a, h.seq, h.id, h.entries, h.fork_seq) for a, h in self.heads.items() if h is not None and h.dirty]
        # a payout to a peer already clawed back in its run adds nothing: recompute those peers and runs whole
        derived.apply(conn, heads, self.balance_delta, self.run_delta, self.forked, self.clawed | self._late_payouts())

    def _late_payouts(self) -> set[tuple[bytes, bytes]]:
        """(peer, run_id) of this batch's payouts to peers an audit already clawed back in that run."""
        late = set()
        for (_issuer, run_id), payouts in self.new_payouts.items():
            for p in payouts:
                if self.conn.execute("SELECT 1 FROM audits WHERE peer = ? AND run_id = ? LIMIT 1",
                                     (p.peer, run_id)).fetchone():
                    late.add((p.peer, run_id))
        return late


# ---- the append path ---------------------------------------------------------------------------


def check_batch(items: Iterable[Entry | bytes]) -> tuple[dict[bytes, Entry], list[bytes]]:
    """Decode a batch (objects or wire bytes) and check each entry on its own (format, signatures), before
    any transaction: ({id: entry} in batch order, ids repeated in the batch). Raises InvalidEntry naming
    the first bad entry."""
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
    return batch, repeated


def ingest(
    conn: sqlite3.Connection, pending: PendingPool, batch: dict[bytes, Entry], repeated: list[bytes], hold_pending: bool
) -> AppendResult:
    """Contextual validation and writes of a checked batch; the caller holds the write transaction.

    All or nothing: an invalid entry of the batch raises InvalidEntry (and the caller rolls back). An entry
    whose previous entry or run is missing goes to `pending` (hold_pending) or raises MissingDependency.
    Pending entries the batch completes are validated and added with it; those found invalid are dropped.
    """
    stored: set[bytes] = set()
    ids = list(batch)
    for chunk in _chunks(ids):
        stored.update(
            i for (i,) in conn.execute(f"SELECT id FROM entries WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        )
    duplicates = repeated + [i for i in ids if i in stored]
    view = _Batch(conn)
    view.load_heads(e.author for e in batch.values())
    queue = deque(sorted((e for e in batch.values() if e.id not in stored), key=lambda e: (e.author, e.seq)))
    new_waiting: dict[tuple, list[Entry]] = {}
    new_pending: dict[bytes, tuple[Entry, tuple]] = {}
    added: list[bytes] = []
    dropped: list[tuple[bytes, str]] = []
    while queue:
        entry = queue.popleft()
        if entry.id in view.refs:
            continue  # a pending copy of an entry accepted meanwhile
        try:
            validate.check_in_context(entry, view)
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
        view.accept(entry)
        added.append(entry.id)
        for key in validate.provided_keys(entry):
            queue.extend(new_waiting.pop(key, ()))
            queue.extend(w for w in pending.waiting_on(key) if w.id not in view.refs)
    view.write()
    forked = tuple(dict.fromkeys(view.forked))
    result = AppendResult(tuple(added), tuple(duplicates), tuple(new_pending), tuple(dropped), forked)
    # The transaction commits after we return; the pool changes below are in memory only and harmless
    # if the commit failed (pending entries are never acknowledged).
    pending.remove(added)
    pending.remove(d for d, _ in dropped)
    pending.remove(duplicates)
    for entry, key in new_pending.values():
        for evicted in pending.add(entry, key):
            logger.info("pending pool full: dropped %s", evicted.hex())
    for author in forked:
        logger.info("equivocation: author %s signed two entries with the same seq", author.hex())
    return result


def append_local(
    conn: sqlite3.Connection, pending: PendingPool, signer: Signer, kind: str, body: Body, now: int
) -> Entry:
    """Sign `body` as the next entry of `signer`'s own chain and ingest it; the caller holds the write
    transaction. The timestamp never goes below the previous entry's. Raises MissingDependency if a
    payout's run is not in this replica, StoreError if this identity's chain is forked.

    `body` may be a function of (the view, the new entry's seq) that returns it: a body that depends on the chain
    below it (a payout's amount under its epoch's cap) is then made in the same transaction as it is appended."""
    view = _Batch(conn)
    head = view.head(signer.public_key)
    if head is None:
        seq, prev, timestamp = 0, GENESIS_PREV, now
    elif head.fork_seq is not None:
        raise StoreError(
            f"this identity signed two entries at seq {head.fork_seq} (its key is used by two nodes?);"
            " refusing to extend a forked chain"
        )
    else:
        seq, prev, timestamp = head.seq + 1, head.id, max(now, view.refs[head.id].timestamp)
    if callable(body):
        body = body(view, seq)
    entry = sign_entry(signer, seq, prev, timestamp, kind, body)
    try:
        validate.check_entry(entry)
    except InvalidMessage as e:
        raise InvalidEntry(f"new entry: {e}") from None
    ingest(conn, pending, {entry.id: entry}, [], hold_pending=False)
    return entry


def _decode(item: bytes, index: int) -> Entry:
    try:
        return Entry.from_wire(item)
    except InvalidMessage as e:
        raise InvalidEntry(f"entry #{index} of the batch: {e}") from None
