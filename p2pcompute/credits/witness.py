"""What a group mate checks before countersigning a claim: pure rules over what this peer observed in its rounds."""

from __future__ import annotations

import dataclasses

from p2pcompute.credits.claims import SignedClaim
from p2pcompute.credits.policy import CreditPolicy
from p2pcompute.errors import InvalidMessage

MAX_CLAIMS_PER_PAYLOAD = 4  # claims one round payload may carry (the latest epochs still lacking a receipt)
# The weight a reducer receives is a float; a claim may exceed it by this much (rounding), never by a sample.
WEIGHT_ROUNDING = 1e-6


@dataclasses.dataclass
class Observations:
    """Which peers this node saw in the successful claim rounds it was part of, under this node's OWN epoch at the
    time (a peer's declared epoch is not evidence), with the averaging weight each sent us as its reducer."""

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

    The witness vouches for what it saw: the claimant was a member of a successful round with this node while
    this node was in the claimed epoch, of this run, and sent this node (as its reducer) an averaging weight of
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
