"""Set reconciliation between two replicas, in process (no network): exact differences, cost ~ difference."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import InvalidMessage
from p2pcompute.ledger import reconcile
from p2pcompute.ledger.reconcile import Answer, PrefixIndex, prefix_bounds


class IdSet:
    """A replica's id set for reconciliation tests: a sorted list and its prefix index."""

    def __init__(self, ids):
        self.ids = sorted(set(ids))
        self.index = PrefixIndex(self.ids)

    def ids_under(self, prefix: str) -> list[bytes]:
        lo, hi = prefix_bounds(prefix)
        return [i for i in self.ids if i >= lo and (hi is None or i < hi)]


def run_reconcile(a: IdSet, b: IdSet):
    async def ask(batch):
        return reconcile.answer(b.index, b.ids_under, batch)

    return asyncio.run(reconcile.reconcile(a.index, a.ids_under, ask))


def random_ids(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


@settings(max_examples=40, deadline=None)
@given(common=st.integers(0, 300), only_a=st.integers(0, 40), only_b=st.integers(0, 40), seed=st.integers(0, 2**32))
def test_reconcile_finds_exact_differences(common, only_a, only_b, seed):
    import random

    rng = random.Random(seed)
    ids = [rng.randbytes(32) for _ in range(common + only_a + only_b)]
    shared, a_only, b_only = ids[:common], ids[common:common + only_a], ids[common + only_a:]
    a, b = IdSet(shared + a_only), IdSet(shared + b_only)
    diff = run_reconcile(a, b)
    assert diff.missing_here == set(b_only)
    assert diff.missing_there == set(a_only)
    if not a_only and not b_only:
        assert diff.rounds == 1


def test_cost_grows_with_difference_not_size():
    common = random_ids(20_000)
    extra = random_ids(10)
    small = run_reconcile(IdSet(common), IdSet(common + extra))
    assert small.missing_here == set(extra)
    assert small.rounds <= reconcile.MAX_DEPTH + 1
    # prefixes exchanged: at most 16 children per differing prefix per level
    assert small.prefixes_sent <= 1 + 16 * len(extra) * reconcile.MAX_DEPTH
    equal = run_reconcile(IdSet(common), IdSet(common))
    assert equal.rounds == 1 and equal.prefixes_sent == 1 and not equal.missing_here


def test_prefix_bounds():
    assert prefix_bounds("") == (bytes(32), None)
    lo, hi = prefix_bounds("a")
    assert lo == bytes([0xA0]) + bytes(31) and hi == bytes([0xB0]) + bytes(31)
    lo, hi = prefix_bounds("abc")
    assert lo == bytes([0xAB, 0xC0]) + bytes(30) and hi == bytes([0xAB, 0xD0]) + bytes(30)
    assert prefix_bounds("ffff")[1] is None
    for bad in ("g", "abcde", 5, "A"):
        with pytest.raises(InvalidMessage):
            reconcile.check_prefix(bad)


def test_lying_responder_is_caught():
    a = IdSet(random_ids(100))

    async def out_of_range(batch):
        return [Answer(batch[0][0], ids=[b"\xff" * 32, b"\x00" * 32])] if batch[0][0] else [
            Answer("", children=[(5, bytes(16))] * 16)]

    async def unasked(batch):
        return [Answer("0123", ids=[])]

    async def too_deep(batch):
        return [Answer(p, children=[(99, bytes(16))] * 16) for p, _, _ in batch]

    for liar in (unasked, too_deep):
        with pytest.raises(InvalidMessage):
            asyncio.run(reconcile.reconcile(a.index, a.ids_under, liar))
    with pytest.raises(InvalidMessage):
        asyncio.run(reconcile.reconcile(a.index, a.ids_under, out_of_range))
