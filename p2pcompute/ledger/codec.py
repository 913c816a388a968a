"""Ledger entries: the canonical msgpack format, signing, entry ids, and strict decoding of every kind's body."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Union

from p2pcompute import crypto
from p2pcompute.credits.claims import Receipt
from p2pcompute.crypto import Signer
from p2pcompute.credits.policy import MAX_AMOUNT, MICRO_PER_CREDIT, CreditPolicy
from p2pcompute.errors import InvalidEntry, InvalidMessage
from p2pcompute.identity import parse_peer_id
from p2pcompute import canonical

ENTRY_VERSION = 1
# Domain tag prefixed to the encoded entry before signing (see credits.claims for the other tags).
ENTRY_DOMAIN = b"p2pcompute/ledger/entry/v1\x00"
# `prev` of an author's first entry (seq 0).
GENESIS_PREV = bytes(crypto.DIGEST_SIZE)

KIND_RUN_PUBLISH = "run.publish"
KIND_PAYOUT = "payout"
KIND_AUDIT = "audit"
KIND_TRANSFER = "transfer"
# Kinds with a settled body and rules; everything else is rejected on decode.
KINDS = (KIND_RUN_PUBLISH, KIND_PAYOUT, KIND_AUDIT)
RESERVED_KINDS = {
    "receipt": "kind 'receipt' (claimants crediting themselves) was replaced by 'payout' (signed by the run's issuer)",
    KIND_TRANSFER: "kind 'transfer' is reserved for a later version of the ledger",
}

# seq and timestamp are stored as SQLite INTEGERs (signed 64-bit).
MAX_SEQ = 2**63 - 1
MAX_TIMESTAMP = 2**63 - 1
# A manifest is a small TOML-derived document (model/dataset names, hyperparameters); 64 KiB is
# ample and keeps one entry well inside a sync message.
MAX_MANIFEST_SIZE = 64 * 1024
# The largest entry is a run.publish with a full manifest (64 KiB) plus its policy (< 1 KiB) and
# the header (< 200 bytes); payouts stay under 8 KiB (credits.claims.MAX_RECEIPT_SIZE).
MAX_ENTRY_SIZE = MAX_MANIFEST_SIZE + 4 * 1024  # also above an audit (its evidence <= 32 KiB)
# Encoded size of the trailing signature field: bin8 header (0xc4 0x40) + 64 bytes.
_SIGNATURE_FIELD_SIZE = 2 + crypto.SIGNATURE_SIZE
_ENTRY_ARRAY_HEADER = bytes([canonical.FIXARRAY | 8])
_UNSIGNED_ARRAY_HEADER = bytes([canonical.FIXARRAY | 7])


@dataclass(frozen=True)
class RunPublish:
    """Body of `run.publish`: the manifest (opaque to the ledger), its id and the run's credit policy."""

    run_id: bytes
    manifest: bytes
    policy: CreditPolicy

    def __post_init__(self) -> None:
        canonical.fixed_bytes(self.run_id, crypto.DIGEST_SIZE, "run_id")
        canonical.var_bytes(self.manifest, 1, MAX_MANIFEST_SIZE, "manifest")
        if not isinstance(self.policy, CreditPolicy):
            raise InvalidMessage("policy must be a CreditPolicy")

    @classmethod
    def create(cls, manifest: bytes, policy: CreditPolicy) -> "RunPublish":
        """The body to publish `manifest` under `policy`; run_id = digest(manifest)."""
        return cls(crypto.digest(manifest), manifest, policy)

    @classmethod
    def from_manifest(cls, manifest: Any) -> "RunPublish":
        """The body publishing a run manifest (`runs.manifest.Manifest`): its canonical bytes, so run_id is
        the swarm's run id, and the policy its `credits` section and epoch settings imply (`policy_of`)."""
        return cls.create(manifest.to_wire(), policy_of(manifest))

    def to_obj(self) -> list:
        return [self.run_id, self.manifest, self.policy.to_obj()]

    @classmethod
    def from_obj(cls, obj: Any) -> "RunPublish":
        run_id, manifest, policy = canonical.array(obj, 3, "run.publish body")
        return cls(run_id, manifest, CreditPolicy.from_obj(policy))


