"""Validation rules through a real store: chains, receipts against run policies, out-of-order delivery,
all-or-nothing batches, equivocation verdicts that do not depend on arrival order."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcompute import crypto
from p2pcompute.credits.claims import Claim, Receipt
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.errors import InvalidEntry, MissingDependency
from p2pcompute.ledger.codec import KIND_RECEIPT, KIND_RUN_PUBLISH, ReceiptBody, RunPublish, sign_entry
from p2pcompute.ledger.examples import ChainBuilder, receipt_body, seed_key
from p2pcompute.ledger.pending import PendingPool
from p2pcompute.ledger.derived import INT64_MAX
from p2pcompute.ledger.store import Store

PUB, C1, C2, C3, W1, W2, W3 = (seed_key(b) for b in range(1, 8))
T0 = 1_700_000_000_000
POLICY = CreditPolicy.create(rate=1000, quorum=2)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "ledger.sqlite") as s:
        yield s


def test_receipts_credit_samples_times_rate(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, b"manifest", POLICY, T0)
    receipts = [chains.receipt(c, run, epoch, 100 + epoch, [W1, W2], T0 + epoch) for epoch in range(3) for c in (C1, C2)]
    result = store.append([run] + receipts)
    assert set(result.added) == {e.id for e in [run] + receipts}
    assert store.balance(C1.public_key).credits == 1000 * (100 + 101 + 102)
    assert store.balance(C1.public_key).receipts == 3
    [summary] = store.runs()
    assert (summary.receipts, summary.samples, summary.credits) == (6, 2 * 303, 2 * 303_000)
    assert [b.peer for b in store.top()] == sorted([C1.public_key, C2.public_key])
    assert store.check_derived() == []


def test_receipt_policy_rules(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, b"manifest", POLICY, T0)
    vouched = chains.publish(PUB, b"vouched", CreditPolicy.create(10, 1, [W3.public_key]), T0)
    store.append([run, vouched])
    with pytest.raises(InvalidEntry, match="quorum is 2"):
        store.append([ChainBuilder().receipt(C1, run, 0, 5, [W1], T0)])
    with pytest.raises(InvalidEntry, match="validators"):
        store.append([ChainBuilder().receipt(C1, vouched, 0, 5, [W1, W2], T0)])
    body = receipt_body(C1, run, 0, 5, [W1, W2])
    with pytest.raises(InvalidEntry, match="amount 5001 is not samples 5 x rate 1000"):
        store.append([ChainBuilder().entry(C1, KIND_RECEIPT, ReceiptBody(body.receipt, 5001), T0)])
    store.append([ChainBuilder().receipt(C1, vouched, 0, 5, [W3], T0)])
    assert store.balance(C1.public_key).credits == 50


def test_one_receipt_per_run_epoch_and_peer(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, b"manifest", POLICY, T0)
    other = ChainBuilder().publish(W3, b"manifest", POLICY, T0)  # same manifest, another publisher: another run
    first = chains.receipt(C1, run, 4, 10, [W1, W2], T0)
    store.append([run, other, first])
    with pytest.raises(InvalidEntry, match="epoch 4 is already at seq 0"):
        store.append([chains.receipt(C1, run, 4, 11, [W1, W2], T0)])
    chains.heads[C1.public_key] = (0, first.id)
    store.append([chains.receipt(C1, other, 4, 10, [W1, W2], T0), chains.receipt(C1, run, 5, 10, [W1, W2], T0)])
    assert store.balance(C1.public_key).receipts == 3


def test_a_run_is_published_once_per_chain(store):
    chains = ChainBuilder()
    store.append([chains.publish(PUB, b"manifest", POLICY, T0)])
    with pytest.raises(InvalidEntry, match="already published by this author at seq 0"):
        store.append([chains.publish(PUB, b"manifest", CreditPolicy(1, 1), T0)])


def test_chain_linkage_and_timestamps(store):
    chains = ChainBuilder()
    a0 = chains.publish(PUB, b"a", POLICY, T0)
    b0 = ChainBuilder().publish(C1, b"b", POLICY, T0)
    store.append([a0, b0])
    body = RunPublish.create(b"c", POLICY)
    with pytest.raises(InvalidEntry, match="not seq 0 of the same author"):
        store.append([sign_entry(PUB, 1, b0.id, T0, KIND_RUN_PUBLISH, body)])
    with pytest.raises(InvalidEntry, match="not seq 1 of the same author"):
        store.append([sign_entry(PUB, 2, a0.id, T0, KIND_RUN_PUBLISH, body)])
    with pytest.raises(InvalidEntry, match="before the previous entry"):
        store.append([sign_entry(PUB, 1, a0.id, T0 - 1, KIND_RUN_PUBLISH, body)])
    store.append([sign_entry(PUB, 1, a0.id, T0, KIND_RUN_PUBLISH, body)])


def test_a_bad_entry_rejects_the_whole_batch(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, b"manifest", POLICY, T0)
    good = chains.receipt(C1, run, 0, 10, [W1, W2], T0)
    forged = bytearray(chains.receipt(C2, run, 0, 10, [W1, W2], T0).wire)
    forged[-1] ^= 1
    with pytest.raises(InvalidEntry, match="signature"):
        store.append([run, good, bytes(forged)])
    assert store.count() == 0 and store.top() == [] and len(store.pending) == 0
    with pytest.raises(InvalidEntry, match="entry #1 of the batch"):
        store.append([run, b"\x93junk"])
    assert store.count() == 0


def test_out_of_order_delivery_completes_through_the_pending_pool(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, b"manifest", POLICY, T0)
    receipts = [chains.receipt(C1, run, epoch, 10, [W1, W2], T0 + epoch) for epoch in range(6)]
    late = store.append(receipts[3:][::-1])
    assert late.added == () and set(late.pending) == {e.id for e in receipts[3:]}
    assert set(store.pending.missing()) == {("entry", receipts[2].id), ("entry", receipts[3].id), ("entry", receipts[4].id)}
    early = store.append(receipts[:3])  # the run is still missing: receipts wait for it
    assert early.added == () and len(store.pending) == 6
    done = store.append([run])
    assert done.added == (run.id, *(e.id for e in receipts))
    assert len(store.pending) == 0 and store.balance(C1.public_key).receipts == 6
    assert store.append(receipts).duplicates == tuple(e.id for e in receipts)


def test_local_appends_never_wait(store):
    run = ChainBuilder().publish(PUB, b"manifest", POLICY, T0)
    with pytest.raises(MissingDependency) as err:
        store.append_local(C1, KIND_RECEIPT, receipt_body(C1, run, 0, 10, [W1, W2]), T0)
    assert err.value.key == ("run", PUB.public_key, run.body.run_id)
    assert store.count() == 0 and len(store.pending) == 0
    published = store.append_local(PUB, KIND_RUN_PUBLISH, run.body, T0)
    assert published == run
    entry = store.append_local(C1, KIND_RECEIPT, receipt_body(C1, run, 0, 10, [W1, W2]), T0)
    second = store.append_local(C1, KIND_RECEIPT, receipt_body(C1, run, 1, 10, [W1, W2]), T0 - 5)
    assert (second.seq, second.prev, second.timestamp) == (1, entry.id, T0)  # the clock went back: clamped


def test_pending_pool_is_bounded_and_drops_what_turns_out_invalid(store):
    store.pending = PendingPool(max_entries=3)
    chains = ChainBuilder()
    run = chains.publish(PUB, b"manifest", POLICY, T0)
    orphans = [ChainBuilder().receipt(c, run, 0, 10, [W1, W2], T0) for c in (C1, C2, C3, W3)]
    result = store.append(orphans)
    assert len(result.pending) == 4 and len(store.pending) == 3
    assert orphans[0].id not in store.pending  # the oldest was evicted
    # a receipt that waits for its run and then fails the run's policy: dropped, the batch still succeeds
    strict_run = ChainBuilder().publish(W1, b"strict", CreditPolicy(10, 3), T0)
    weak = ChainBuilder().receipt(C1, strict_run, 0, 10, [W2, W3], T0)
    assert store.append([weak]).pending == (weak.id,)
    result = store.append([strict_run])
    assert result.added == (strict_run.id,)
    assert [d[0] for d in result.dropped] == [weak.id] and "quorum is 3" in result.dropped[0][1]


# ---- equivocation -------------------------------------------------------------------------------------


def fork_of(entry, signer, body, timestamp=T0 + 99):
    """A second entry at `entry`'s seq, on the same predecessor."""
    return sign_entry(signer, entry.seq, entry.prev, timestamp, entry.kind, body)


