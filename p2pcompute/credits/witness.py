"""What a group mate checks before countersigning a claim: pure rules over what this peer observed in its rounds."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from p2pcompute.credits.claims import SignedClaim
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.errors import InvalidMessage

MAX_CLAIMS_PER_PAYLOAD = 4  # claims one round payload may carry (the latest epochs still lacking a receipt)
# The weight a reducer receives is a float; a claim may exceed it by this much (rounding), never by a sample.
WEIGHT_ROUNDING = 1e-6


# How far from a witness's own epoch the label of a round it was in may be. Members of one round declare epochs one
# apart when the round straddles their epoch ends (seen in the demo: {4, 5}, {11, 12}, {15, 16, 16}, 8 of 18 rounds);
# never more in an honest swarm.
ROUND_LABEL_SPAN = 1


def member_epochs(declared: Mapping[bytes, int], me: bytes) -> dict[bytes, int]:
    """The epoch this node (`me`, whose own declaration is in `declared`) records each other member of a round under:
    the epoch that member declared, which is the epoch its own claim for the round carries, when it is within
    ROUND_LABEL_SPAN of this node's; else this node's epoch.

    Why the member's own epoch: what a member sends in a gradient round is its accumulated gradients of the epoch it
    declares (hivemind resets them at each epoch end), and its work commitment, which audits recompute, is per epoch of
    its own. Labelled so, a claim's samples, the weight its witnesses saw and its commitment are the same samples. Until
    2026-12-07 both sides labelled a round with the member's mates' most common epoch: a member one epoch behind its
    mates then claimed its epoch-E samples under E+1, whose commitment held other samples or none (seen in CI:
    "claiming the 32 samples averaged of the 128 committed"; and a claim without a commitment is withheld when drawn
    for an audit). Before that a witness used its own epoch alone and refused every claim of a round whose members
    were one epoch apart (31 refusals and 4-6 of 20 epochs unpaid per node in the demo).

    A member moves its label at most ROUND_LABEL_SPAN from each witness's epoch, and declares one epoch per round: it
    is paid at most once per round it was in (a (peer, epoch) is paid once), for at most the weight it sent."""
    mine = declared[me]
    return {key: epoch if abs(epoch - mine) <= ROUND_LABEL_SPAN else mine
            for key, epoch in declared.items() if key != me}


@dataclasses.dataclass
class Observations:
    """Which peers this node saw in the successful claim rounds it was part of, under the round's epoch as
    `member_epochs` bounds it by this node's own (a peer's declared epoch alone is no evidence), with the averaging
    weight each sent us as its reducer."""

    seen: dict[bytes, dict[int, float | None]] = dataclasses.field(default_factory=dict)  # peer -> epoch -> weight
    max_epochs_per_peer: int = 256  # bounded memory: older epochs are forgotten

    def record(self, peer: bytes, epoch: int, weight: float | None) -> None:
        """`peer` was in our round while we were in `epoch`, and sent us `weight` (None: we reduced nothing of
        it). Several rounds in one epoch keep the largest weight seen."""
        epochs = self.seen.setdefault(peer, {})
        old = epochs.get(epoch)
        epochs[epoch] = weight if old is None else old if weight is None else max(old, weight)
        while len(epochs) > self.max_epochs_per_peer:
            del epochs[min(epochs)]

    def saw(self, peer: bytes, epoch: int) -> bool:
        return epoch in self.seen.get(peer, {})

    def weight(self, peer: bytes, epoch: int) -> float | None:
        return self.seen.get(peer, {}).get(epoch)


def check_claim(signed: SignedClaim, *, sender: bytes, me: bytes, run_id: bytes, policy: CreditPolicy,
                observed: Observations) -> None:
    """Raise InvalidMessage naming why this node will not witness `signed`; return if it will.

    The witness vouches for what it saw: the claimant was a member of a successful round with this node that it
    records under the claimed epoch (`member_epochs`: within one epoch of this node's own), of this run, and sent this node (as its reducer) an averaging weight of
    at least the claimed samples; the epoch is one the run pays. It cannot see the gradients' provenance:
    re-computing claimed batches is the audits' job (docs/credits.md).
    """
    claim = signed.claim
    signed.verify()
    if claim.peer != sender:
        raise InvalidMessage("the claim names another peer than the one who sent it")
    if claim.peer == me:
        raise InvalidMessage("a node does not witness its own claim")
    if claim.run_id != run_id:
        raise InvalidMessage("the claim is for another run")
    if not policy.pays_epoch(claim.epoch):
        raise InvalidMessage(f"epoch {claim.epoch} is past the run's max_epochs ({policy.max_epochs})")
    if not observed.saw(claim.peer, claim.epoch):
        raise InvalidMessage(f"this node was not in a round with the claimant during its own epoch {claim.epoch}")
    weight = observed.weight(claim.peer, claim.epoch)
    if weight is None:
        raise InvalidMessage(f"this node reduced nothing of the claimant's in epoch {claim.epoch}: it cannot vouch "
                             "for its samples")
    if claim.samples > weight + WEIGHT_ROUNDING:
        raise InvalidMessage(f"{claim.samples} samples claimed, but the claimant averaged with a weight of {weight:g}")
    if claim.samples > policy.epoch_cap:
        raise InvalidMessage(f"{claim.samples} samples in one epoch is more than the run pays per epoch "
                             f"({policy.epoch_cap})")
