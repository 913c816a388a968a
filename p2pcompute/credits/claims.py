"""Claims, witness signatures and receipts: the signed records of who did how much work on which run and epoch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Iterable

from p2pcompute import canonical, crypto
from p2pcompute.crypto import Signer
from p2pcompute.errors import InvalidMessage, InvalidSignature

CLAIM_VERSION = 1
# Domain separation: every kind of thing we sign starts with its own tag, so a signature made for
# one purpose (a claim, a witness statement, a ledger entry) can never be replayed as another.
CLAIM_DOMAIN = b"p2pcompute/credits/claim/v1\x00"
WITNESS_DOMAIN = b"p2pcompute/credits/witness/v1\x00"

# Samples one peer claims for one epoch: 2^32 - 1 is millions of times a real epoch, and with
# policy.MAX_RATE keeps samples x rate inside a signed 64-bit integer.
MAX_SAMPLES = 2**32 - 1
# Epochs and sequence numbers are stored as SQLite INTEGERs (signed 64-bit).
MAX_EPOCH = 2**63 - 1
# hivemind group ids are 20-byte DHTIDs; 32 leaves room for another scheme.
MAX_GROUP_ID_SIZE = 32
# More witnesses than the largest quorum is pointless; the cap bounds the signature checks per receipt.
MAX_WITNESSES = 64
# A claim is ~190 bytes; a receipt with MAX_WITNESSES witnesses ~6.6 KiB.
MAX_CLAIM_SIZE = 512
MAX_RECEIPT_SIZE = 8 * 1024


@dataclass(frozen=True)
class Claim(canonical.WireRecord):
    """One peer's statement of work: `samples` samples processed in `epoch` of the run `run_id` as
    published by `publisher` (anyone can republish a manifest, so the claim names whose publication,
    and therefore whose credit policy, the work was done under).

    group_id: the averaging round's group id (empty if none); work_digest: a digest of the peer's
    published progress for that epoch, opaque to the ledger, kept for auditors.
    """

    run_id: bytes
    publisher: bytes
    epoch: int
    peer: bytes
    samples: int
    group_id: bytes = b""
    work_digest: bytes = bytes(crypto.DIGEST_SIZE)

    WIRE_NAME: ClassVar[str] = "claim"
    MAX_WIRE_SIZE: ClassVar[int] = MAX_CLAIM_SIZE

    def __post_init__(self) -> None:
        canonical.fixed_bytes(self.run_id, crypto.DIGEST_SIZE, "claim run_id")
        canonical.fixed_bytes(self.publisher, crypto.PUBLIC_KEY_SIZE, "claim publisher")
        canonical.uint(self.epoch, 0, MAX_EPOCH, "claim epoch")
        canonical.fixed_bytes(self.peer, crypto.PUBLIC_KEY_SIZE, "claim peer")
        canonical.uint(self.samples, 1, MAX_SAMPLES, "claim samples")
        canonical.var_bytes(self.group_id, 0, MAX_GROUP_ID_SIZE, "claim group_id")
        canonical.fixed_bytes(self.work_digest, crypto.DIGEST_SIZE, "claim work_digest")

    def to_obj(self) -> list:
        return [
            CLAIM_VERSION,
            self.run_id,
            self.publisher,
            self.epoch,
            self.peer,
            self.samples,
            self.group_id,
            self.work_digest,
        ]

    @classmethod
    def from_obj(cls, obj: Any) -> "Claim":
        version, *fields = canonical.array(obj, 8, "claim")
        if type(version) is not int or version != CLAIM_VERSION:
            raise InvalidMessage(f"unknown claim version {version!r}")
        return cls(*fields)

    @cached_property
    def wire(self) -> bytes:
        """The canonical bytes that the claimant and the witnesses sign (after their domain tags)."""
        return canonical.pack(self.to_obj())

    def to_wire(self) -> bytes:
        return self.wire

    def sign(self, signer: Signer) -> "SignedClaim":
        if signer.public_key != self.peer:
            raise InvalidMessage("only the claimed peer can sign its claim")
        return SignedClaim(self, signer.sign(CLAIM_DOMAIN + self.wire))

    def witness(self, signer: Signer) -> "WitnessSignature":
        """Countersign this claim (the caller has checked it against what it observed)."""
        if signer.public_key == self.peer:
            raise InvalidMessage("a peer cannot witness its own claim")
        return WitnessSignature(signer.public_key, signer.sign(WITNESS_DOMAIN + self.wire))


@dataclass(frozen=True)
class SignedClaim(canonical.WireRecord):
    """A claim with the claimant's signature: what a peer hands its group mates in the averaging round."""

    claim: Claim
    signature: bytes

    WIRE_NAME: ClassVar[str] = "signed claim"
    MAX_WIRE_SIZE: ClassVar[int] = MAX_CLAIM_SIZE + 2 + 2 + crypto.SIGNATURE_SIZE

    def __post_init__(self) -> None:
        canonical.fixed_bytes(self.signature, crypto.SIGNATURE_SIZE, "claim signature")

    def verify(self) -> None:
        """Raise InvalidSignature unless the claimed peer signed this claim."""
        try:
            crypto.verify(self.claim.peer, CLAIM_DOMAIN + self.claim.wire, self.signature)
        except InvalidSignature as e:
            raise InvalidSignature(f"claimant signature: {e}") from None

    def to_obj(self) -> list:
        return [self.claim.to_obj(), self.signature]

    @classmethod
    def from_obj(cls, obj: Any) -> "SignedClaim":
        claim, signature = canonical.array(obj, 2, "signed claim")
        return cls(Claim.from_obj(claim), signature)