def test_equivocation_keeps_both_marks_the_author_and_counts_only_below_the_fork(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, b"manifest", POLICY, T0)
    r = [chains.receipt(C1, run, epoch, 10, [W1, W2], T0 + epoch) for epoch in range(4)]
    store.append([run, *r])
    assert store.balance(C1.public_key).receipts == 4
    twin = fork_of(r[2], C1, receipt_body(C1, run, 2, 999, [W1, W2]))
    result = store.append([twin])
    assert result.added == (twin.id,) and result.equivocators == (C1.public_key,)
    assert store.has(r[2].id) and store.has(twin.id)
    assert store.head(C1.public_key).fork_seq == 2
    assert store.balance(C1.public_key).receipts == 2  # seq 0 and 1 only
    # both forks stay extendable (and count for nothing); the same (run, epoch) may repeat across forks
    on_twin = sign_entry(C1, 3, twin.id, T0 + 100, KIND_RECEIPT, receipt_body(C1, run, 3, 10, [W1, W2]))
    store.append([on_twin])
    with pytest.raises(InvalidEntry, match="epoch 2 is already at seq 2"):
        store.append([sign_entry(C1, 4, on_twin.id, T0 + 100, KIND_RECEIPT, receipt_body(C1, run, 2, 1, [W1, W2]))])
    # an earlier fork point found later lowers the verdict
    store.append([fork_of(r[0], C1, receipt_body(C1, run, 0, 1, [W1, W2]))])
    assert store.head(C1.public_key).fork_seq == 0 and store.balance(C1.public_key).receipts == 0
    assert store.check_derived() == []
    assert [h.author for h in store.equivocators()] == [C1.public_key]


