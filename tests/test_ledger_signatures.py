"""The pinned Ed25519 rule as the ledger applies it: the 12 speccheck edge cases, y >= p encodings,
malleated S, small-order keys as entry authors and witnesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature as CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pcompute import crypto
from p2pcompute.credits.claims import Claim, Receipt, WitnessSignature
from p2pcompute.errors import InvalidEntry, InvalidSignature
from p2pcompute.ledger import validate
from p2pcompute.ledger.codec import KIND_PAYOUT, Entry, PayoutBody, sign_entry
from p2pcompute.ledger.examples import seed_key, vector_entries

VECTORS = Path(__file__).resolve().parent / "vectors" / "ed25519-speccheck-cases.json"  # shipped: never skipped
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493


def speccheck_cases() -> list[dict]:
    return json.loads(VECTORS.read_text())


def _verifies(verify, case: dict) -> bool:
    try:
        verify(bytes.fromhex(case["pub_key"]), bytes.fromhex(case["message"]), bytes.fromhex(case["signature"]))
        return True
    except (InvalidSignature, CryptoInvalidSignature, ValueError):
        return False


def test_only_case_3_of_the_speccheck_vectors_verifies_under_the_pinned_rule():
    cases = speccheck_cases()
    assert len(cases) == 12
    accepted = [i for i, case in enumerate(cases) if _verifies(crypto.verify, case)]
    assert accepted == [3]


def test_cryptography_alone_would_accept_more_which_is_why_the_rule_is_pinned():
    def raw(public_key, message, signature):
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)

    cases = speccheck_cases()
    assert [i for i, case in enumerate(cases) if _verifies(raw, case)] == [0, 1, 2, 3, 11]


def _y_at_least_p_encodings() -> list[bytes]:
    # y in [p, 2^255): non-canonical encodings of y - p (with both sign bits)
    ys = [P, P + 1, P + 2, P + 5, 2**255 - 1]
    return [(y | sign << 255).to_bytes(32, "little") for y in ys for sign in (0, 1)]


@pytest.mark.parametrize("encoding", _y_at_least_p_encodings(), ids=lambda e: e.hex()[:8] + ".." + e.hex()[-4:])
def test_public_keys_and_r_with_y_at_least_p_are_rejected(encoding):
    key = seed_key(9)
    message = b"message"
    signature = key.sign(message)
    with pytest.raises(InvalidSignature, match="y >= p"):
        crypto.verify(encoding, message, signature)
    with pytest.raises(InvalidSignature, match="y >= p"):
        crypto.verify(key.public_key, message, encoding + signature[32:])


def test_malleated_s_is_rejected():
    entry = vector_entries()["run.publish seq 0"]
    s = int.from_bytes(entry.signature[32:], "little")
    malleated = entry.signature[:32] + (s + L).to_bytes(32, "little")
    # cryptography (OpenSSL) already rejects S >= L; the pinned rule names the reason before it
    with pytest.raises(InvalidSignature, match="group order"):
        crypto.verify(entry.author, entry.signed_message, malleated)


def _resigned_as(entry: Entry, **changes) -> bytes:
    """The entry's wire bytes with fields replaced (the signature no longer matters: the key checks fail first)."""
    fields = dict(author=entry.author, seq=entry.seq, prev=entry.prev, timestamp=entry.timestamp, kind=entry.kind,
                  body=entry.body, signature=entry.signature)
    fields.update(changes)
    return Entry(**fields).wire


@pytest.mark.parametrize(
    "author, reason",
    [
        (bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000000"), "small order"),
        (bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"), "small order"),
        ((P + 1).to_bytes(32, "little"), "y >= p"),
        ((1 | 1 << 255).to_bytes(32, "little"), "negative zero"),
    ],
)
def test_entries_by_small_order_or_non_canonical_authors_are_rejected(author, reason):
    entry = Entry.from_wire(_resigned_as(vector_entries()["run.publish seq 0"], author=author))
    with pytest.raises(InvalidEntry, match=reason):
        validate.check_entry(entry)


def test_payout_with_a_small_order_witness_is_rejected():
    entry = vector_entries()["payout seq 1"]
    receipt = entry.body.receipt
    small = bytes.fromhex("0000000000000000000000000000000000000000000000000000000000000080")
    witnesses = tuple(sorted(receipt.witnesses + (WitnessSignature(small, bytes(64)),), key=lambda w: w.witness))
    forged = Receipt(receipt.claim, receipt.claimant_signature, witnesses)
    # signed again by the issuer, so that only the witness is wrong
    tampered = sign_entry(seed_key(1), entry.seq, entry.prev, entry.timestamp, KIND_PAYOUT,
                          PayoutBody(forged, entry.body.amount))
    with pytest.raises(InvalidEntry, match="witness .*small order"):
        validate.check_entry(Entry.from_wire(tampered.wire))


def test_claim_with_a_non_canonical_claimant_key_cannot_verify():
    claimant = seed_key(2)
    claim = Claim(crypto.digest(b"m"), seed_key(1).public_key, 0, (P + 3).to_bytes(32, "little"), 1)
    with pytest.raises(InvalidSignature, match="y >= p"):
        crypto.verify(claim.peer, b"anything", claimant.sign(b"anything"))