@dataclass(frozen=True)
class WitnessSignature(canonical.WireRecord):
    """A group mate's countersignature of a claim."""

    witness: bytes
    signature: bytes

    WIRE_NAME: ClassVar[str] = "witness signature"
    MAX_WIRE_SIZE: ClassVar[int] = 1 + 2 + crypto.PUBLIC_KEY_SIZE + 2 + crypto.SIGNATURE_SIZE

    def __post_init__(self) -> None:
        canonical.fixed_bytes(self.witness, crypto.PUBLIC_KEY_SIZE, "witness key")
        canonical.fixed_bytes(self.signature, crypto.SIGNATURE_SIZE, "witness signature")

    def verify(self, claim: Claim) -> None:
        try:
            crypto.verify(self.witness, WITNESS_DOMAIN + claim.wire, self.signature)
        except InvalidSignature as e:
            raise InvalidSignature(f"witness {self.witness.hex()[:16]}: {e}") from None

    def to_obj(self) -> list:
        return [self.witness, self.signature]

    @classmethod
    def from_obj(cls, obj: Any) -> "WitnessSignature":
        witness, signature = canonical.array(obj, 2, "witness signature")
        return cls(witness, signature)


@dataclass(frozen=True)
class Receipt(canonical.WireRecord):
    """A signed claim plus witness signatures from distinct peers other than the claimant, sorted by key.

    Whether it meets a run's quorum and validator set is a ledger rule (`ledger.validate`), since the
    policy lives in the run's `run.publish` entry.
    """

    claim: Claim
    claimant_signature: bytes
    witnesses: tuple[WitnessSignature, ...]

    WIRE_NAME: ClassVar[str] = "receipt"
    MAX_WIRE_SIZE: ClassVar[int] = MAX_RECEIPT_SIZE

    def __post_init__(self) -> None:
        canonical.fixed_bytes(self.claimant_signature, crypto.SIGNATURE_SIZE, "claimant signature")
        if type(self.witnesses) is not tuple or len(self.witnesses) > MAX_WITNESSES:
            raise InvalidMessage(f"receipt witnesses must be a tuple of at most {MAX_WITNESSES}")
        keys = [w.witness for w in self.witnesses]
        canonical.strictly_increasing(keys, "receipt witnesses")
        if self.claim.peer in keys:
            raise InvalidMessage("the claimant cannot witness its own claim")

    @classmethod
    def assemble(cls, signed: SignedClaim, signatures: Iterable[WitnessSignature]) -> "Receipt":
        """Build a receipt from whatever group mates returned: keeps each valid signature of a distinct
        peer other than the claimant, drops the rest (a faulty mate cannot spoil the receipt)."""
        signed.verify()
        by_key: dict[bytes, WitnessSignature] = {}
        for sig in signatures:
            if sig.witness == signed.claim.peer or sig.witness in by_key:
                continue
            try:
                sig.verify(signed.claim)
            except InvalidSignature:
                continue
            by_key[sig.witness] = sig
        chosen = tuple(by_key[k] for k in sorted(by_key))[:MAX_WITNESSES]
        return cls(signed.claim, signed.signature, chosen)

    @property
    def witness_keys(self) -> tuple[bytes, ...]:
        return tuple(w.witness for w in self.witnesses)

    def verify_signatures(self) -> None:
        """Raise InvalidSignature naming the first signature (claimant's or a witness's) that fails."""
        SignedClaim(self.claim, self.claimant_signature).verify()
        for w in self.witnesses:
            w.verify(self.claim)

    def to_obj(self) -> list:
        return [self.claim.to_obj(), self.claimant_signature, [w.to_obj() for w in self.witnesses]]

    @classmethod
    def from_obj(cls, obj: Any) -> "Receipt":
        claim, claimant_signature, witnesses = canonical.array(obj, 3, "receipt")
        canonical.sequence(witnesses, MAX_WITNESSES, "receipt witnesses")
        return cls(
            Claim.from_obj(claim),
            claimant_signature,
            tuple(WitnessSignature.from_obj(w) for w in witnesses),
        )
