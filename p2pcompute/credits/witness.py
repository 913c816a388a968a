"""What a group mate checks before countersigning a claim: pure rules over what this peer observed in its rounds."""

from __future__ import annotations

import dataclasses

from p2pcompute.credits.claims import SignedClaim
from p2pcompute.errors import InvalidMessage

# A peer's samples in one epoch: hivemind ends the epoch once the swarm has target_batch_size samples,
# so one peer can exceed the target only by what it accumulated while the round was being arranged.
# Twice the target is a generous bound; anything above it is not something a witness can vouch for.
MAX_SAMPLES_PER_TARGET = 2
MAX_CLAIMS_PER_PAYLOAD = 4  # claims one round payload may carry (the latest epochs still lacking a receipt)


@dataclasses.dataclass
class Observations:
    """Which (peer, epoch) pairs this node saw in successful gradient rounds it was part of."""

    seen: dict[bytes, set[int]] = dataclasses.field(default_factory=dict)  # peer public key -> epochs
    max_epochs_per_peer: int = 256  # bounded memory: older epochs are forgotten

    def record(self, peer: bytes, epoch: int) -> None:
        epochs = self.seen.setdefault(peer, set())
        epochs.add(epoch)
        while len(epochs) > self.max_epochs_per_peer:
            epochs.discard(min(epochs))

    def saw(self, peer: bytes, epoch: int) -> bool:
        return epoch in self.seen.get(peer, ())


def check_claim(signed: SignedClaim, *, sender: bytes, me: bytes, run_id: bytes, publisher: bytes,
                target_batch_size: int, observed: Observations) -> None:
    """Raise InvalidMessage naming why this node will not witness `signed`; return if it will.

    The witness vouches for what it saw: the claimant was a member of a successful gradient round with
    this node while in the claimed epoch, of this run, and claims a sample count the epoch allows. It
    cannot see the gradients' provenance: re-computing claimed batches is the audits' job (docs/credits.md).
    """
    claim = signed.claim
    signed.verify()
    if claim.peer != sender:
        raise InvalidMessage("the claim names another peer than the one who sent it")
    if claim.peer == me:
        raise InvalidMessage("a node does not witness its own claim")
    if claim.run_id != run_id or claim.publisher != publisher:
        raise InvalidMessage("the claim is for another run (or another publication of it)")
    if not observed.saw(claim.peer, claim.epoch):
        raise InvalidMessage(f"this node did not see the claimant in a round of epoch {claim.epoch}")
    if claim.samples > MAX_SAMPLES_PER_TARGET * target_batch_size:
        raise InvalidMessage(f"{claim.samples} samples in one epoch is more than {MAX_SAMPLES_PER_TARGET}x "
                             f"the run's target batch of {target_batch_size}")
