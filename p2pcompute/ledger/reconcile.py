"""Range-based set reconciliation of entry ids: per-prefix fingerprints kept in memory, and the walk that
finds which ids each of two replicas lacks (transport-free; sync.py carries it over libp2p)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Awaitable, Callable, Iterable

from p2pcompute.errors import InvalidMessage

MAX_DEPTH = 4  # nibbles: 16 + 256 + 4096 + 65536 buckets; ~15 ids per deepest bucket at 1M entries
LEAF_IDS = 32  # a responder holding at most this many ids under a prefix sends them instead of children
FINGERPRINT_SIZE = 16  # bytes of the XOR kept in a fingerprint
MAX_PREFIXES_PER_REQUEST = 4096  # bounds one reconcile request (~100 KB) and its answer (~1.3 MB)
ID_SIZE = 32
_HEX = "0123456789abcdef"
_FP_MASK = (1 << (8 * FINGERPRINT_SIZE)) - 1

Fingerprint = tuple[int, bytes]  # (count, last 16 bytes of the XOR of the ids)


def check_prefix(prefix) -> str:
    if not isinstance(prefix, str) or len(prefix) > MAX_DEPTH or any(c not in _HEX for c in prefix):
        raise InvalidMessage(f"bad reconcile prefix {prefix!r}")
    return prefix


def prefix_bounds(prefix: str) -> tuple[bytes, bytes | None]:
    """The id range [lo, hi) covered by a nibble prefix (hi None: up to the end of the id space)."""
    if not prefix:
        return b"\x00" * ID_SIZE, None
    shift = 4 * (2 * ID_SIZE - len(prefix))
    value = int(prefix, 16)
    lo = (value << shift).to_bytes(ID_SIZE, "big")
    if value + 1 == 16 ** len(prefix):
        return lo, None
    return lo, ((value + 1) << shift).to_bytes(ID_SIZE, "big")


class PrefixIndex:
    """Count and XOR of the ids under every hex prefix of 0..MAX_DEPTH nibbles; O(depth) per added id."""

    def __init__(self, ids: Iterable[bytes] = ()):
        self._lock = threading.Lock()
        self._levels: list[dict[str, list[int]]] = [dict() for _ in range(MAX_DEPTH + 1)]
        self.add(ids)

    def add(self, ids: Iterable[bytes]) -> None:
        with self._lock:
            for entry_id in ids:
                value = int.from_bytes(entry_id, "big")
                hexid = entry_id[: (MAX_DEPTH + 1) // 2].hex()
                for depth, level in enumerate(self._levels):
                    bucket = level.get(hexid[:depth])
                    if bucket is None:
                        level[hexid[:depth]] = [1, value]
                    else:
                        bucket[0] += 1
                        bucket[1] ^= value

    def fingerprint(self, prefix: str) -> Fingerprint:
        bucket = self._levels[len(prefix)].get(prefix)
        if bucket is None:
            return 0, bytes(FINGERPRINT_SIZE)
        return bucket[0], (bucket[1] & _FP_MASK).to_bytes(FINGERPRINT_SIZE, "big")

    def count(self, prefix: str = "") -> int:
        return self.fingerprint(prefix)[0]


@dataclasses.dataclass
class Answer:
    """What a responder says about one prefix whose fingerprint differs from the asker's."""

    prefix: str
    children: list[Fingerprint] | None = None  # 16 child fingerprints, or
    ids: list[bytes] | None = None  # every id the responder has under the prefix


def answer(index: PrefixIndex, ids_under: Callable[[str], list[bytes]], asked: list[tuple[str, int, bytes]]
           ) -> list[Answer]:
    """Responder side: for each asked prefix that differs, its children or (small/deep) its ids."""
    out = []
    for prefix, count, fingerprint in asked:
        mine = index.fingerprint(prefix)
        if mine == (count, fingerprint):
            continue
        if mine[0] <= LEAF_IDS or len(prefix) == MAX_DEPTH:
            out.append(Answer(prefix, ids=ids_under(prefix)))
        else:
            out.append(Answer(prefix, children=[index.fingerprint(prefix + c) for c in _HEX]))
    return out


@dataclasses.dataclass
class Difference:
    missing_here: set[bytes] = dataclasses.field(default_factory=set)  # ids the peer has and we lack
    missing_there: set[bytes] = dataclasses.field(default_factory=set)  # ids we have and the peer lacks
    rounds: int = 0
    prefixes_sent: int = 0


async def reconcile(index: PrefixIndex, ids_under: Callable[[str], list[bytes]],
                    ask: Callable[[list[tuple[str, int, bytes]]], Awaitable[list[Answer]]]) -> Difference:
    """Client side: walk the prefix tree with a peer (via `ask`) down to where the two sets differ."""
    diff = Difference()
    frontier = [("", *index.fingerprint(""))]
    while frontier:
        batch, frontier = frontier[:MAX_PREFIXES_PER_REQUEST], frontier[MAX_PREFIXES_PER_REQUEST:]
        asked = {p for p, _, _ in batch}
        diff.rounds += 1
        diff.prefixes_sent += len(batch)
        for ans in await ask(batch):
            if ans.prefix not in asked:
                raise InvalidMessage(f"peer answered about prefix {ans.prefix!r} it was not asked about")
            if ans.ids is not None:
                lo, hi = prefix_bounds(ans.prefix)
                theirs = set()
                for entry_id in ans.ids:
                    if not (isinstance(entry_id, bytes) and len(entry_id) == ID_SIZE and lo <= entry_id
                            and (hi is None or entry_id < hi)):
                        raise InvalidMessage(f"peer sent an id outside prefix {ans.prefix!r}")
                    theirs.add(entry_id)
                mine = set(ids_under(ans.prefix))
                diff.missing_here |= theirs - mine
                diff.missing_there |= mine - theirs
            else:
                if len(ans.children) != 16 or len(ans.prefix) >= MAX_DEPTH:
                    raise InvalidMessage("peer sent children that cannot exist (not 16, or below the deepest level)")
                for c, theirs in zip(_HEX, ans.children):
                    child = ans.prefix + c
                    mine = index.fingerprint(child)
                    if mine == theirs:
                        continue
                    if theirs[0] == 0:  # the peer has nothing here: all of ours are missing there
                        diff.missing_there |= set(ids_under(child))
                    else:
                        frontier.append((child, *mine))
    return diff
