"""Validation rules through a real store: chains, payouts against run policies (the epoch's issuer, max_epochs,
epoch cap, budget, one payout per (peer, epoch)), out-of-order delivery, all-or-nothing batches, equivocation
verdicts that do not depend on arrival order."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcompute import canonical, crypto
from p2pcompute.credits.claims import Claim, Receipt
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.errors import InvalidEntry, MissingDependency
from p2pcompute.ledger.codec import (
    ENTRY_DOMAIN,
    GENESIS_PREV,
    KIND_PAYOUT,
    KIND_RUN_PUBLISH,
    PayoutBody,
    RunPublish,
    policy_of,
    sign_entry,
)
from p2pcompute.ledger.derived import INT64_MAX
from p2pcompute.ledger.examples import ChainBuilder, example_manifest, payout_body, seed_key
from p2pcompute.ledger.pending import PendingPool
from p2pcompute.ledger.store import Store
from p2pcompute.runs.manifest import Manifest

PUB, C1, C2, C3, W1, W2, W3, I1, I2 = (seed_key(b) for b in range(1, 10))
SIGNERS = {k.public_key: k for k in (PUB, C1, C2, C3, W1, W2, W3, I1, I2)}
T0 = 1_700_000_000_000
# rate 1000, quorum 2, paid by its publisher; epoch cap 512 x 1.5 = 768 samples
MANIFEST = example_manifest("validate", rate=1000, quorum=2, issuers=[PUB])


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "ledger.sqlite") as s:
        yield s


def issuer_of(run, epoch: int):
    """The signer that pays `epoch` of `run` (a run.publish entry)."""
    return SIGNERS[run.body.policy.issuer_for(epoch)]


def epoch_paid_by(run, issuer, start: int = 0) -> int:
    """The first epoch >= start that `issuer` pays in `run`."""
    return next(e for e in range(start, start + 64) if run.body.policy.issuer_for(e) == issuer.public_key)


def refuse(store: Store, chains: ChainBuilder, entry, match: str) -> None:
    """`entry` is refused naming `match`; `chains` forgets it (the author's next entry takes its seq)."""
    with pytest.raises(InvalidEntry, match=match):
        store.append([entry])
    if entry.seq:
        chains.heads[entry.author] = (entry.seq - 1, entry.prev)
    else:
        chains.heads.pop(entry.author)


def test_payouts_credit_samples_times_rate_to_the_claimant(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, MANIFEST, T0)
    payouts = [chains.payout(PUB, c, run, epoch, 100 + epoch, [W1, W2], T0 + epoch) for epoch in range(3) for c in (C1, C2)]
    result = store.append([run] + payouts)
    assert set(result.added) == {e.id for e in [run] + payouts}
    assert store.balance(C1.public_key).credits == 1000 * (100 + 101 + 102)
    assert store.balance(C1.public_key).receipts == 3
    assert store.balance(PUB.public_key).receipts == 0  # the issuer signs, the claimant is paid
    [summary] = store.runs()
    assert (summary.receipts, summary.samples, summary.credits) == (6, 2 * 303, 2 * 303_000)
    assert [b.peer for b in store.top()] == sorted([C1.public_key, C2.public_key])
    assert store.check_derived() == []


def test_payout_policy_rules(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, MANIFEST, T0)
    store.append([run])
    refuse(store, chains, chains.payout(PUB, C1, run, 0, 5, [W1], T0), "quorum is 2")
    body = payout_body(C1, run, 0, 5, [W1, W2])
    refuse(store, chains, chains.entry(PUB, KIND_PAYOUT, PayoutBody(body.receipt, 5001), T0),
           "amount 5001 is not a whole number of samples, 1 to 5, x rate 1000")
    refuse(store, chains, chains.entry(PUB, KIND_PAYOUT, PayoutBody(body.receipt, 4000), T0),  # under the cap: all
           r"must pay 5 of its 5 samples .* = 5000 micro-credits, not 4000")
    # the claimant paying itself (the old self-signed receipt) is refused: only the issuer pays
    refuse(store, chains, chains.payout(C1, C1, run, 0, 5, [W1, W2], T0), "not signed by the run's issuer for that epoch")
    store.append([chains.payout(PUB, C1, run, 0, 5, [W1, W2], T0)])
    assert store.balance(C1.public_key).credits == 5000


def test_only_the_epochs_issuer_pays_it(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, example_manifest("two-issuers", quorum=1, issuers=[I1, I2]), T0)
    assert run.body.policy.issuers == tuple(sorted([I1.public_key, I2.public_key]))
    store.append([run])
    first, second = (SIGNERS[k] for k in run.body.policy.issuers)  # epoch e is paid by issuers[e % 2]
    for epoch, wrong in ((0, second), (1, first), (2, PUB), (3, W1)):  # the other issuer, the publisher, a witness
        refuse(store, chains, chains.payout(wrong, C1, run, epoch, 10, [W1], T0),
               f"payout for epoch {epoch} is not signed by the run's issuer for that epoch")
    store.append([chains.payout(first, C1, run, 0, 10, [W1], T0), chains.payout(second, C1, run, 1, 10, [W1], T0)])
    assert store.balance(C1.public_key).receipts == 2 and store.check_derived() == []


def test_epochs_at_or_past_max_epochs_are_never_paid(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, example_manifest("bounded", quorum=1, issuers=[PUB], max_epochs=10), T0)
    store.append([run])
    for epoch in (10, 11, 2**62):
        refuse(store, chains, chains.payout(PUB, C1, run, epoch, 10, [W1], T0),
               rf"epoch {epoch} is past the run's max_epochs \(10\)")
    store.append([chains.payout(PUB, C1, run, 9, 10, [W1], T0)])
    assert store.balance(C1.public_key).receipts == 1


def test_an_epoch_pays_at_most_its_cap_alone_and_in_total(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, MANIFEST, T0)
    assert run.body.policy.epoch_cap == 768  # target_batch_size 512 + 50% slack
    store.append([run])
    refuse(store, chains, chains.payout(PUB, C1, run, 0, 769, [W1, W2], T0),
           r"769 samples are more than one epoch of the run pays \(768\)")
    store.append([chains.payout(PUB, C1, run, 0, 500, [W1, W2], T0)])
    # the payout that reaches the cap pays what is left of it (before: refused whole, the volunteer got nothing)
    refuse(store, chains, chains.payout(PUB, C2, run, 0, 300, [W1, W2], T0),
           r"must pay 268 of its 300 samples \(what is left under the epoch's cap of 768\) x rate 1000 = 268000")
    cut = payout_body(C2, run, 0, 300, [W1, W2])
    store.append([chains.entry(PUB, KIND_PAYOUT, PayoutBody(cut.receipt, 268_000), T0)])
    assert store.balance(C2.public_key).credits == 268_000
    refuse(store, chains, chains.payout(PUB, C3, run, 0, 1, [W1, W2], T0), "epoch 0 would pay 801 samples, over its cap of 768")
    store.append([chains.payout(PUB, C3, run, 1, 768, [W1, W2], T0)])  # another epoch has its own cap
    # credits count what was paid; samples what the paid claims trained (the cut payout's 32 unpaid ones too)
    assert (store.runs()[0].credits, store.runs()[0].samples) == (768 * 2 * 1000, 768 * 2 + 32)


def test_the_issuer_pays_the_rest_of_an_epochs_cap(store):
    """services/issuer.py: the issuer's payout that reaches an epoch's cap is cut to what is left of it, decided in its
    own append (NAT test, 2026-12-02: the last claimant of an epoch that overshot was refused whole, retrying for 10
    minutes); a claim once the cap is reached is refused."""
    from p2pcompute.errors import InvalidMessage
    from p2pcompute.ledger.replica import Replica
    from p2pcompute.services.issuer import Issuer

    run = ChainBuilder().publish(PUB, MANIFEST, T0)
    store.append([run])
    issuer = Issuer(Replica(store), PUB)
    issuer.saw(run.body.run_id, 0, [W1.public_key, W2.public_key])  # the witnesses took part in its rounds

    def pay(claimant, samples: int) -> int:
        return store.get(issuer.pay(payout_body(claimant, run, 0, samples, [W1, W2]).receipt)).body.amount

    assert pay(C1, 500) == 500_000
    assert pay(C2, 300) == 268_000  # 268 of the cap's 768 were left
    with pytest.raises(InvalidMessage, match="over its cap of 768"):
        pay(C3, 1)
    assert store.check_derived() == [] and store.balance(C2.public_key).credits == 268_000


def test_one_payout_per_peer_and_epoch(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, MANIFEST, T0)
    first = chains.payout(PUB, C1, run, 4, 10, [W1, W2], T0)
    store.append([run, first])
    refuse(store, chains, chains.payout(PUB, C1, run, 4, 11, [W1, W2], T0),
           "epoch 4 of run [0-9a-f]{16} was already paid to this peer")
    store.append([chains.payout(PUB, C2, run, 4, 10, [W1, W2], T0), chains.payout(PUB, C1, run, 5, 10, [W1, W2], T0)])
    assert store.balance(C1.public_key).receipts == 2


def test_two_publications_of_one_manifest_share_one_policy_and_pay_each_epoch_once(store):
    chains = ChainBuilder()
    mine = chains.publish(PUB, MANIFEST, T0)
    theirs = chains.publish(W3, MANIFEST, T0)  # anyone may republish a manifest: it is the same run
    assert mine.body.run_id == theirs.body.run_id and mine.body.policy == theirs.body.policy
    first = chains.payout(PUB, C1, mine, 4, 10, [W1, W2], T0)
    store.append([mine, theirs, first])
    # the claim names the other publication: still the same (peer, run, epoch), still in the issuer's chain
    refuse(store, chains, chains.payout(PUB, C1, theirs, 4, 10, [W1, W2], T0),
           "epoch 4 of run [0-9a-f]{16} was already paid to this peer")
    # and the other publisher is not an issuer of the run: it cannot pay the epoch again
    refuse(store, chains, chains.payout(W3, C1, theirs, 4, 10, [W1, W2], T0), "not signed by the run's issuer")
    store.append([chains.payout(PUB, C1, theirs, 5, 10, [W1, W2], T0)])
    assert store.balance(C1.public_key).receipts == 2
    assert [s.receipts for s in store.runs()] == [2, 2]  # one run, listed once per publication


def test_an_issuer_pays_at_most_its_share_of_the_budget(store):
    chains = ChainBuilder()
    # 3 credits = 3,000 samples at 1000 micro-credits each, split between 2 issuers: 1,500 samples each
    run = chains.publish(PUB, example_manifest("budget", quorum=1, issuers=[I1, I2], budget=3), T0)
    assert run.body.policy.issuer_budget() == 1_500_000
    store.append([run])
    first, second = (SIGNERS[k] for k in run.body.policy.issuers)
    store.append([chains.payout(first, C1, run, 0, 700, [W1], T0), chains.payout(first, C1, run, 2, 700, [W1], T0)])
    refuse(store, chains, chains.payout(first, C2, run, 6, 101, [W1], T0),
           r"past its share of the run's budget \(1500000 micro-credits\)")
    store.append([chains.payout(first, C2, run, 4, 100, [W1], T0)])  # exactly the share
    store.append([chains.payout(second, C1, run, 1, 700, [W1], T0)])  # the other issuer has its own share
    assert store.balance(C1.public_key).credits == 2_100_000 and store.balance(C2.public_key).credits == 100_000


def test_a_publication_whose_policy_is_not_its_manifests_is_refused(store):
    manifest = Manifest.from_wire(MANIFEST)
    assert RunPublish.from_manifest(manifest).policy == policy_of(manifest)
    for policy in (CreditPolicy.create(1000, 2, [PUB.public_key]),  # the epoch cap left at its default
                   CreditPolicy.create(2000, 2, [PUB.public_key], epoch_cap=768),  # another rate
                   CreditPolicy.create(1000, 2, [W3.public_key], epoch_cap=768)):  # another issuer
        with pytest.raises(InvalidEntry, match="not the one the manifest implies"):
            store.append([sign_entry(PUB, 0, GENESIS_PREV, T0, KIND_RUN_PUBLISH, RunPublish.create(MANIFEST, policy))])
    junk = RunPublish.create(b"not a manifest", CreditPolicy(0, 1))
    with pytest.raises(InvalidEntry, match="the published manifest"):
        store.append([sign_entry(PUB, 0, GENESIS_PREV, T0, KIND_RUN_PUBLISH, junk)])
    # a paying run with no issuer cannot be published (the node fills in its own key: Manifest.with_default_issuer)
    unpaid = example_manifest("no-issuer", rate=1000)
    with pytest.raises(InvalidEntry, match="needs at least one issuer"):
        store.append([sign_entry(PUB, 0, GENESIS_PREV, T0, KIND_RUN_PUBLISH, RunPublish.create(unpaid, CreditPolicy(0, 1)))])
    assert store.count() == 0


def test_receipt_entries_are_refused(store):
    """The self-signed `receipt` of ledger v1, correctly signed by its claimant: no longer a valid kind."""
    run = ChainBuilder().publish(PUB, MANIFEST, T0)
    store.append([run])
    unsigned = [1, C1.public_key, 0, GENESIS_PREV, T0, "receipt", payout_body(C1, run, 0, 10, [W1, W2]).to_obj()]
    wire = canonical.pack(unsigned + [C1.sign(ENTRY_DOMAIN + canonical.pack(unsigned))])
    with pytest.raises(InvalidEntry, match="kind 'receipt' .* was replaced by 'payout'"):
        store.append([wire])
    assert store.count() == 1 and store.balance(C1.public_key).receipts == 0


def test_a_run_is_published_once_per_chain(store):
    chains = ChainBuilder()
    store.append([chains.publish(PUB, MANIFEST, T0)])
    with pytest.raises(InvalidEntry, match="already published by this author at seq 0"):
        store.append([chains.publish(PUB, MANIFEST, T0)])


def test_chain_linkage_and_timestamps(store):
    chains = ChainBuilder()
    a0 = chains.publish(PUB, example_manifest("a", issuers=[PUB]), T0)
    b0 = ChainBuilder().publish(C1, example_manifest("b", issuers=[C1]), T0)
    store.append([a0, b0])
    body = RunPublish.from_manifest(Manifest.from_wire(example_manifest("c", issuers=[PUB])))
    with pytest.raises(InvalidEntry, match="not seq 0 of the same author"):
        store.append([sign_entry(PUB, 1, b0.id, T0, KIND_RUN_PUBLISH, body)])
    with pytest.raises(InvalidEntry, match="not seq 1 of the same author"):
        store.append([sign_entry(PUB, 2, a0.id, T0, KIND_RUN_PUBLISH, body)])
    with pytest.raises(InvalidEntry, match="before the previous entry"):
        store.append([sign_entry(PUB, 1, a0.id, T0 - 1, KIND_RUN_PUBLISH, body)])
    store.append([sign_entry(PUB, 1, a0.id, T0, KIND_RUN_PUBLISH, body)])


def test_a_bad_entry_rejects_the_whole_batch(store):
    chains = ChainBuilder()
    run = chains.publish(PUB, MANIFEST, T0)
    good = chains.payout(PUB, C1, run, 0, 10, [W1, W2], T0)
    forged = bytearray(chains.payout(PUB, C2, run, 0, 10, [W1, W2], T0).wire)
    forged[-1] ^= 1
    with pytest.raises(InvalidEntry, match="signature"):
        store.append([run, good, bytes(forged)])
    assert store.count() == 0 and store.top() == [] and len(store.pending) == 0
    with pytest.raises(InvalidEntry, match="entry #1 of the batch"):
        store.append([run, b"\x93junk"])
    assert store.count() == 0


def test_out_of_order_delivery_completes_through_the_pending_pool(store):
    # paid by I1, published by PUB: I1's payouts wait for their predecessors and for the run
    run = ChainBuilder().publish(PUB, example_manifest("pending", quorum=2, issuers=[I1]), T0)
    chains = ChainBuilder()
    payouts = [chains.payout(I1, C1, run, epoch, 10, [W1, W2], T0 + epoch) for epoch in range(6)]
    late = store.append(payouts[3:][::-1])
    assert late.added == () and set(late.pending) == {e.id for e in payouts[3:]}
    assert set(store.pending.missing()) == {("entry", payouts[2].id), ("entry", payouts[3].id), ("entry", payouts[4].id)}
    early = store.append(payouts[:3])  # the run is still missing: the payouts wait for it
    assert early.added == () and len(store.pending) == 6
    assert ("run", run.body.run_id) in store.pending.missing()
    assert [e.id for e in store.pending.waiting_on(("run", run.body.run_id))] == [payouts[0].id]
    done = store.append([run])
    assert done.added == (run.id, *(e.id for e in payouts))
    assert len(store.pending) == 0 and store.balance(C1.public_key).receipts == 6
    assert store.append(payouts).duplicates == tuple(e.id for e in payouts)
    assert store.check_derived() == []


def test_a_payout_waits_for_any_publication_of_its_run(store):
    """The policy comes from the manifest: a payout naming one publication is completed by another one."""
    manifest = example_manifest("republished", quorum=1, issuers=[I1])
    named = ChainBuilder().publish(PUB, manifest, T0)
    other = ChainBuilder().publish(W3, manifest, T0)
    payout = ChainBuilder().payout(I1, C1, named, 0, 10, [W1], T0)
    assert store.append([payout]).pending == (payout.id,)
    assert store.append([other]).added == (other.id, payout.id)
    assert store.balance(C1.public_key).receipts == 1


def test_local_appends_never_wait(store):
    run = ChainBuilder().publish(PUB, MANIFEST, T0)
    with pytest.raises(MissingDependency) as err:
        store.append_local(PUB, KIND_PAYOUT, payout_body(C1, run, 0, 10, [W1, W2]), T0)
    assert err.value.key == ("run", run.body.run_id)
    assert store.count() == 0 and len(store.pending) == 0
    published = store.append_local(PUB, KIND_RUN_PUBLISH, run.body, T0)
    assert published == run
    entry = store.append_local(PUB, KIND_PAYOUT, payout_body(C1, run, 0, 10, [W1, W2]), T0)
    second = store.append_local(PUB, KIND_PAYOUT, payout_body(C1, run, 1, 10, [W1, W2]), T0 - 5)
    assert (second.seq, second.prev, second.timestamp) == (2, entry.id, T0)  # the clock went back: clamped
    with pytest.raises(InvalidEntry, match="already paid"):  # local appends are validated like any other
        store.append_local(PUB, KIND_PAYOUT, payout_body(C1, run, 1, 10, [W1, W2]), T0)


def test_pending_pool_is_bounded_and_drops_what_turns_out_invalid(store):
    store.pending = PendingPool(max_entries=3)
    run = ChainBuilder().publish(PUB, example_manifest("four-issuers", quorum=2, issuers=[C1, C2, C3, W3]), T0)
    # seq 0 of four issuers, each waiting for the run
    orphans = [ChainBuilder().payout(issuer_of(run, e), W3 if e < 3 else C1, run, e, 10, [W1, W2], T0) for e in range(4)]
    result = store.append(orphans)
    assert len(result.pending) == 4 and len(store.pending) == 3
    assert orphans[0].id not in store.pending  # the oldest was evicted
    # a payout that waits for its run and then fails the run's policy: dropped, the batch still succeeds
    strict_run = ChainBuilder().publish(W1, example_manifest("strict", quorum=3, issuers=[I1]), T0)
    weak = ChainBuilder().payout(I1, C1, strict_run, 0, 10, [W2, W3], T0)
    assert store.append([weak]).pending == (weak.id,)
    result = store.append([strict_run])
    assert result.added == (strict_run.id,)
    assert [d[0] for d in result.dropped] == [weak.id] and "quorum is 3" in result.dropped[0][1]


# ---- equivocation -------------------------------------------------------------------------------------


def fork_of(entry, signer, body, timestamp=T0 + 99):
    """A second entry at `entry`'s seq, on the same predecessor."""
    return sign_entry(signer, entry.seq, entry.prev, timestamp, entry.kind, body)


def test_an_equivocating_issuers_payouts_count_only_below_its_fork(store):
    run = ChainBuilder().publish(PUB, example_manifest("equivocation", quorum=2, issuers=[I1]), T0)
    chains = ChainBuilder()
    r = [chains.payout(I1, C1, run, epoch, 10, [W1, W2], T0 + epoch) for epoch in range(4)]
    store.append([run, *r])
    assert store.balance(C1.public_key).receipts == 4
    twin = fork_of(r[2], I1, payout_body(C2, run, 2, 500, [W1, W2]))
    result = store.append([twin])
    assert result.added == (twin.id,) and result.equivocators == (I1.public_key,)
    assert store.has(r[2].id) and store.has(twin.id)
    assert store.head(I1.public_key).fork_seq == 2
    assert store.balance(C1.public_key).receipts == 2  # seq 0 and 1 only
    assert store.balance(C2.public_key).receipts == 0  # the twin is past the fork: it counts for nothing
    assert store.counted_payouts_by(I1.public_key) == {r[0].id, r[1].id}
    # both forks stay extendable (and count for nothing); a (peer, epoch) may be paid once per fork
    on_twin = sign_entry(I1, 3, twin.id, T0 + 100, KIND_PAYOUT, payout_body(C1, run, 3, 10, [W1, W2]))
    store.append([on_twin])
    with pytest.raises(InvalidEntry, match="epoch 2 of run [0-9a-f]{16} was already paid to this peer"):
        store.append([sign_entry(I1, 4, on_twin.id, T0 + 100, KIND_PAYOUT, payout_body(C2, run, 2, 1, [W1, W2]))])
    with pytest.raises(InvalidEntry, match="must pay 268 of its 269 samples"):  # the cap too is counted on this fork
        store.append([sign_entry(I1, 4, on_twin.id, T0 + 100, KIND_PAYOUT, payout_body(C1, run, 2, 269, [W1, W2]))])
    store.append([sign_entry(I1, 4, on_twin.id, T0 + 100, KIND_PAYOUT, payout_body(C1, run, 2, 268, [W1, W2]))])
    assert store.balance(C1.public_key).receipts == 2
    # an earlier fork point found later lowers the verdict
    store.append([fork_of(r[0], I1, payout_body(C1, run, 0, 1, [W1, W2]))])
    assert store.head(I1.public_key).fork_seq == 0 and store.balance(C1.public_key).receipts == 0
    assert store.runs()[0].receipts == 0
    assert store.check_derived() == []
    assert [h.author for h in store.equivocators()] == [I1.public_key]


def test_a_publisher_equivocating_marks_its_publications_but_the_issuers_payouts_count(store):
    chains = ChainBuilder()
    before = chains.publish(PUB, example_manifest("before", quorum=2, issuers=[I1]), T0)
    after = chains.publish(PUB, example_manifest("after", quorum=2, issuers=[I1]), T0)
    work = [chains.payout(I1, C1, before, 0, 10, [W1, W2], T0), chains.payout(I1, C2, after, 0, 10, [W1, W2], T0)]
    store.append([before, after, *work])
    assert store.balance(C2.public_key).receipts == 1
    other = RunPublish.from_manifest(Manifest.from_wire(example_manifest("other", issuers=[PUB])))
    store.append([fork_of(after, PUB, other)])
    counted = {s.run_id: s.counted for s in store.runs()}
    assert counted[before.body.run_id] and not counted[after.body.run_id]
    # the policy is the manifest's, the payouts sit in the (honest) issuer's chain: they still count
    assert store.balance(C1.public_key).receipts == 1 and store.balance(C2.public_key).receipts == 1
    assert store.check_derived() == []


def _scenario() -> list:
    """Entries with two equivocators (an issuer and a publisher), a run published twice, honest peers."""
    chains = ChainBuilder()
    run_a = chains.publish(PUB, example_manifest("a", quorum=2, issuers=[I1, I2]), T0)
    run_b = chains.publish(PUB, example_manifest("b", quorum=2, issuers=[I1]), T0 + 1)
    again_a = chains.publish(W3, example_manifest("a", quorum=2, issuers=[I1, I2]), T0 + 2)
    out = [run_a, run_b, again_a]
    for epoch in range(3):
        out += [chains.payout(issuer_of(run, epoch), c, run, epoch, 10 + epoch, [W1, W2], T0 + epoch)
                for c in (C1, C2) for run in (run_a, run_b)]
    out.append(chains.payout(issuer_of(run_a, 3), C3, again_a, 3, 5, [W2, W3], T0 + 3))
    out.append(fork_of(run_b, PUB, RunPublish.from_manifest(Manifest.from_wire(example_manifest("b2", issuers=[PUB])))))
    i1_seq2 = next(e for e in out if e.author == I1.public_key and e.seq == 2)
    out.append(fork_of(i1_seq2, I1, payout_body(C1, run_b, 7, 77, [W1, W3])))
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
            assert len(shuffled.pending) == 0 and reference.count() == len(SCENARIO)
            assert _fingerprint(shuffled) == _fingerprint(reference)
            assert shuffled.check_derived() == [] and reference.check_derived() == []
            assert {h.author for h in shuffled.equivocators()} == {PUB.public_key, I1.public_key}


def test_balances_saturate_instead_of_overflowing(store):
    rate = 10**12
    chains = ChainBuilder()
    run = chains.publish(PUB, example_manifest("expensive", rate=rate, issuers=[PUB], target_batch_size=2**24), T0)
    samples = (2**63 - 1) // rate  # the largest claim whose amount fits
    payouts = [chains.payout(PUB, C1, run, epoch, samples, [W1], T0) for epoch in range(3)]
    store.append([run, *payouts])
    assert store.balance(C1.public_key).credits == INT64_MAX
    assert store.check_derived() == []
    store.rebuild_derived()
    assert store.balance(C1.public_key).credits == INT64_MAX
    # one sample more and samples x rate no longer fits: no amount can be right
    claim = Claim(run.body.run_id, PUB.public_key, 9, C1.public_key, samples + 1)
    receipt = Receipt.assemble(claim.sign(C1), [claim.witness(W1)])
    with pytest.raises(InvalidEntry, match="amount"):
        store.append([chains.entry(PUB, KIND_PAYOUT, PayoutBody(receipt, 2**63 - 1), T0)])


def test_digest_of_manifest_is_the_run_id():
    body = RunPublish.from_manifest(Manifest.from_wire(MANIFEST))
    assert body.run_id == crypto.digest(MANIFEST) == Manifest.from_wire(MANIFEST).run_id
