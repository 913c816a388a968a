"""A run's credit policy as the ledger enforces it: rate, witness quorum, the issuers who pay, and the bounds on what they may pay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pcompute import canonical, crypto
from p2pcompute.errors import InvalidMessage, InvalidSignature

# One credit is 1_000_000 micro-credits; amounts and balances are integers of micro-credits.
MICRO_PER_CREDIT = 1_000_000
# At most a million credits per sample: far above any sane price; the same bound as the run manifest's
# `credits.rate`. A payout whose samples x rate would not fit a signed 64-bit integer is invalid.
MAX_RATE = 10**12
MAX_AMOUNT = 2**63 - 1
# Witnesses come from one averaging group; hivemind groups are a handful of peers, 64 is generous
# and bounds the signature checks one payout can demand.
MAX_QUORUM = 64
# Issuers are the researcher's own keys (or validators they trust): a few at most.
MAX_ISSUERS = 16
# Epochs are SQLite INTEGERs; 2^31 is the manifest's bound on max_epochs.
MAX_EPOCHS = 1 << 31
# Samples one epoch may pay: the manifest's target_batch_size (<= 2^24) times (1 + slack <= 10).
MAX_EPOCH_CAP = 11 << 24


@dataclass(frozen=True)
class CreditPolicy:
    """What every replica checks a payout against (derived from the run's manifest, so every publication of one
    run has the same policy and one (peer, run, epoch) is paid at most once whoever published it).

    rate: micro-credits per sample; quorum: witness signatures (besides the claimant's) a payout's receipt needs;
    issuers: the keys that sign payouts, sorted and distinct; epoch E is paid only by `issuer_for(E)`, so its
    payouts sit in one hash chain and the bounds below are decided in that chain's order on every replica;
    max_epochs: epochs at or past it are never paid (0: no end); epoch_cap: samples one epoch pays in total;
    budget: micro-credits the run pays in total (0: no budget beyond epoch_cap), split evenly among issuers.
    """

    rate: int
    quorum: int
    issuers: tuple[bytes, ...] = ()
    max_epochs: int = 0
    epoch_cap: int = MAX_EPOCH_CAP
    budget: int = 0

    def __post_init__(self) -> None:
        canonical.uint(self.rate, 0, MAX_RATE, "policy rate")
        canonical.uint(self.quorum, 1, MAX_QUORUM, "policy quorum")
        if type(self.issuers) is not tuple or len(self.issuers) > MAX_ISSUERS:
            raise InvalidMessage(f"policy issuers must be a tuple of at most {MAX_ISSUERS} keys")
        for i, key in enumerate(self.issuers):
            canonical.fixed_bytes(key, crypto.PUBLIC_KEY_SIZE, f"policy issuer {i}")
            try:
                crypto.check_public_key(key)
            except InvalidSignature as e:
                raise InvalidMessage(f"policy issuer {i}: {e}") from None
        canonical.strictly_increasing(list(self.issuers), "policy issuers")
        if self.rate > 0 and not self.issuers:
            raise InvalidMessage("a run that pays credits needs at least one issuer")
        canonical.uint(self.max_epochs, 0, MAX_EPOCHS, "policy max_epochs")
        canonical.uint(self.epoch_cap, 1, MAX_EPOCH_CAP, "policy epoch_cap")
        canonical.uint(self.budget, 0, MAX_AMOUNT, "policy budget")

    @classmethod
    def create(cls, rate: int, quorum: int, issuers=(), **bounds) -> "CreditPolicy":
        """Build a policy from issuer keys in any order (sorted and de-duplicated here)."""
        return cls(rate, quorum, tuple(sorted(set(issuers))), **bounds)

    def amount_for(self, samples: int) -> int:
        """Micro-credits a payout for `samples` samples is worth under this policy."""
        return samples * self.rate

    def issuer_for(self, epoch: int) -> bytes | None:
        """The one key that may pay for `epoch` (None: the run pays nothing)."""
        return self.issuers[epoch % len(self.issuers)] if self.issuers else None

    def pays_epoch(self, epoch: int) -> bool:
        return self.max_epochs == 0 or epoch < self.max_epochs

    def issuer_budget(self) -> int | None:
        """Micro-credits each issuer may pay over the whole run (None: no budget)."""
        return self.budget // len(self.issuers) if self.budget and self.issuers else None

    def to_obj(self) -> list:
        return [self.rate, self.quorum, list(self.issuers), self.max_epochs, self.epoch_cap, self.budget]

    @classmethod
    def from_obj(cls, obj: Any) -> "CreditPolicy":
        rate, quorum, issuers, max_epochs, epoch_cap, budget = canonical.array(obj, 6, "policy")
        canonical.sequence(issuers, MAX_ISSUERS, "policy issuers")
        return cls(rate, quorum, tuple(issuers), max_epochs, epoch_cap, budget)
