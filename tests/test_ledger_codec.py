"""Entry codec: round trips, strict decoding, random mutations rejected, and the spec's test vectors."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute import crypto
from p2pcompute.credits.claims import Claim, Receipt
from p2pcompute.credits.policy import MAX_AMOUNT, CreditPolicy
from p2pcompute.errors import InvalidEntry, InvalidMessage
from p2pcompute.ledger import validate
from p2pcompute.ledger.codec import (
    ENTRY_DOMAIN,
    GENESIS_PREV,
    KIND_PAYOUT,
    KIND_RUN_PUBLISH,
    KIND_AUDIT,
    KINDS,
    AuditBody,
    MAX_ENTRY_SIZE,
    MAX_MANIFEST_SIZE,
    MAX_SEQ,
    MAX_TIMESTAMP,
    Entry,
    PayoutBody,
    RunPublish,
    policy_of,
    sign_entry,
)
from p2pcompute.ledger.examples import example_manifest, seed_key, vector_entries
from p2pcompute.runs.manifest import Manifest

KEYS = [seed_key(b) for b in range(1, 7)]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "ledger.md"


@st.composite
def manifests(draw) -> bytes:
    """Canonical bytes of real run manifests over the range of every credit setting their policy derives from."""
    rate = draw(st.integers(0, 10**12))
    issuers = draw(st.lists(st.sampled_from(KEYS), min_size=1 if rate else 0, max_size=3, unique=True))
    return example_manifest(
        draw(st.text("abcxyz0123", min_size=1, max_size=8)), rate=rate, quorum=draw(st.integers(1, 64)),
        issuers=issuers, max_epochs=draw(st.integers(0, 2**31)), target_batch_size=draw(st.integers(32, 2**24)),
        budget=draw(st.integers(0, 10**12)), slack=draw(st.integers(0, 1000)))


@st.composite
def entries(draw) -> Entry:
    """Random well-formed, correctly signed entries of every kind (chain context aside)."""
    author = draw(st.sampled_from(KEYS))
    seq = draw(st.one_of(st.just(0), st.integers(1, MAX_SEQ)))
    prev = GENESIS_PREV if seq == 0 else draw(st.binary(min_size=32, max_size=32).filter(lambda b: b != GENESIS_PREV))
    timestamp = draw(st.integers(0, MAX_TIMESTAMP))
    kind = draw(st.sampled_from(KINDS))
    others = [k for k in KEYS if k is not author]
    if kind == KIND_RUN_PUBLISH:
        body = RunPublish.from_manifest(Manifest.from_wire(draw(manifests())))
    elif kind == KIND_AUDIT:
        body = AuditBody(*(draw(st.binary(min_size=32, max_size=32)) for _ in range(3)), draw(st.integers(0, 2**63 - 1)),
                         draw(st.binary(min_size=1, max_size=256)))
    else:  # the author (the issuer) pays a claimant, witnessed by others (the issuer may be among them)
        claimant = draw(st.sampled_from(others))
        claim = Claim(draw(st.binary(min_size=32, max_size=32)), draw(st.sampled_from(KEYS)).public_key,
                      draw(st.integers(0, 2**63 - 1)), claimant.public_key, draw(st.integers(1, 2**32 - 1)),
                      draw(st.binary(max_size=32)), draw(st.binary(min_size=32, max_size=32)))
        witnesses = draw(st.lists(st.sampled_from([k for k in KEYS if k is not claimant]), max_size=3,
                                  unique_by=lambda k: k.public_key))
        receipt = Receipt.assemble(claim.sign(claimant), [claim.witness(w) for w in witnesses])
        body = PayoutBody(receipt, draw(st.integers(0, MAX_AMOUNT)))
    return sign_entry(author, seq, prev, timestamp, kind, body)


@settings(max_examples=80, deadline=None)
@given(entries())
def test_round_trip_and_signature(entry):
    decoded = Entry.from_wire(entry.wire)
    assert decoded == entry
    assert decoded.id == entry.id == crypto.digest(entry.wire)
    assert decoded.wire == entry.wire
    validate.check_entry(decoded)
    # The signed message is the 7-field array after the domain tag.
    unsigned = msgpack.unpackb(entry.wire)[:7]
    assert entry.signed_message == ENTRY_DOMAIN + msgpack.packb(unsigned, use_bin_type=True)


def _rejected(data: bytes) -> None:
    with pytest.raises(InvalidMessage):
        validate.check_entry(Entry.from_wire(data))


@settings(max_examples=150, deadline=None)
@given(entries(), st.data())
def test_any_flipped_byte_is_rejected(entry, data):
    wire = bytearray(entry.wire)
    position = data.draw(st.integers(0, len(wire) - 1))
    wire[position] ^= data.draw(st.integers(1, 255))
    _rejected(bytes(wire))


@settings(max_examples=60, deadline=None)
@given(entries(), st.data())
def test_truncated_or_extended_entries_are_rejected(entry, data):
    cut = data.draw(st.integers(0, len(entry.wire) - 1))
    _rejected(entry.wire[:cut])
    _rejected(entry.wire + data.draw(st.binary(min_size=1, max_size=8)))


def _replace(obj, path, value):
    """Copy of a nested list with the element at `path` replaced."""
    if not path:
        return value
    out = list(obj)
    out[path[0]] = _replace(obj[path[0]], path[1:], value)
    return out


@settings(max_examples=100, deadline=None)
@given(entries(), st.data())
def test_changed_fields_break_the_signature(entry, data):
    obj = msgpack.unpackb(entry.wire)
    paths = [(1,), (2,), (3,), (4,)]
    if entry.kind == KIND_RUN_PUBLISH:
        paths += [(6, 1), (6, 2, 0), (6, 2, 1), (6, 2, 3), (6, 2, 4), (6, 2, 5)]
    elif entry.kind == KIND_AUDIT:
        paths += [(6, 0), (6, 2), (6, 3), (6, 4)]
    else:
        paths += [(6, 1), (6, 0, 0, 3), (6, 0, 0, 5)]
    path = data.draw(st.sampled_from(paths))
    old = obj
    for i in path:
        old = old[i]
    if isinstance(old, bytes):
        new = data.draw(st.binary(min_size=len(old), max_size=len(old)).filter(lambda b: b != old))
    else:
        new = data.draw(st.integers(0, 2**31).filter(lambda v: v != old))
    _rejected(msgpack.packb(_replace(obj, path, new), use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        Entry.from_wire(data)
    except InvalidEntry:
        pass


# ---- explicit strictness cases -----------------------------------------------------------------------

SAMPLE = vector_entries()["payout seq 1"]
SAMPLE_OBJ = msgpack.unpackb(SAMPLE.wire)


def _packed(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


MALFORMED = [
        (SAMPLE.wire + b"\xc0", "trailing"),
        (_packed(dict(enumerate(SAMPLE_OBJ))), "msgpack"),
        (_packed(_replace(SAMPLE_OBJ, (0,), 2)), "version"),
        (_packed(_replace(SAMPLE_OBJ, (0,), True)), "version"),
        (_packed(_replace(SAMPLE_OBJ, (1,), "a" * 32)), "author"),
        (_packed(_replace(SAMPLE_OBJ, (2,), 1.0)), "seq"),
        (_packed(_replace(SAMPLE_OBJ, (2,), -1)), "seq"),
        (_packed(_replace(SAMPLE_OBJ, (4,), 1.5)), "timestamp"),
        (_packed(_replace(SAMPLE_OBJ, (5,), "audit")), "audit body"),
        (_packed(_replace(SAMPLE_OBJ, (5,), "transfer")), "reserved"),
        (_packed(_replace(SAMPLE_OBJ, (5,), "receipt")), "kind 'receipt' .* was replaced by 'payout'"),
        (_packed(_replace(SAMPLE_OBJ, (5,), "mint")), "unknown entry kind"),
        (_packed(_replace(SAMPLE_OBJ, (5,), KIND_RUN_PUBLISH)), "run.publish body"),
        (_packed(_replace(SAMPLE_OBJ, (6, 1), -5)), "amount"),
        (_packed(_replace(SAMPLE_OBJ, (6, 0, 2), [[b"x"]])), "witness"),
        (_packed(SAMPLE_OBJ[:7]), "8 fields"),
        (_packed(SAMPLE_OBJ + [b""]), "8 fields"),
        (_packed(_replace(SAMPLE_OBJ, (7,), b"\x00" * 63)), "signature"),
        (b"\x98\xcd\x00\x01" + SAMPLE.wire[2:], "canonical"),  # version 1 as a uint16: not the shortest form
        (b"\xdc\x00\x08" + SAMPLE.wire[1:], "canonical"),  # array16 header for 8 elements
        (b"\x00" * (MAX_ENTRY_SIZE + 1), "limit"),
        (msgpack.packb(SAMPLE_OBJ[:-1] + [msgpack.ExtType(1, b"x")]), "msgpack"),
]


@pytest.mark.parametrize("data, reason", MALFORMED, ids=[reason for _, reason in MALFORMED])
def test_malformed_entries_are_rejected_naming_why(data, reason):
    with pytest.raises(InvalidEntry, match=reason):
        Entry.from_wire(data)


def test_oversize_manifest_and_genesis_rules():
    key = KEYS[0]
    with pytest.raises(InvalidMessage, match="manifest"):
        RunPublish.create(b"x" * (MAX_MANIFEST_SIZE + 1), CreditPolicy(0, 1))
    manifest = example_manifest("genesis", issuers=[key])
    body = RunPublish.from_manifest(Manifest.from_wire(manifest))
    validate.check_entry(sign_entry(key, 0, GENESIS_PREV, 0, KIND_RUN_PUBLISH, body))
    with pytest.raises(InvalidEntry, match="seq 0"):
        validate.check_entry(sign_entry(key, 0, b"\x01" * 32, 0, KIND_RUN_PUBLISH, body))
    with pytest.raises(InvalidEntry, match="genesis"):
        validate.check_entry(sign_entry(key, 1, GENESIS_PREV, 0, KIND_RUN_PUBLISH, body))
    wrong_id = RunPublish(crypto.digest(b"other"), manifest, body.policy)
    with pytest.raises(InvalidEntry, match="digest of the manifest"):
        validate.check_entry(sign_entry(key, 0, GENESIS_PREV, 0, KIND_RUN_PUBLISH, wrong_id))
    wrong_policy = RunPublish.create(manifest, CreditPolicy.create(1000, 1, [key.public_key]))  # cap left at default
    with pytest.raises(InvalidEntry, match="not the one the manifest implies"):
        validate.check_entry(sign_entry(key, 0, GENESIS_PREV, 0, KIND_RUN_PUBLISH, wrong_policy))


def test_payout_signatures_are_checked_alone_and_its_author_against_the_policy():
    issuer, claimant, witness, other = KEYS[:4]
    claim = Claim(crypto.digest(b"m"), issuer.public_key, 3, claimant.public_key, 5)
    receipt = Receipt.assemble(claim.sign(claimant), [claim.witness(witness)])
    policy = CreditPolicy.create(1000, 1, [issuer.public_key, other.public_key], epoch_cap=5)
    body = PayoutBody.create(receipt, policy)
    validate.check_entry(sign_entry(issuer, 0, GENESIS_PREV, 0, KIND_PAYOUT, body))
    forged = PayoutBody(Receipt(claim, other.sign(b"not the claim"), receipt.witnesses), body.amount)
    with pytest.raises(InvalidEntry, match="payout receipt .*claimant"):
        validate.check_entry(sign_entry(issuer, 0, GENESIS_PREV, 0, KIND_PAYOUT, forged))
    # the issuer of epoch 3 is issuers[3 % 2]; neither the other issuer nor the claimant may sign its payout
    payer = policy.issuer_for(3)
    validate.check_payout_policy(body, policy, payer)
    for wrong in ({issuer.public_key, other.public_key} - {payer}) | {claimant.public_key}:
        with pytest.raises(InvalidEntry, match="not signed by the run's issuer for that epoch"):
            validate.check_payout_policy(body, policy, wrong)


def test_run_publish_body_from_a_run_manifest():
    import tomllib

    from p2pcompute.identity import peer_id_b58

    spec = tomllib.loads((Path(__file__).resolve().parent.parent / "docs" / "examples" / "mlp-synthetic.toml").read_text())
    issuer = KEYS[2].public_key
    spec["credits"] = {"rate": 2500, "quorum": 2, "issuers": [peer_id_b58(issuer)], "budget": 40, "slack": 25}
    manifest = Manifest.from_dict(spec)
    body = RunPublish.from_manifest(manifest)
    assert body.run_id == manifest.run_id and body.manifest == manifest.to_wire()
    assert body.policy == policy_of(manifest) == CreditPolicy(
        2500, 2, (issuer,), max_epochs=manifest.max_epochs, epoch_cap=manifest.target_batch_size * 125 // 100,
        budget=40_000_000)
    # a paying run names no issuer: it cannot be published as it is; the publisher becomes its issuer
    spec["credits"] = {"rate": 2500}
    unpaid = Manifest.from_dict(spec)
    with pytest.raises(InvalidMessage, match="needs at least one issuer"):
        RunPublish.from_manifest(unpaid)
    published = unpaid.with_default_issuer(peer_id_b58(KEYS[4].public_key))
    assert RunPublish.from_manifest(published).policy.issuers == (KEYS[4].public_key,)
    assert published.run_id != unpaid.run_id  # the issuer is part of the manifest, hence of the run id
    free = Manifest.from_dict({**spec, "credits": {"rate": 0}})
    assert free.with_default_issuer(peer_id_b58(KEYS[4].public_key)) == free
    assert RunPublish.from_manifest(free).policy.issuers == ()


# ---- test vectors: docs/ledger.md lists them; the code must reproduce them byte for byte --------------

_VECTOR = re.compile(r"^#### Vector: (?P<name>[^\n]+)\n+id: `(?P<id>[0-9a-f]{64})`\n+```hex\n(?P<hex>[0-9a-f\n]+)```", re.M)


def documented_vectors() -> dict[str, tuple[str, str]]:
    return {m["name"]: (m["id"], m["hex"].replace("\n", "")) for m in _VECTOR.finditer(DOCS.read_text())}


def test_spec_vectors_match_the_code():
    documented = documented_vectors()
    built = vector_entries()
    assert set(documented) == set(built)
    for name, entry in built.items():
        doc_id, doc_hex = documented[name]
        assert entry.wire.hex() == doc_hex, f"encoding of vector {name!r} changed"
        assert entry.id.hex() == doc_id
        decoded = Entry.from_wire(bytes.fromhex(doc_hex))
        validate.check_entry(decoded)
        assert decoded == entry