def policy_of(manifest: Any) -> CreditPolicy:
    """The credit policy a run manifest (`runs.manifest.Manifest`) implies: its `credits` section (issuers given
    there as PeerIDs, the budget in credits), its max_epochs, and an epoch cap of target_batch_size plus the
    section's slack percent. Every replica derives it again from the manifest bytes (ledger.validate)."""
    credits = manifest.credits
    try:
        issuers = [parse_peer_id(v) for v in credits.issuers]
    except InvalidMessage as e:
        raise InvalidMessage(f"credits.issuers: {e}") from None
    return CreditPolicy.create(
        credits.rate, credits.quorum, issuers, max_epochs=manifest.max_epochs,
        epoch_cap=manifest.target_batch_size * (100 + credits.slack) // 100,
        budget=min(MAX_AMOUNT, credits.budget * MICRO_PER_CREDIT))


@dataclass(frozen=True)
class PayoutBody:
    """Body of `payout`, signed by the run's issuer for the claim's epoch: the claimant's receipt (its signed claim
    and its witnesses' signatures) and the micro-credits paid: samples x the run's rate, for all the claimed samples
    or, in the payout that reaches the epoch's cap, those left under it (ledger.validate.payout_samples)."""

    receipt: Receipt
    amount: int

    def __post_init__(self) -> None:
        if not isinstance(self.receipt, Receipt):
            raise InvalidMessage("receipt must be a Receipt")
        canonical.uint(self.amount, 0, MAX_AMOUNT, "payout amount")

    @classmethod
    def create(cls, receipt: Receipt, policy: CreditPolicy, samples: int | None = None) -> "PayoutBody":
        """The payout of `samples` of the receipt's claim (default: all of them; fewer when the epoch's cap cuts it,
        ledger.validate.payout_samples)."""
        return cls(receipt, policy.amount_for(receipt.claim.samples if samples is None else samples))

    def to_obj(self) -> list:
        return [self.receipt.to_obj(), self.amount]

    @classmethod
    def from_obj(cls, obj: Any) -> "PayoutBody":
        receipt, amount = canonical.array(obj, 2, "payout body")
        return cls(Receipt.from_obj(receipt), amount)


# Evidence of one failed audit: what was recomputed, both sketches, the distance and the tolerance (credits/audit);
# opaque to the ledger, re-checkable offline by anyone holding the epoch's start state (`p2pc ledger audits`).
MAX_EVIDENCE_SIZE = 32 * 1024


@dataclass(frozen=True)
class AuditBody:
    """Body of `audit`, signed by one of the run's issuers: the payout `payout_id` (to `peer`, for `epoch` of
    `run_id`) failed a recomputation. It voids that payout and every other payout to `peer` in the run (the
    claw-back); `evidence` lets anyone re-check the verdict."""

    payout_id: bytes
    run_id: bytes
    peer: bytes
    epoch: int
    evidence: bytes

    def __post_init__(self) -> None:
        canonical.fixed_bytes(self.payout_id, crypto.DIGEST_SIZE, "audit payout_id")
        canonical.fixed_bytes(self.run_id, crypto.DIGEST_SIZE, "audit run_id")
        canonical.fixed_bytes(self.peer, crypto.PUBLIC_KEY_SIZE, "audit peer")
        canonical.uint(self.epoch, 0, 2**63 - 1, "audit epoch")
        canonical.var_bytes(self.evidence, 1, MAX_EVIDENCE_SIZE, "audit evidence")

    def to_obj(self) -> list:
        return [self.payout_id, self.run_id, self.peer, self.epoch, self.evidence]

    @classmethod
    def from_obj(cls, obj: Any) -> "AuditBody":
        return cls(*canonical.array(obj, 5, "audit body"))


Body = Union[RunPublish, PayoutBody, AuditBody]
BODY_TYPES: dict[str, type] = {KIND_RUN_PUBLISH: RunPublish, KIND_PAYOUT: PayoutBody, KIND_AUDIT: AuditBody}