def test_a_publisher_equivocating_voids_runs_published_from_the_fork_on(store):
    chains = ChainBuilder()
    before = chains.publish(PUB, b"before", POLICY, T0)
    after = chains.publish(PUB, b"after", POLICY, T0)
    work = [ChainBuilder().receipt(C1, before, 0, 10, [W1, W2], T0), ChainBuilder().receipt(C2, after, 0, 10, [W1, W2], T0)]
    store.append([before, after, *work])
    assert store.balance(C2.public_key).receipts == 1
    store.append([fork_of(after, PUB, RunPublish.create(b"other", POLICY))])
    counted = {s.run_id: s.counted for s in store.runs()}
    assert counted[before.body.run_id] and not counted[after.body.run_id]
    assert store.balance(C1.public_key).receipts == 1 and store.balance(C2.public_key).receipts == 0
    assert store.check_derived() == []


def _scenario() -> list:
    """Entries with two equivocators (a claimant and a publisher) and honest peers."""
    chains = ChainBuilder()
    run_a = chains.publish(PUB, b"a", POLICY, T0)
    run_b = chains.publish(PUB, b"b", POLICY, T0 + 1)
    out = [run_a, run_b]
    for epoch in range(3):
        out += [chains.receipt(c, run, epoch, 10 + epoch, [W1, W2], T0 + epoch) for c in (C1, C2) for run in (run_a, run_b)]
    out.append(fork_of(run_b, PUB, RunPublish.create(b"b2", POLICY)))
    c1_seq2 = next(e for e in out if e.author == C1.public_key and e.seq == 2)
    out.append(fork_of(c1_seq2, C1, receipt_body(C1, run_a, 1, 77, [W1, W3])))
    out.append(ChainBuilder().receipt(C3, run_a, 0, 5, [W2, W3], T0))
    return out


SCENARIO = _scenario()


def _fingerprint(store: Store):
    return (
        sorted(store.ids_in_range(b"", None, 10_000)),
        store.top(100),
        [(s.run_id, s.entry_id, s.counted, s.credits, s.samples, s.receipts) for s in store.runs()],
        store.heads(),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(1, 6))
def test_every_arrival_order_reaches_the_same_verdict(rng: random.Random, batches: int):
    entries = list(SCENARIO)
    rng.shuffle(entries)
    cuts = sorted(rng.sample(range(1, len(entries)), batches - 1))
    with tempfile.TemporaryDirectory() as tmp:
        with Store(Path(tmp) / "in-order.sqlite") as reference, Store(Path(tmp) / "shuffled.sqlite") as shuffled:
            reference.append(SCENARIO)
            for lo, hi in zip([0] + cuts, cuts + [len(entries)]):
                shuffled.append(entries[lo:hi])
            assert len(shuffled.pending) == 0
            assert _fingerprint(shuffled) == _fingerprint(reference)
            assert shuffled.check_derived() == [] and reference.check_derived() == []
            assert {h.author for h in shuffled.equivocators()} == {PUB.public_key, C1.public_key}


def test_balances_saturate_instead_of_overflowing(store):
    rate = 10**12
    policy = CreditPolicy(rate, 1)
    chains = ChainBuilder()
    run = chains.publish(PUB, b"expensive", policy, T0)
    samples = (2**63 - 1) // rate  # the largest claim whose amount fits
    receipts = [chains.receipt(C1, run, epoch, samples, [W1], T0) for epoch in range(3)]
    store.append([run, *receipts])
    assert store.balance(C1.public_key).credits == INT64_MAX
    assert store.check_derived() == []
    store.rebuild_derived()
    assert store.balance(C1.public_key).credits == INT64_MAX
    # one sample more and samples x rate no longer fits: no amount can be right
    claim = Claim(run.body.run_id, PUB.public_key, 9, C1.public_key, samples + 1)
    receipt = Receipt.assemble(claim.sign(C1), [claim.witness(W1)])
    with pytest.raises(InvalidEntry, match="amount"):
        store.append([chains.entry(C1, KIND_RECEIPT, ReceiptBody(receipt, 2**63 - 1), T0)])


def test_digest_of_manifest_is_the_run_id():
    body = RunPublish.create(b"manifest", POLICY)
    assert body.run_id == crypto.digest(b"manifest")
