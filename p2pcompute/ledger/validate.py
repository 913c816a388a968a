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
from p2pcompute.errors import InvalidEntry, InvalidManifest, InvalidMessage, InvalidSignature, MissingDependency
from p2pcompute.ledger.codec import (GENESIS_PREV, KIND_AUDIT, KIND_PAYOUT, KIND_RUN_PUBLISH, Entry, PayoutBody,
                                     policy_of)


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


@dataclass(frozen=True)
class PayoutRef:
    """A stored payout as the issuer-chain rules need it."""

    ref: EntryRef
    run_id: bytes
    epoch: int
    peer: bytes
    samples: int
    amount: int


@dataclass(frozen=True)
class Tally:
    """What an issuer's chain already paid below some seq: for one (peer, epoch), one epoch, and the whole run."""

    peer_epoch_payouts: int
    epoch_samples: int
    run_amount: int


class LedgerView(Protocol):
    """Read access to the entries a replica already holds (the store, plus a batch being ingested)."""

    def entry_ref(self, entry_id: bytes) -> EntryRef | None: ...

    def fork_seq(self, author: bytes) -> int | None:
        """Lowest seq at which `author` has two or more entries (an equivocation), None if none."""

    def publications(self, publisher: bytes, run_id: bytes) -> list[Publication]:
        """`publisher`'s run.publish entries for `run_id` (more than one only on forks of an equivocator)."""

    def run_policy(self, run_id: bytes) -> CreditPolicy | None:
        """The policy of `run_id` (the same in every publication of it: it is derived from the manifest)."""

    def tally(self, issuer: bytes, run_id: bytes, epoch: int, peer: bytes, below_seq: int,
              with_budget: bool = True) -> Tally:
        """Sums over `issuer`'s payouts for `run_id` at seqs below `below_seq` (all of them, on any fork); the run's
        amount only `with_budget` (0 otherwise)."""

    def payouts_of(self, issuer: bytes, run_id: bytes) -> list[PayoutRef]:
        """Every payout of `issuer` for `run_id`, on any of its forks."""

    def payout(self, entry_id: bytes) -> PayoutRef | None:
        """The stored payout `entry_id` (None if there is none)."""


def entry_key(entry_id: bytes) -> tuple:
    """Dependency key of an entry (what a pending entry waits for)."""
    return ("entry", entry_id)


def run_key(run_id: bytes) -> tuple:
    """Dependency key of a run (any publication of it)."""
    return ("run", run_id)


def provided_keys(entry: Entry) -> list[tuple]:
    """The dependency keys an entry satisfies once stored."""
    keys = [entry_key(entry.id)]
    if entry.kind == KIND_RUN_PUBLISH:
        keys.append(run_key(entry.body.run_id))
    return keys


# ---- checks of the entry alone ------------------------------------------------------------------


