"""Derived tables (authors, balances, run_totals): updated on append, rebuilt from the entries, checked against them."""

from __future__ import annotations

import sqlite3

from p2pcompute.errors import InvalidMessage
from p2pcompute.ledger import schema
from p2pcompute.ledger.codec import Entry

# Balances and totals are SQLite INTEGERs; sums saturate here instead of overflowing. All amounts are
# non-negative, so min(sum, INT64_MAX) does not depend on the order entries arrived in.
INT64_MAX = 2**63 - 1

# Payouts that count towards balances (docs/ledger.md, "Equivocation", "Audits"): the issuer has not equivocated
# at or below the payout's seq, and no audit clawed back the peer's payouts in that run. (The run's publisher does
# not matter: the policy comes from the manifest.)
ISSUED_PAYOUTS = """
SELECT p.n, p.peer, p.run_id, p.samples, p.amount
FROM payouts p
JOIN authors a ON a.author = p.issuer
WHERE (a.fork_seq IS NULL OR p.seq < a.fork_seq)
"""
CLAWED_BACK = " AND EXISTS (SELECT 1 FROM audits x WHERE x.peer = p.peer AND x.run_id = p.run_id)"
COUNTED_PAYOUTS = ISSUED_PAYOUTS + " AND NOT EXISTS (SELECT 1 FROM audits x WHERE x.peer = p.peer AND x.run_id = p.run_id)"

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

# Entries read per query while rebuilding or checking.
_PAGE = 1000

Totals = list[int]  # [credits, samples, receipts]


def saturating(value: int) -> int:
    return value if value <= INT64_MAX else INT64_MAX


# ---- maintained on append ----------------------------------------------------------------------


def apply(
    conn: sqlite3.Connection,
    heads: list[tuple],
    balance_delta: dict[bytes, Totals],
    run_delta: dict[tuple[bytes, bytes], Totals],
    forked: list[bytes],
    clawed: set[tuple[bytes, bytes]] = frozenset(),
) -> None:
    """Write one append's derived changes (inside the caller's transaction): the changed `authors` rows
    (author, head_seq, head_id, entries, fork_seq), the counted payouts' deltas, and, for authors whose
    fork point appeared or moved down, the totals recomputed."""
    conn.executemany(
        "INSERT INTO authors (author, head_seq, head_id, entries, fork_seq) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (author) DO UPDATE SET head_seq = excluded.head_seq, head_id = excluded.head_id,"
        " entries = excluded.entries, fork_seq = excluded.fork_seq",
        heads,
    )
    _add_totals(conn, "balances", ("peer",), {(peer,): d for peer, d in balance_delta.items()})
    _add_totals(conn, "run_totals", ("run_id",), {(run_id,): d for run_id, d in run_delta.items()})
    if forked:
        _recompute_after_forks(conn, forked)
    if clawed:
        recompute(conn, {peer for peer, _ in clawed}, {run for _, run in clawed})


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
        rows.append((*key, saturating(credits), saturating(samples), receipts))
    columns = ", ".join(key_columns)
    conn.executemany(
        f"INSERT OR REPLACE INTO {table} ({columns}, credits, samples, receipts) VALUES"
        f" ({', '.join('?' * (len(key_columns) + 3))})",
        rows,
    )


def _sum_counted(conn: sqlite3.Connection, condition: str = "", params: tuple = ()) -> tuple[dict, dict]:
    """Totals of the counted payouts matching `condition`: ({peer: [c, s, r]}, {run_id: [c, s, r]})."""
    peers: dict[bytes, Totals] = {}
    runs: dict[bytes, Totals] = {}
    for _n, peer, run_id, samples, amount in conn.execute(COUNTED_PAYOUTS + condition, params):
        for total in (peers.setdefault(peer, [0, 0, 0]), runs.setdefault(run_id, [0, 0, 0])):
            total[0] = saturating(total[0] + amount)
            total[1] = saturating(total[1] + samples)
            total[2] += 1
    return peers, runs


def _recompute_after_forks(conn: sqlite3.Connection, issuers: list[bytes]) -> None:
    """An author's fork point appeared or moved down: recompute every balance and run total its payouts touch."""
    peers: set[bytes] = set()
    runs: set[bytes] = set()
    for issuer in issuers:
        peers.update(r for (r,) in conn.execute("SELECT DISTINCT peer FROM payouts WHERE issuer = ?", (issuer,)))
        runs.update(r for (r,) in conn.execute("SELECT DISTINCT run_id FROM payouts WHERE issuer = ?", (issuer,)))
    recompute(conn, peers, runs)


