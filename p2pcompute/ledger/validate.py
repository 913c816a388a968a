"""Ledger validation rules as pure functions over an entry and a read-only view of what it references.

The same functions run on ingest, on sync and in `p2pc ledger verify`. They return nothing and raise
`InvalidEntry` naming the reason, or `MissingDependency` when the entry names something (its previous
entry, its run) that the view does not hold yet. Validity depends only on the entry, its own chain
ancestors and the run it references, never on arrival order or the clock, so every replica that holds
the same entries reaches the same verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from p2pcompute import crypto
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.errors import InvalidEntry, InvalidSignature, MissingDependency
from p2pcompute.ledger.codec import GENESIS_PREV, KIND_RECEIPT, KIND_RUN_PUBLISH, Entry, ReceiptBody


@dataclass(frozen=True)
class EntryRef:
    """What validation needs to know about a stored entry."""

    id: bytes
    author: bytes
    seq: int
    prev: bytes
    timestamp: int


@dataclass(frozen=True)
class Publication:
    """A stored `run.publish`: who published which run, where in their chain, under which policy."""

    entry_id: bytes
    publisher: bytes
    seq: int
    run_id: bytes
    policy: CreditPolicy


class LedgerView(Protocol):
    """Read access to the entries a replica already holds (the store, plus a batch being ingested)."""

    def entry_ref(self, entry_id: bytes) -> EntryRef | None: ...

    def fork_seq(self, author: bytes) -> int | None:
        """Lowest seq at which `author` has two or more entries (an equivocation), None if none."""

    def publications(self, publisher: bytes, run_id: bytes) -> list[Publication]:
        """`publisher`'s run.publish entries for `run_id` (more than one only on forks of an equivocator)."""

    def receipts_for(self, author: bytes, publisher: bytes, run_id: bytes, epoch: int) -> list[EntryRef]:
        """`author`'s receipts for that (run, epoch), on any of its forks."""


def entry_key(entry_id: bytes) -> tuple:
    """Dependency key of an entry (what a pending entry waits for)."""
    return ("entry", entry_id)


def run_key(publisher: bytes, run_id: bytes) -> tuple:
    """Dependency key of a run."""
    return ("run", publisher, run_id)


def provided_keys(entry: Entry) -> list[tuple]:
    """The dependency keys an entry satisfies once stored."""
    keys = [entry_key(entry.id)]
    if entry.kind == KIND_RUN_PUBLISH:
        keys.append(run_key(entry.author, entry.body.run_id))
    return keys


# ---- checks of the entry alone ------------------------------------------------------------------


def check_entry(entry: Entry) -> None:
    """Everything that needs no other entry: genesis rule, the author's signature, the body's own rules
    (run_id = digest(manifest); a receipt's claimant is the author, and every signature in it verifies).

    Signatures are checked with `crypto.verify`, the pinned Ed25519 rule.
    """
    if (entry.seq == 0) != (entry.prev == GENESIS_PREV):
        if entry.seq == 0:
            raise InvalidEntry("seq 0 must have prev = 32 zero bytes")
        raise InvalidEntry(f"seq {entry.seq} names the genesis marker as its previous entry")
    try:
        crypto.verify(entry.author, entry.signed_message, entry.signature)
    except InvalidSignature as e:
        raise InvalidEntry(f"author signature: {e}") from None
    if entry.kind == KIND_RUN_PUBLISH:
        if crypto.digest(entry.body.manifest) != entry.body.run_id:
            raise InvalidEntry("run_id is not the digest of the manifest")
    elif entry.kind == KIND_RECEIPT:
        receipt = entry.body.receipt
        if receipt.claim.peer != entry.author:
            raise InvalidEntry("receipt claim is for another peer than the entry's author")
        try:
            receipt.verify_signatures()
        except InvalidSignature as e:
            raise InvalidEntry(f"receipt {e}") from None