def check_entry(entry: Entry) -> None:
    """Everything that needs no other entry: genesis rule, the author's signature, the body's own rules
    (run_id = digest(manifest), the policy is the one the manifest implies; every signature in a payout's
    receipt verifies).

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
        _check_publish_body(entry)
    elif entry.kind == KIND_PAYOUT:
        try:
            entry.body.receipt.verify_signatures()
        except InvalidSignature as e:
            raise InvalidEntry(f"payout receipt {e}") from None


def _check_publish_body(entry: Entry) -> None:
    from p2pcompute.runs.manifest import Manifest

    body = entry.body
    if crypto.digest(body.manifest) != body.run_id:
        raise InvalidEntry("run_id is not the digest of the manifest")
    try:
        expected = policy_of(Manifest.from_wire(body.manifest))
    except (InvalidManifest, InvalidMessage) as e:
        raise InvalidEntry(f"the published manifest: {e}") from None
    if body.policy != expected:
        raise InvalidEntry("the policy is not the one the manifest implies (credits section, max_epochs, target batch)")


def check_payout_policy(body: PayoutBody, policy: CreditPolicy, issuer: bytes) -> None:
    """A payout against its run's policy alone: signed by the epoch's issuer, an epoch the run pays, a quorum of
    witnesses, within the epoch cap, amount = samples x rate. (Witnesses are distinct and exclude the claimant
    by construction, see `credits.claims.Receipt`; their signatures are checked by `check_entry`.)"""
    claim = body.receipt.claim
    if policy.issuer_for(claim.epoch) != issuer:
        raise InvalidEntry(f"the payout for epoch {claim.epoch} is not signed by the run's issuer for that epoch")
    if not policy.pays_epoch(claim.epoch):
        raise InvalidEntry(f"epoch {claim.epoch} is past the run's max_epochs ({policy.max_epochs})")
    witnesses = len(body.receipt.witnesses)
    if witnesses < policy.quorum:
        raise InvalidEntry(f"the receipt has {witnesses} witness signatures, the run's quorum is {policy.quorum}")
    if claim.samples > policy.epoch_cap:
        raise InvalidEntry(f"{claim.samples} samples are more than one epoch of the run pays ({policy.epoch_cap})")
    # the exact amount depends on what the issuer's chain paid for the epoch before (`payout_samples`); alone, a
    # payout is at most samples x rate, in whole samples
    full = policy.amount_for(claim.samples)
    if body.amount > full or (policy.rate and (body.amount % policy.rate or not body.amount)):
        raise InvalidEntry(f"payout amount {body.amount} is not a whole number of samples, 1 to {claim.samples}, x rate "
                           f"{policy.rate}")


def payout_samples(policy: CreditPolicy, claim_samples: int, epoch_samples: int) -> int:
    """The samples a payout of a claim of `claim_samples` pays (its amount is that x the rate), when its issuer's chain
    below it paid claims of `epoch_samples` for the epoch: all of them while they fit under the epoch's cap, else
    what is left of the cap (the payout that reaches the cap is cut to fit it; 0: the epoch is full). An honest
    volunteer whose claim comes after an epoch overshot its target is paid the rest, not refused outright (seen in
    the NAT test: 7,296 samples against a cap of 6,144 left a NATed node's whole epoch unpaid).

    `epoch_samples` sums claimed samples, not paid ones: they are the same below the one payout that reached the cap,
    after which nothing more is paid either way."""
    return max(0, min(claim_samples, policy.epoch_cap - epoch_samples))


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
    elif entry.kind == KIND_PAYOUT:
        _check_payout(entry, view)
    elif entry.kind == KIND_AUDIT:
        _check_audit(entry, view)


def validate(entry: Entry, view: LedgerView) -> None:
    """All rules: `check_entry` then `check_in_context`."""
    check_entry(entry)
    check_in_context(entry, view)


def _check_publish(entry: Entry, view: LedgerView) -> None:
    for earlier in view.publications(entry.author, entry.body.run_id):
        if is_ancestor(view, earlier.entry_id, earlier.seq, entry):
            raise InvalidEntry(f"run {entry.body.run_id.hex()} was already published by this author at seq {earlier.seq}")


def _check_payout(entry: Entry, view: LedgerView) -> None:
    """The issuer-chain rules: in the issuer's own chain below this payout, no payout for the same (peer, epoch),
    the epoch's payouts stay within its cap, and the issuer's payouts within its share of the budget."""
    claim = entry.body.receipt.claim
    policy = view.run_policy(claim.run_id)
    if policy is None:
        raise MissingDependency(f"run {claim.run_id.hex()} is not here yet", run_key(claim.run_id))
    check_payout_policy(entry.body, policy, entry.author)
    budget = policy.issuer_budget()
    tally = chain_tally(view, entry, claim.run_id, claim.epoch, claim.peer, with_budget=budget is not None)
    if tally.peer_epoch_payouts:
        raise InvalidEntry(f"epoch {claim.epoch} of run {claim.run_id.hex()[:16]} was already paid to this peer")
    paid = payout_samples(policy, claim.samples, tally.epoch_samples)
    if not paid:
        raise InvalidEntry(f"epoch {claim.epoch} would pay {tally.epoch_samples + claim.samples} samples, over its cap "
                           f"of {policy.epoch_cap} (which its payouts already reached)")
    if entry.body.amount != policy.amount_for(paid):
        raise InvalidEntry(f"the payout for epoch {claim.epoch} must pay {paid} of its {claim.samples} samples (what is "
                           f"left under the epoch's cap of {policy.epoch_cap}) x rate {policy.rate} = "
                           f"{policy.amount_for(paid)} micro-credits, not {entry.body.amount}")
    if budget is not None and tally.run_amount + entry.body.amount > budget:
        raise InvalidEntry(f"the payout would take this issuer past its share of the run's budget ({budget} micro-credits)")


def _check_audit(entry: Entry, view: LedgerView) -> None:
    """An audit is signed by one of the run's issuers and names a stored payout as it is (peer, run, epoch)."""
    body = entry.body
    policy = view.run_policy(body.run_id)
    if policy is None:
        raise MissingDependency(f"run {body.run_id.hex()} is not here yet", run_key(body.run_id))
    if entry.author not in policy.issuers:
        raise InvalidEntry("only the run's issuers audit its payouts")
    payout = view.payout(body.payout_id)
    if payout is None:
        raise MissingDependency(f"audited payout {body.payout_id.hex()} is not here yet", entry_key(body.payout_id))
    if (payout.peer, payout.epoch, payout.run_id) != (body.peer, body.epoch, body.run_id):
        raise InvalidEntry("the audit does not describe the payout it names (peer, run or epoch differ)")


def chain_tally(view: LedgerView, entry: Entry, run_id: bytes, epoch: int, peer: bytes,
                with_budget: bool = True) -> Tally:
    """What `entry`'s author paid for `run_id` on `entry`'s own chain below it. Below the author's fork point
    (if any) every stored payout is on that chain (one SQL sum); an equivocator's are filtered by ancestry."""
    fork = view.fork_seq(entry.author)
    if fork is None or fork >= entry.seq:
        return view.tally(entry.author, run_id, epoch, peer, entry.seq, with_budget)
    same, epoch_samples, run_amount = 0, 0, 0
    for p in view.payouts_of(entry.author, run_id):
        if is_ancestor(view, p.ref.id, p.ref.seq, entry):
            same += p.epoch == epoch and p.peer == peer
            epoch_samples += p.samples if p.epoch == epoch else 0
            run_amount += p.amount
    return Tally(same, epoch_samples, run_amount)


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
