"""A run's credit policy as the ledger records it: rate per sample, witness quorum, validator keys, the amount rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pcompute import crypto
from p2pcompute.errors import InvalidMessage, InvalidSignature
from p2pcompute import canonical

# One credit is 1_000_000 micro-credits; amounts and balances are integers of micro-credits.
MICRO_PER_CREDIT = 1_000_000
# At most a million credits per sample: far above any sane price; the same bound as the run manifest's
# `credits.rate`. A receipt whose samples x rate would not fit a signed 64-bit integer is invalid.
MAX_RATE = 10**12
MAX_AMOUNT = 2**63 - 1
# Witnesses come from one averaging group; hivemind groups are a handful of peers, 64 is generous
# and bounds the signature checks one receipt can demand.
MAX_QUORUM = 64
# Validators are researchers vouching for their own run: a few keys at most.
MAX_VALIDATORS = 16


@dataclass(frozen=True)
class CreditPolicy:
    """rate: micro-credits per sample; quorum: witness signatures (besides the claimant's) a receipt needs;
    validators: if not empty, at least one of these keys must be among a receipt's witnesses (a researcher
    vouching for work on their run; its signature counts towards the quorum). Sorted, distinct."""

    rate: int
    quorum: int
    validators: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        canonical.uint(self.rate, 0, MAX_RATE, "policy rate")
        canonical.uint(self.quorum, 1, MAX_QUORUM, "policy quorum")
        if type(self.validators) is not tuple or len(self.validators) > MAX_VALIDATORS:
            raise InvalidMessage(f"policy validators must be a tuple of at most {MAX_VALIDATORS} keys")
        for i, key in enumerate(self.validators):
            canonical.fixed_bytes(key, crypto.PUBLIC_KEY_SIZE, f"policy validator {i}")
            try:
                crypto.check_public_key(key)
            except InvalidSignature as e:
                raise InvalidMessage(f"policy validator {i}: {e}") from None
        canonical.strictly_increasing(list(self.validators), "policy validators")

    @classmethod
    def create(cls, rate: int, quorum: int, validators=()) -> "CreditPolicy":
        """Build a policy from values in any order; validators are sorted and de-duplicated."""
        return cls(rate, quorum, tuple(sorted(set(validators))))

    def amount_for(self, samples: int) -> int:
        """Micro-credits a receipt for `samples` samples earns under this policy."""
        return samples * self.rate

    def to_obj(self) -> list:
        return [self.rate, self.quorum, list(self.validators)]

    @classmethod
    def from_obj(cls, obj: Any) -> "CreditPolicy":
        rate, quorum, validators = canonical.array(obj, 3, "policy")
        canonical.sequence(validators, MAX_VALIDATORS, "policy validators")
        return cls(rate, quorum, tuple(validators))
