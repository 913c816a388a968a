"""Entries held back until what they name arrives (sync may deliver out of order): a bounded in-memory pool."""

from __future__ import annotations

from collections import OrderedDict

from p2pcompute.ledger.codec import Entry

# Range-based sync sends entries in id order, not chain order, so a replica catching up may hold a
# few thousand entries whose predecessors are in a later message. 10k entries / 16 MiB bounds what a
# peer can make us keep in memory; past that the oldest are dropped and come back on a later sync.
MAX_PENDING_ENTRIES = 10_000
MAX_PENDING_BYTES = 16 * 1024 * 1024


class PendingPool:
    """Signature-checked entries whose previous entry or run is missing, indexed by what they wait for.

    Not durable and never acknowledged: after a restart the entries come back by sync.
    """

    def __init__(self, max_entries: int = MAX_PENDING_ENTRIES, max_bytes: int = MAX_PENDING_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[Entry, tuple]] = OrderedDict()
        self._waiting: dict[tuple, dict[bytes, Entry]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: bytes) -> bool:
        return entry_id in self._entries

    def waiting_on(self, key: tuple) -> list[Entry]:
        """The entries waiting for `key`, oldest first (the pool is left unchanged)."""
        return list(self._waiting.get(key, {}).values())

    def missing(self) -> list[tuple]:
        """Every dependency key some pending entry waits for (what a sync could ask a peer for)."""
        return list(self._waiting)

    def add(self, entry: Entry, key: tuple) -> list[bytes]:
        """Hold `entry` until `key` is satisfied; return the ids evicted to stay within the limits."""
        if entry.id in self._entries:
            self.remove([entry.id])
        self._entries[entry.id] = (entry, key)
        self._waiting.setdefault(key, {})[entry.id] = entry
        self._bytes += len(entry.wire)
        evicted = []
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self.remove([oldest])
            evicted.append(oldest)
        return evicted

    def remove(self, entry_ids) -> None:
        for entry_id in entry_ids:
            item = self._entries.pop(entry_id, None)
            if item is None:
                continue
            entry, key = item
            self._bytes -= len(entry.wire)
            waiters = self._waiting[key]
            del waiters[entry_id]
            if not waiters:
                del self._waiting[key]
