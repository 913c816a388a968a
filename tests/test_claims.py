"""Claims, witness signatures, receipts and the credit policy: encoding, signing, domain separation."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute import crypto
from p2pcompute.credits.claims import (
    CLAIM_DOMAIN,
    MAX_SAMPLES,
    MAX_WITNESSES,
    WITNESS_DOMAIN,
    Claim,
    Receipt,
    SignedClaim,
    WitnessSignature,
)
from p2pcompute.credits.policy import MAX_EPOCH_CAP, MAX_EPOCHS, MAX_RATE, CreditPolicy
from p2pcompute.errors import InvalidMessage, InvalidSignature
from p2pcompute.ledger.codec import ENTRY_DOMAIN
from p2pcompute.ledger.examples import seed_key

CLAIMANT, W1, W2, W3 = (seed_key(b) for b in (2, 3, 4, 5))
RUN_ID = crypto.digest(b"manifest")
PUBLISHER = seed_key(1).public_key
SMALL_ORDER_KEY = bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")


def make_claim(**changes) -> Claim:
    fields = dict(run_id=RUN_ID, publisher=PUBLISHER, epoch=3, peer=CLAIMANT.public_key, samples=128,
                  group_id=b"g" * 20, work_digest=crypto.digest(b"work"))
    fields.update(changes)
    return Claim(**fields)


claims = st.builds(
    make_claim,
    epoch=st.integers(0, 2**63 - 1),
    samples=st.integers(1, MAX_SAMPLES),
    group_id=st.binary(max_size=32),
    work_digest=st.binary(min_size=32, max_size=32),
)


@settings(max_examples=60, deadline=None)
@given(claims)
def test_claim_round_trips_and_signatures_verify(claim):
    assert Claim.from_wire(claim.to_wire()) == claim
    signed = claim.sign(CLAIMANT)
    assert SignedClaim.from_wire(signed.to_wire()) == signed
    signed.verify()
    witness = claim.witness(W1)
    assert WitnessSignature.from_wire(witness.to_wire()) == witness
    witness.verify(claim)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoders(data):
    for decoder in (Claim.from_wire, SignedClaim.from_wire, WitnessSignature.from_wire, Receipt.from_wire):
        try:
            decoder(data)
        except InvalidMessage:
            pass


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(samples=0), "samples"),
        (dict(samples=MAX_SAMPLES + 1), "samples"),
        (dict(samples=True), "integer"),
        (dict(epoch=-1), "epoch"),
        (dict(run_id=b"x" * 31), "run_id"),
        (dict(peer="not bytes"), "peer"),
        (dict(group_id=b"g" * 33), "group_id"),
        (dict(work_digest=b""), "work_digest"),
    ],
)
def test_claim_fields_are_checked(change, reason):
    with pytest.raises(InvalidMessage, match=reason):
        make_claim(**change)


def test_claim_decoding_is_strict():
    wire = make_claim().to_wire()
    with pytest.raises(InvalidMessage, match="trailing"):
        Claim.from_wire(wire + b"\x00")
    obj = make_claim().to_obj()
    with pytest.raises(InvalidMessage, match="version"):
        Claim.from_wire(msgpack.packb([2] + obj[1:]))
    with pytest.raises(InvalidMessage, match="version"):
        Claim.from_wire(msgpack.packb([True] + obj[1:]))
    # epoch 3 written as a uint64 instead of a fixint: the same value, non-canonical bytes
    parts = [msgpack.packb(x, use_bin_type=True) for x in obj]
    parts[3] = b"\xcf" + (3).to_bytes(8, "big")
    with pytest.raises(InvalidMessage, match="canonical"):
        Claim.from_wire(bytes([0x98]) + b"".join(parts))
    with pytest.raises(InvalidMessage):
        Claim.from_wire(msgpack.packb({"run_id": RUN_ID}))


def test_only_the_claimant_signs_and_only_others_witness():
    claim = make_claim()
    with pytest.raises(InvalidMessage):
        claim.sign(W1)
    with pytest.raises(InvalidMessage):
        claim.witness(CLAIMANT)


def test_domain_separation_between_claim_witness_and_entry_signatures():
    claim = make_claim()
    as_claimant = claim.sign(CLAIMANT).signature
    # A claimant signature is no witness signature (and vice versa), even from the same key.
    with pytest.raises(InvalidSignature):
        crypto.verify(CLAIMANT.public_key, WITNESS_DOMAIN + claim.wire, as_claimant)
    with pytest.raises(InvalidSignature):
        crypto.verify(CLAIMANT.public_key, ENTRY_DOMAIN + claim.wire, as_claimant)
    witness = claim.witness(W1)
    with pytest.raises(InvalidSignature):
        crypto.verify(W1.public_key, CLAIM_DOMAIN + claim.wire, witness.signature)
    assert len({CLAIM_DOMAIN, WITNESS_DOMAIN, ENTRY_DOMAIN}) == 3
    # Witness signature of another claim does not transfer.
    with pytest.raises(InvalidSignature):
        witness.verify(make_claim(samples=129))


def test_receipt_assemble_keeps_valid_distinct_witnesses_sorted():
    claim = make_claim()
    forged = WitnessSignature(W3.public_key, bytes(64))
    other_claim_sig = make_claim(epoch=4).witness(W2)
    sigs = [claim.witness(W2), claim.witness(W1), claim.witness(W1), forged, other_claim_sig,
            WitnessSignature(CLAIMANT.public_key, claim.sign(CLAIMANT).signature)]
    receipt = Receipt.assemble(claim.sign(CLAIMANT), sigs)
    assert receipt.witness_keys == tuple(sorted([W1.public_key, W2.public_key]))
    receipt.verify_signatures()
    assert Receipt.from_wire(receipt.to_wire()) == receipt


def test_receipt_structure_rules():
    claim = make_claim()
    signed = claim.sign(CLAIMANT)
    a, b = sorted([claim.witness(W1), claim.witness(W2)], key=lambda w: w.witness)
    with pytest.raises(InvalidMessage, match="sorted"):
        Receipt(claim, signed.signature, (b, a))
    with pytest.raises(InvalidMessage, match="sorted"):
        Receipt(claim, signed.signature, (a, a))
    self_witness = WitnessSignature(CLAIMANT.public_key, bytes(64))
    with pytest.raises(InvalidMessage, match="claimant"):
        Receipt(claim, signed.signature, (self_witness,))
    too_many = tuple(WitnessSignature(bytes([i]) * 32, bytes(64)) for i in range(MAX_WITNESSES + 1))
    with pytest.raises(InvalidMessage):
        Receipt(claim, signed.signature, too_many)
    # A forged claimant signature is caught by verify_signatures.
    with pytest.raises(InvalidSignature, match="claimant"):
        Receipt(claim, bytes(64), (a, b)).verify_signatures()


def test_credit_policy_rules():
    policy = CreditPolicy.create(rate=10, quorum=2, issuers=[W2.public_key, W1.public_key, W1.public_key],
                                 max_epochs=100, epoch_cap=600, budget=10**9)
    assert list(policy.issuers) == sorted({W1.public_key, W2.public_key})
    assert CreditPolicy.from_obj(policy.to_obj()) == policy
    assert policy.amount_for(7) == 70
    # epoch e is paid by issuers[e % len(issuers)]; the budget is split evenly among them
    assert [policy.issuer_for(e) for e in (0, 1, 2, 2**62 + 1)] == [policy.issuers[0], policy.issuers[1]] * 2
    assert policy.issuer_budget() == 5 * 10**8
    assert (policy.pays_epoch(99), policy.pays_epoch(100)) == (True, False)
    free = CreditPolicy(0, 1)  # a run that pays nothing needs no issuer and has no end or budget by default
    assert (free.issuer_for(5), free.pays_epoch(2**62), free.issuer_budget()) == (None, True, None)
    with pytest.raises(InvalidMessage, match="quorum"):
        CreditPolicy(10, 0)
    with pytest.raises(InvalidMessage, match="rate"):
        CreditPolicy(MAX_RATE + 1, 1)
    with pytest.raises(InvalidMessage, match="needs at least one issuer"):
        CreditPolicy(10, 1)
    with pytest.raises(InvalidMessage, match="small order"):
        CreditPolicy(10, 1, (SMALL_ORDER_KEY,))
    with pytest.raises(InvalidMessage, match="sorted"):
        CreditPolicy.from_obj([10, 1, sorted([W1.public_key, W2.public_key], reverse=True), 0, 1, 0])
    with pytest.raises(InvalidMessage, match="at most 16"):
        CreditPolicy(10, 1, tuple(sorted(crypto.SigningKey(bytes([i]) * 32).public_key for i in range(1, 18))))
    for bounds, field in ((dict(max_epochs=MAX_EPOCHS + 1), "max_epochs"), (dict(epoch_cap=0), "epoch_cap"),
                          (dict(epoch_cap=MAX_EPOCH_CAP + 1), "epoch_cap"), (dict(budget=-1), "budget")):
        with pytest.raises(InvalidMessage, match=field):
            CreditPolicy(10, 1, (W1.public_key,), **bounds)
    with pytest.raises(InvalidMessage, match="policy"):  # the three-field policy of ledger v1 is not a policy
        CreditPolicy.from_obj([10, 1, [W1.public_key]])
