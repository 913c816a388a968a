"""The node's ledger replica: the store plus the in-memory prefix index, the one place every append goes through."""

from __future__ import annotations

from typing import Callable, Iterable

from p2pcompute.ledger import reconcile
from p2pcompute.ledger.codec import Entry
from p2pcompute.ledger.reconcile import PrefixIndex
from p2pcompute.ledger.ingest import AppendResult
from p2pcompute.ledger.store import Store

INDEX_LOAD_BATCH = 50_000  # ids read from SQLite per query while building the prefix index at start


class Replica:
    """The node's ledger: appends (local or from peers) go through here so the prefix index stays exact,
    and listeners (push) hear of every entry that was added."""

    def __init__(self, store: Store):
        self.store = store
        self.index = PrefixIndex(self._all_ids())
        self._listeners: list[Callable[[list[bytes], bytes | None], None]] = []

    def _all_ids(self) -> Iterable[bytes]:
        lo = b""
        while True:
            ids = self.store.ids_in_range(lo, None, INDEX_LOAD_BATCH)
            yield from ids
            if len(ids) < INDEX_LOAD_BATCH:
                return
            lo = ids[-1] + b"\x00"

    def on_added(self, listener: Callable[[list[bytes], bytes | None], None]) -> None:
        """`listener(ids, source)` hears of every added entry; source is the peer that sent them (None: local)."""
        self._listeners.append(listener)

    def append(self, items: Iterable, source: bytes | None = None) -> AppendResult:
        result = self.store.append(items)
        self._added(result.added, source)
        return result

    def append_local(self, signer, kind: str, body, now: int):
        entry = self.store.append_local(signer, kind, body, now)
        self._added([entry.id])
        return entry

    def _added(self, ids, source: bytes | None = None) -> None:
        if not ids:
            return
        self.index.add(ids)
        for listener in self._listeners:
            listener(list(ids), source)

    def ids_under(self, prefix: str) -> list[bytes]:
        lo, hi = reconcile.prefix_bounds(prefix)
        return self.store.ids_in_range(lo, hi, limit=1 << 30)

    def raw_for_peer(self, ids: Iterable[bytes], max_bytes: int) -> list[bytes]:
        """The stored bytes of `ids` we have, dependencies first (run publications, then each author's
        chain by seq), cut at `max_bytes`."""
        rows = []
        for entry_id in ids:
            raw = self.store.get_raw(entry_id)
            if raw is not None:
                entry = Entry.from_wire(raw)
                rows.append(((entry.kind != "run.publish", entry.author, entry.seq), raw))
        rows.sort(key=lambda row: row[0])
        out, size = [], 0
        for _key, raw in rows:
            if size + len(raw) > max_bytes:
                break
            out.append(raw)
            size += len(raw)
        return out