def check_receipt_policy(body: ReceiptBody, policy: CreditPolicy) -> None:
    """A receipt against its run's policy: quorum of witnesses, a validator among them if the policy
    names any, amount = samples x rate. (Witnesses are distinct and exclude the claimant by construction,
    see `credits.claims.Receipt`; their signatures are checked by `check_entry`.)"""
    receipt = body.receipt
    if len(receipt.witnesses) < policy.quorum:
        raise InvalidEntry(f"receipt has {len(receipt.witnesses)} witness signatures, the run's quorum is {policy.quorum}")
    if policy.validators and not set(policy.validators).intersection(receipt.witness_keys):
        raise InvalidEntry("receipt carries no signature of any of the run's validators")
    expected = policy.amount_for(receipt.claim.samples)
    if body.amount != expected:
        raise InvalidEntry(
            f"receipt amount {body.amount} is not samples {receipt.claim.samples} x rate {policy.rate} = {expected}"
        )


# ---- checks against what the replica holds ------------------------------------------------------


def check_in_context(entry: Entry, view: LedgerView) -> None:
    """Chain linkage and kind rules that need other entries. Assumes `check_entry` passed.

    Raises MissingDependency if the previous entry or the referenced run is not in the view yet.
    """
    if entry.seq > 0:
        prev = view.entry_ref(entry.prev)
        if prev is None:
            raise MissingDependency(f"previous entry {entry.prev.hex()} is not here yet", entry_key(entry.prev))
        if prev.author != entry.author or prev.seq != entry.seq - 1:
            raise InvalidEntry(f"prev names an entry that is not seq {entry.seq - 1} of the same author")
        if entry.timestamp < prev.timestamp:
            raise InvalidEntry(f"timestamp {entry.timestamp} is before the previous entry's {prev.timestamp}")
    if entry.kind == KIND_RUN_PUBLISH:
        _check_publish(entry, view)
    elif entry.kind == KIND_RECEIPT:
        _check_receipt(entry, view)


def validate(entry: Entry, view: LedgerView) -> None:
    """All rules: `check_entry` then `check_in_context`."""
    check_entry(entry)
    check_in_context(entry, view)


def _check_publish(entry: Entry, view: LedgerView) -> None:
    for earlier in view.publications(entry.author, entry.body.run_id):
        if is_ancestor(view, earlier.entry_id, earlier.seq, entry):
            raise InvalidEntry(f"run {entry.body.run_id.hex()} was already published by this author at seq {earlier.seq}")


def _check_receipt(entry: Entry, view: LedgerView) -> None:
    claim = entry.body.receipt.claim
    publications = view.publications(claim.publisher, claim.run_id)
    if not publications:
        raise MissingDependency(
            f"run {claim.run_id.hex()} of publisher {claim.publisher.hex()} is not here yet",
            run_key(claim.publisher, claim.run_id),
        )
    # A publisher publishes a run once per chain; two publications of one run can only sit on two forks
    # of an equivocating publisher, and then neither counts (see docs/ledger.md): the receipt is accepted
    # if it satisfies either policy.
    failures: list[InvalidEntry] = []
    for publication in publications:
        try:
            check_receipt_policy(entry.body, publication.policy)
            break
        except InvalidEntry as e:
            failures.append(e)
    else:
        raise failures[0]
    for earlier in view.receipts_for(entry.author, claim.publisher, claim.run_id, claim.epoch):
        if is_ancestor(view, earlier.id, earlier.seq, entry):
            raise InvalidEntry(f"a receipt for run {claim.run_id.hex()[:16]} epoch {claim.epoch} is already at seq {earlier.seq}")


def is_ancestor(view: LedgerView, candidate_id: bytes, candidate_seq: int, entry: Entry) -> bool:
    """Whether the entry `candidate_id` at `candidate_seq` (of the same author) lies on `entry`'s own
    chain below it.

    Below an author's lowest fork point each seq holds one entry, which every chain of that author passes
    through; above it, walk the prev links (only equivocating authors pay for this).
    """
    if candidate_seq >= entry.seq:
        return False
    fork = view.fork_seq(entry.author)
    if fork is None or candidate_seq < fork:
        return True
    ref = view.entry_ref(entry.prev)
    while ref is not None and ref.seq > candidate_seq:
        ref = view.entry_ref(ref.prev)
    return ref is not None and ref.id == candidate_id