def recompute(conn: sqlite3.Connection, peers, runs) -> None:
    """Recompute these peers' balances and these runs' totals from the payouts table, exactly as rebuild() does."""
    for peer in peers:
        totals, _ = _sum_counted(conn, " AND p.peer = ?", (peer,))
        conn.execute("DELETE FROM balances WHERE peer = ?", (peer,))
        if peer in totals:
            conn.execute("INSERT INTO balances VALUES (?, ?, ?, ?)", (peer, *totals[peer]))
    for run_id in runs:
        _, totals = _sum_counted(conn, " AND p.run_id = ?", (run_id,))
        conn.execute("DELETE FROM run_totals WHERE run_id = ?", (run_id,))
        if run_id in totals:
            conn.execute("INSERT INTO run_totals VALUES (?, ?, ?, ?)", (run_id, *totals[run_id]))


# ---- rebuilt and checked from the entries ------------------------------------------------------


def _stored(conn: sqlite3.Connection):
    return schema.iter_stored(lambda sql, params: conn.execute(sql, params).fetchall(), _PAGE)


def rebuild(conn: sqlite3.Connection) -> None:
    """Recompute every table but the raw entries from the entries themselves (inside the caller's
    write transaction). Entries were validated when they arrived; one written into the file by other means (a
    minted payout, say) is indexed only if it holds by itself and against its run's policy (`_indexable`), so a
    rebuild never credits it. `p2pc ledger verify` names such entries."""
    for table in schema.INDEX_TABLES_BY_NAME:
        conn.execute(f"DELETE FROM {table}")
    for n, entry_id, raw in _stored(conn):
        entry = schema.decode_stored(raw, entry_id)
        conn.execute(
            "UPDATE entries SET author = ?, seq = ?, prev = ?, timestamp = ?, kind = ? WHERE n = ?",
            (entry.author, entry.seq, entry.prev, entry.timestamp, entry.kind, n),
        )
        indexed = schema.index_row(entry, n)
        if indexed is not None and _indexable(conn, entry):
            conn.execute(schema.insert_sql(indexed[0]), indexed[1])
    conn.execute("DELETE FROM authors")
    conn.execute("INSERT INTO authors " + _DERIVE_AUTHORS)
    conn.execute("DELETE FROM balances")
    conn.execute("DELETE FROM run_totals")
    peers, runs = _sum_counted(conn)
    conn.executemany("INSERT INTO balances VALUES (?, ?, ?, ?)", [(p, *t) for p, t in peers.items()])
    conn.executemany("INSERT INTO run_totals VALUES (?, ?, ?, ?)", [(k, *t) for k, t in runs.items()])


def _indexable(conn: sqlite3.Connection, entry: Entry) -> bool:
    """Whether an entry met the rules that need no chain walk: its own (signatures, body) and, for a payout or an
    audit, its run's policy (the payout's issuer, epoch, quorum, cap and amount; the auditor among the issuers)."""
    from p2pcompute.errors import InvalidEntry
    from p2pcompute.ledger.codec import KIND_AUDIT, KIND_PAYOUT
    from p2pcompute.ledger.validate import check_entry, check_payout_policy

    try:
        check_entry(entry)
        if entry.kind in (KIND_PAYOUT, KIND_AUDIT):
            run_id = entry.body.receipt.claim.run_id if entry.kind == KIND_PAYOUT else entry.body.run_id
            row = conn.execute("SELECT policy FROM runs WHERE run_id = ? LIMIT 1", (run_id,)).fetchone()
            if row is None:
                return False
            policy = schema.policy_from_row(row[0])
            if entry.kind == KIND_PAYOUT:
                check_payout_policy(entry.body, policy, entry.author)
            elif entry.author not in policy.issuers:
                return False
    except InvalidMessage:
        return False
    return True


def check(conn: sqlite3.Connection) -> list[str]:
    """Compare every derived table with what the entries imply; return the disagreements (empty: all
    agree). Read-only; the caller holds one consistent snapshot."""
    problems: list[str] = []
    for n, entry_id, raw in _stored(conn):
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
    stored_runs = {r[0]: list(r[1:]) for r in conn.execute("SELECT run_id, credits, samples, receipts FROM run_totals")}
    for key in sorted(set(runs) | set(stored_runs)):
        if runs.get(key) != stored_runs.get(key):
            problems.append(f"run_totals: run {key.hex()} is {stored_runs.get(key)}, entries say {runs.get(key)}")
    return problems


def _check_entry_rows(conn: sqlite3.Connection, n: int, entry_id: bytes, raw: bytes) -> list[str]:
    """Whether the index columns and the per-kind index row of one entry match its raw bytes."""
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
    indexed = schema.index_row(entry, n)
    if indexed is not None:
        table, row = indexed
        if conn.execute(f"SELECT * FROM {table} WHERE n = ?", (n,)).fetchall() != [row]:
            problems.append(f"{table}: row of entry {entry_id.hex()} disagrees with the entry")
    return problems