def _check_kind(kind: Any) -> type:
    if type(kind) is not str:
        raise InvalidEntry(f"entry kind must be a string, got {type(kind).__name__}")
    if kind in RESERVED_KINDS:
        raise InvalidEntry(RESERVED_KINDS[kind])
    body_type = BODY_TYPES.get(kind)
    if body_type is None:
        raise InvalidEntry(f"unknown entry kind {kind[:40]!r}")
    return body_type


@dataclass(frozen=True)
class Entry:
    """One signed ledger entry. `wire` is its canonical encoding, `id` = digest(wire).

    Build new ones with `sign_entry`; decode untrusted bytes with `Entry.from_wire`. Construction checks
    every field's type and size (raising InvalidEntry), not the signature or the chain: that is
    `ledger.validate`.
    """

    author: bytes
    seq: int
    prev: bytes
    timestamp: int
    kind: str
    body: Body
    signature: bytes
    version: int = ENTRY_VERSION

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version != ENTRY_VERSION:
            raise InvalidEntry(f"unknown entry version {self.version!r}")
        canonical.fixed_bytes(self.author, crypto.PUBLIC_KEY_SIZE, "entry author", InvalidEntry)
        canonical.uint(self.seq, 0, MAX_SEQ, "entry seq", InvalidEntry)
        canonical.fixed_bytes(self.prev, crypto.DIGEST_SIZE, "entry prev", InvalidEntry)
        canonical.uint(self.timestamp, 0, MAX_TIMESTAMP, "entry timestamp", InvalidEntry)
        if not isinstance(self.body, _check_kind(self.kind)):
            raise InvalidEntry(f"{self.kind} entry has a {type(self.body).__name__} body")
        canonical.fixed_bytes(self.signature, crypto.SIGNATURE_SIZE, "entry signature", InvalidEntry)

    def _unsigned_obj(self) -> list:
        return [self.version, self.author, self.seq, self.prev, self.timestamp, self.kind, self.body.to_obj()]

    @cached_property
    def wire(self) -> bytes:
        wire = canonical.pack(self._unsigned_obj() + [self.signature])
        if len(wire) > MAX_ENTRY_SIZE:
            raise InvalidEntry(f"entry is {len(wire)} bytes, over the {MAX_ENTRY_SIZE}-byte limit")
        return wire

    @cached_property
    def id(self) -> bytes:
        return crypto.digest(self.wire)

    @property
    def signed_message(self) -> bytes:
        """ENTRY_DOMAIN + the encoding of the 7-element array without the signature. Since the wire form
        is canonical, that encoding is the wire bytes with the array header 0x98 turned into 0x97 and the
        trailing signature field (66 bytes) cut off."""
        return ENTRY_DOMAIN + _UNSIGNED_ARRAY_HEADER + self.wire[1:-_SIGNATURE_FIELD_SIZE]

    def to_wire(self) -> bytes:
        return self.wire

    @classmethod
    def from_wire(cls, data: bytes) -> "Entry":
        """Decode untrusted bytes strictly; raise InvalidEntry naming the first problem."""
        obj = canonical.unpack_canonical(data, max_size=MAX_ENTRY_SIZE, what="entry", error=InvalidEntry)
        version, author, seq, prev, timestamp, kind, body, signature = canonical.array(obj, 8, "entry", InvalidEntry)
        body_type = _check_kind(kind)
        try:
            parsed = body_type.from_obj(body)
        except InvalidEntry:
            raise
        except InvalidMessage as e:
            raise InvalidEntry(f"{kind} body: {e}") from None
        entry = cls(author, seq, prev, timestamp, kind, parsed, signature, version)
        entry.__dict__["wire"] = data  # the canonical check above proved pack(obj) == data
        return entry


def sign_entry(signer: Signer, seq: int, prev: bytes, timestamp: int, kind: str, body: Body) -> Entry:
    """Build and sign an entry of `signer`'s chain. Chain rules (seq, prev) are the caller's: see
    `Store.append_local`, which picks them from the author's head."""
    unsigned = [ENTRY_VERSION, signer.public_key, seq, prev, timestamp, kind, body.to_obj()]
    signature = signer.sign(ENTRY_DOMAIN + canonical.pack(unsigned))
    return Entry(signer.public_key, seq, prev, timestamp, kind, body, signature)

