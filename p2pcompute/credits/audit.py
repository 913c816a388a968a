"""Audits by recomputation, the pure part: work commitments (a Merkle root over per-step sketches), verifiably random
selection of what to audit, and the audit report with its verdict rule, re-checkable offline by anyone.

How the pieces fit (docs/credits.md, "Audits"):

* While training epoch E, a peer sketches the gradient of every step s (credits/sketch.py, basis seeded by run, E and
  the digest of E's start state) and keeps the sketches. At the end of E it commits: `WorkCommitment` (run, peer,
  epoch, steps, batch size, start-state digest, Merkle root of the step sketches); `commitment.digest` is the claim's
  `work_digest`, so the claimant's signature on the claim binds every step sketch.
* An auditor (an issuer of the run) draws a ticket per claim: its Ed25519 signature over the claim's id. The claim is
  audited iff H(ticket) < rate; the steps to recompute are derived from the ticket too. The claimant cannot predict
  either (it lacks the auditor's key), the auditor cannot pick them (its signature is fixed by its key: RFC 8032
  signing is deterministic; see `audit_ticket` for the limit of that).
* The claimant reveals the sketches of those steps with their Merkle paths (`StepReveal`); the auditor recomputes
  the same steps from the start state (training/work.py) and `judge`s. The `AuditReport` holds all of it: anyone with
  the manifest and a copy of the start state (named by its digest) can re-check the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Sequence

from p2pcompute import canonical, crypto
from p2pcompute.credits.claims import Claim
from p2pcompute.credits.sketch import SKETCH_BYTES, distance_ppm, unpack_sketch
from p2pcompute.crypto import Signer
from p2pcompute.errors import InvalidMessage

COMMITMENT_VERSION = 1
REPORT_VERSION = 1
WORK_DOMAIN = b"p2pcompute/credits/work/v1\x00"
LEAF_DOMAIN = b"p2pcompute/credits/work-leaf/v1\x00"
NODE_DOMAIN = b"p2pcompute/credits/work-node/v1\x00"
TICKET_DOMAIN = b"p2pcompute/credits/audit-ticket/v1\x00"
DRAW_DOMAIN = b"p2pcompute/credits/audit-draw/v1\x00"
SUBJECT_DOMAIN = b"p2pcompute/credits/audit-subject/v1\x00"

# Steps in one peer's epoch: target_batch_size (at most 2^24) at one sample per step. Merkle paths are then at most
# 24 hashes long.
MAX_STEPS = 1 << 24
MAX_PROOF = 24
MAX_BATCH_SIZE = 65536  # the manifest's bound on batch_size_per_step
MAX_EPOCH = 2**63 - 1
# Steps recomputed per audited claim, at most. One fabricated step is caught by one check; a claimant that faked a
# fraction f of its steps is caught with 1 - (1 - f)^s by s checks: 64 checks catch f = 7% with 99%.
MAX_SPOT_STEPS = 64
# Default checks per audited claim (scripts/bench_cheat.py): 8 checks catch a claim with 25% of its steps faked with
# 90%, and cost 8 forward/backward passes, ~0.1-0.4% of a demo peer's epoch (docs/benchmarks.md).
SPOT_STEPS = 8
# Relative distance (ppm) above which a step sketch does not match its fp32 recomputation, by the precision the claimant
# computed in. Measured (scripts/bench_audit_tolerance.py, docs/credits.md "Audits", demo MLP and a CNN, 64 steps each):
# honest fp32 recomputations in another process with another thread count differ by 0-1 ppm; bf16 autocast (a GPU's
# mixed precision, emulated on the CPU) by 5,000-77,000 ppm; the closest fabrication, a gradient on 15/16 of the batch,
# by 88,000 ppm and more (median 250,000), a gradient on half the batch by 310,000 and more, another peer's batch, a
# stale gradient, a random one or zeros by 570,000 and more. fp32: 1,000 ppm is 1,000x the honest drift and 88x below
# the closest fabrication. Mixed precision: 250,000 ppm is 3x the bf16 drift and still below every fabrication but the
# 15/16 batch (mixed-precision peers can shave a few percent of a batch; they cannot fake a step).
PRECISIONS = ("fp32", "bf16", "fp16")
TOLERANCE_PPM = {"fp32": 1_000, "bf16": 250_000, "fp16": 250_000}
PPM = 10**6
VERDICTS = ("pass", "fail", "inconclusive")
MAX_REASON = 200
# A report with MAX_SPOT_STEPS reveals: 64 x (2 x 128 sketch bytes + 24 x 32 proof bytes) ~ 66 KiB, plus the rest.
MAX_REPORT_SIZE = 80 * 1024
MAX_REVEAL_SIZE = SKETCH_BYTES + (MAX_PROOF + 1) * (crypto.DIGEST_SIZE + 2) + 64


@dataclass(frozen=True)
class WorkCommitment(canonical.WireRecord):
    """What one peer commits to for one epoch: `steps` steps of `batch_size` samples from the start state whose digest
    is `state_digest`, in `precision` (PRECISIONS: fp32, or a GPU's bf16/fp16 autocast), summed up in `root` (a
    Merkle root over the leaves).

    segment 0 (gradients mode): one leaf per step, the sketch of its gradient, every step at the start state.
    segment K (local mode): one leaf per K steps (the last one may be shorter), the digest of the full training state
    (parameters and inner optimizer) where the segment starts and the sketch of the parameters' change over it."""

    run_id: bytes
    peer: bytes
    epoch: int
    steps: int
    batch_size: int
    state_digest: bytes
    root: bytes
    precision: str = "fp32"
    segment: int = 0

    WIRE_NAME: ClassVar[str] = "work commitment"
    MAX_WIRE_SIZE: ClassVar[int] = 256

    def __post_init__(self) -> None:
        canonical.fixed_bytes(self.run_id, crypto.DIGEST_SIZE, "commitment run_id")
        canonical.fixed_bytes(self.peer, crypto.PUBLIC_KEY_SIZE, "commitment peer")
        canonical.uint(self.epoch, 0, MAX_EPOCH, "commitment epoch")
        canonical.uint(self.steps, 1, MAX_STEPS, "commitment steps")
        canonical.uint(self.batch_size, 1, MAX_BATCH_SIZE, "commitment batch_size")
        canonical.fixed_bytes(self.state_digest, crypto.DIGEST_SIZE, "commitment state_digest")
        canonical.fixed_bytes(self.root, crypto.DIGEST_SIZE, "commitment root")
        if self.precision not in PRECISIONS:
            raise InvalidMessage(f"commitment precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        canonical.uint(self.segment, 0, MAX_STEPS, "commitment segment")

    def to_obj(self) -> list:
        return [COMMITMENT_VERSION, self.run_id, self.peer, self.epoch, self.steps, self.batch_size,
                self.state_digest, self.root, self.precision, self.segment]

    @classmethod
    def from_obj(cls, obj: Any) -> "WorkCommitment":
        return cls(*canonical.versioned(obj, 10, COMMITMENT_VERSION, "work commitment"))

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size

    @property
    def leaves(self) -> int:
        """Leaves under the root: one per step, or one per segment."""
        return self.steps if not self.segment else -(-self.steps // self.segment)

    def leaf_steps(self, leaf: int) -> range:
        """The steps leaf `leaf` covers."""
        if not self.segment:
            return range(leaf, leaf + 1)
        return range(leaf * self.segment, min(self.steps, (leaf + 1) * self.segment))

    @property
    def tolerance_ppm(self) -> int:
        """The least tolerance an audit of this commitment may use."""
        return TOLERANCE_PPM[self.precision]

    @cached_property
    def digest(self) -> bytes:
        """The claim's `work_digest`."""
        return crypto.digest(WORK_DOMAIN + self.to_wire())


# ---- Merkle tree over the step leaves -----------------------------------------------------------------------


def leaf_hash(index: int, sketch: bytes, start: bytes = b"") -> bytes:
    """Leaf `index`: its sketch and, for a segment, the digest of the state it starts from (b"" for a step)."""
    canonical.fixed_bytes(sketch, SKETCH_BYTES, "leaf sketch")
    return crypto.digest(LEAF_DOMAIN + canonical.pack([index, sketch, start]))


def _node(left: bytes, right: bytes) -> bytes:
    return crypto.digest(NODE_DOMAIN + left + right)


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level from the leaves up; a level's odd last node is carried up unchanged."""
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append([_node(below[i], below[i + 1]) if i + 1 < len(below) else below[i]
                       for i in range(0, len(below), 2)])
    return levels


def _leaf_hashes(sketches: Sequence[bytes], starts: Sequence[bytes]) -> list[bytes]:
    if starts and len(starts) != len(sketches):
        raise ValueError("one start digest per segment")
    return [leaf_hash(i, s, starts[i] if starts else b"") for i, s in enumerate(sketches)]


def merkle_root(sketches: Sequence[bytes], starts: Sequence[bytes] = ()) -> bytes:
    """The root over leaves 0..n-1 (n >= 1): step sketches, or segment sketches with their start digests."""
    if not sketches:
        raise ValueError("no steps to commit to")
    return _levels(_leaf_hashes(sketches, starts))[-1][0]


def merkle_proofs(sketches: Sequence[bytes], steps: Sequence[int], starts: Sequence[bytes] = ()
                  ) -> list[tuple[bytes, ...]]:
    """The Merkle path of each of leaves `steps` (sibling hashes from the leaf up; none where a node is carried up)."""
    levels = _levels(_leaf_hashes(sketches, starts))
    proofs = []
    for index in steps:
        path = []
        for level in levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index //= 2
        proofs.append(tuple(path))
    return proofs


def proof_root(count: int, step: int, sketch: bytes, proof: Sequence[bytes], start: bytes = b"") -> bytes | None:
    """The root that `proof` leads to from leaf `step` of `count` leaves; None if its length does not fit the tree."""
    node, index, width, used = leaf_hash(step, sketch, start), step, count, 0
    while width > 1:
        if index ^ 1 < width:
            if used == len(proof):
                return None
            sibling = proof[used]
            used += 1
            node = _node(sibling, node) if index & 1 else _node(node, sibling)
        index, width = index // 2, (width + 1) // 2
    return node if used == len(proof) else None


@dataclass(frozen=True)
class StepReveal(canonical.WireRecord):
    """The claimant's answer for one audited leaf (a step, or a segment): its committed sketch, Merkle path and, for a
    segment, the digest of the state it starts from."""

    step: int
    sketch: bytes
    proof: tuple[bytes, ...]
    start: bytes = b""

    WIRE_NAME: ClassVar[str] = "step reveal"
    MAX_WIRE_SIZE: ClassVar[int] = MAX_REVEAL_SIZE

    def __post_init__(self) -> None:
        canonical.uint(self.step, 0, MAX_STEPS - 1, "reveal step")
        canonical.fixed_bytes(self.sketch, SKETCH_BYTES, "reveal sketch")
        if type(self.proof) is not tuple or len(self.proof) > MAX_PROOF:
            raise InvalidMessage(f"reveal proof must be a tuple of at most {MAX_PROOF} hashes")
        for h in self.proof:
            canonical.fixed_bytes(h, crypto.DIGEST_SIZE, "reveal proof hash")
        if self.start:
            canonical.fixed_bytes(self.start, crypto.DIGEST_SIZE, "reveal start")

    def to_obj(self) -> list:
        return [self.step, self.sketch, list(self.proof), self.start]

    @classmethod
    def from_obj(cls, obj: Any) -> "StepReveal":
        step, sketch, proof, start = canonical.array(obj, 4, "step reveal")
        return cls(step, sketch, tuple(canonical.sequence(proof, MAX_PROOF, "reveal proof")), start)

    def check(self, commitment: WorkCommitment) -> None:
        """Raise InvalidMessage unless this is leaf `step` of the commitment (the claimant's own signed work)."""
        if bool(self.start) != bool(commitment.segment):
            raise InvalidMessage(f"leaf {self.step}: a start digest goes with segments, and only with them")
        if self.step >= commitment.leaves or proof_root(commitment.leaves, self.step, self.sketch, self.proof,
                                                        self.start) != commitment.root:
            raise InvalidMessage(f"leaf {self.step}: the revealed sketch is not the one committed to")


# ---- which claims and which steps ------------------------------------------------------------------------------


def audit_subject(run_id: bytes, peer: bytes, epoch: int) -> bytes:
    """The id an issuer's ticket signs for a claim in the credit flow: (run, claimant, epoch), not the claim's bytes, so
    a claimant that words its claim for one epoch several ways (other samples, group id) and gets each witnessed still
    draws one ticket, and a selected epoch stays selected whatever claim for it comes next."""
    canonical.fixed_bytes(run_id, crypto.DIGEST_SIZE, "audit run_id")
    canonical.fixed_bytes(peer, crypto.PUBLIC_KEY_SIZE, "audit peer")
    canonical.uint(epoch, 0, MAX_EPOCH, "audit epoch")
    return crypto.digest(SUBJECT_DOMAIN + canonical.pack([run_id, peer, epoch]))


def audit_ticket(auditor: Signer, subject: bytes, epoch: int) -> bytes:
    """The auditor's ticket for one claim: its signature over the claim's id (`subject`: the payout entry's id, or the
    claim's digest) and epoch. Ed25519 as `cryptography` signs is deterministic (RFC 8032), so an honest auditor has
    one ticket per claim. Limit: Ed25519 verification cannot tell a deterministic nonce from a chosen one, so an auditor
    running its own signing code could draw several tickets and keep one; a unique-output VRF (RFC 9381 ECVRF) would
    close that and is not in `cryptography`. What grinding buys is bounded: audits of honest work pass anyway."""
    canonical.fixed_bytes(subject, crypto.DIGEST_SIZE, "audit subject")
    return auditor.sign(TICKET_DOMAIN + canonical.pack([subject, epoch]))


def verify_ticket(auditor: bytes, subject: bytes, epoch: int, ticket: bytes) -> None:
    """Raise InvalidSignature unless `ticket` is `auditor`'s ticket for (subject, epoch)."""
    crypto.verify(auditor, TICKET_DOMAIN + canonical.pack([subject, epoch]), ticket)


def _draw(ticket: bytes, index: int) -> int:
    return int.from_bytes(crypto.digest(DRAW_DOMAIN + canonical.pack([ticket, index])), "big")


def is_selected(ticket: bytes, rate_ppm: int) -> bool:
    """Audit iff H(ticket) < rate * 2^256 (rate in parts per million)."""
    canonical.uint(rate_ppm, 0, PPM, "audit rate")
    return _draw(ticket, -1) * PPM < rate_ppm << (8 * crypto.DIGEST_SIZE)


def spot_steps(ticket: bytes, steps: int, count: int) -> tuple[int, ...]:
    """The steps to recompute, distinct and increasing: `count` of `steps` drawn from the ticket (all if fewer)."""
    canonical.uint(count, 1, MAX_SPOT_STEPS, "spot steps")
    canonical.uint(steps, 1, MAX_STEPS, "steps")
    if count >= steps:
        return tuple(range(steps))
    chosen: set[int] = set()
    index = 0
    while len(chosen) < count:
        chosen.add(_draw(ticket, index) % steps)
        index += 1
    return tuple(sorted(chosen))


def check_claim_commitment(claim: Claim, commitment: WorkCommitment) -> None:
    """Raise InvalidMessage unless `commitment` is the one `claim` names: its digest is the claim's work_digest and it
    is the claimant's own work (run, peer key, epoch): a peer that copies another's work_digest into its claim fails."""
    if commitment.digest != claim.work_digest:
        raise InvalidMessage("the commitment is not the one the claim's work_digest names")
    if (commitment.run_id, commitment.peer, commitment.epoch) != (claim.run_id, claim.peer, claim.epoch):
        raise InvalidMessage("the commitment is for another run, peer or epoch than the claim")


# ---- the verdict -----------------------------------------------------------------------------------------------


def judge(commitment: WorkCommitment, claimed_samples: int, reveals: Sequence[StepReveal],
          recomputed: Sequence[bytes], tolerance_ppm: int) -> tuple[str, str]:
    """(verdict, reason) for a claim whose revealed step sketches are compared with the auditor's recomputation of the
    same steps (both in the order of `reveals`). The reveals must already be checked (`StepReveal.check`): a revealed
    sketch is the claimant's own commitment, so a mismatch is the claimant's fault, never the auditor's.

    fail: the claim counts more samples than the committed steps hold, or a step's sketch is farther than the
    tolerance from its recomputation. inconclusive: the recomputation is not finite (the start state is broken);
    nobody is blamed. A claim of fewer samples than committed is judged by its steps: a peer's averaging weight can
    be below what it trained (seen under load: 32 of 384 samples averaged in a round it joined late), and claiming
    less gains nothing."""
    if claimed_samples > commitment.samples:
        return "fail", (f"claims {claimed_samples} samples, the commitment holds {commitment.steps} steps of "
                        f"{commitment.batch_size}")
    for reveal, mine in zip(reveals, recomputed):
        if not all(map(math.isfinite, unpack_sketch(mine))):
            return "inconclusive", f"step {reveal.step}: the recomputation is not finite"
        distance = distance_ppm(reveal.sketch, mine)
        if distance > tolerance_ppm:
            return "fail", f"step {reveal.step}: {distance} ppm from the recomputation (tolerance {tolerance_ppm})"
    return "pass", f"{len(reveals)} steps within {tolerance_ppm} ppm"


@dataclass(frozen=True)
class AuditReport(canonical.WireRecord):
    """One audit, with everything needed to re-check it offline: the claim's commitment and claimed samples, the
    subject (payout or claim id) and ticket that selected it, the revealed steps with their Merkle paths, the auditor's
    recomputed sketches, the tolerance, the verdict. Re-checking = `check()` (no torch, no state) plus recomputing the
    steps from the start state named by `commitment.state_digest` and comparing with `recomputed`
    (training/work.py: recheck_report). The ledger's `audit` entry carries this record as its body; the entry's
    signature (by `auditor`) makes the auditor accountable for a wrong report."""

    commitment: WorkCommitment
    claimed_samples: int
    subject: bytes
    auditor: bytes
    ticket: bytes
    rate_ppm: int
    tolerance_ppm: int
    reveals: tuple[StepReveal, ...]
    recomputed: tuple[bytes, ...]
    verdict: str
    reason: str

    WIRE_NAME: ClassVar[str] = "audit report"
    MAX_WIRE_SIZE: ClassVar[int] = MAX_REPORT_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.commitment, WorkCommitment):
            raise InvalidMessage("audit report commitment must be a WorkCommitment")
        canonical.uint(self.claimed_samples, 1, 2**32 - 1, "audit claimed_samples")
        canonical.fixed_bytes(self.subject, crypto.DIGEST_SIZE, "audit subject")
        canonical.fixed_bytes(self.auditor, crypto.PUBLIC_KEY_SIZE, "audit auditor")
        canonical.fixed_bytes(self.ticket, crypto.SIGNATURE_SIZE, "audit ticket")
        canonical.uint(self.rate_ppm, 0, PPM, "audit rate_ppm")
        canonical.uint(self.tolerance_ppm, 0, PPM, "audit tolerance_ppm")
        if type(self.reveals) is not tuple or not all(isinstance(r, StepReveal) for r in self.reveals):
            raise InvalidMessage("audit reveals must be a tuple of step reveals")
        if type(self.recomputed) is not tuple or len(self.recomputed) != len(self.reveals):
            raise InvalidMessage("audit recomputed must hold one sketch per reveal")
        for sketch in self.recomputed:
            canonical.fixed_bytes(sketch, SKETCH_BYTES, "audit recomputed sketch")
        if self.verdict not in VERDICTS:
            raise InvalidMessage(f"audit verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")
        if type(self.reason) is not str or len(self.reason) > MAX_REASON:
            raise InvalidMessage(f"audit reason must be a string of at most {MAX_REASON} characters")

    def to_obj(self) -> list:
        return [REPORT_VERSION, self.commitment.to_obj(), self.claimed_samples, self.subject, self.auditor,
                self.ticket, self.rate_ppm, self.tolerance_ppm, [r.to_obj() for r in self.reveals],
                list(self.recomputed), self.verdict, self.reason]

    @classmethod
    def from_obj(cls, obj: Any) -> "AuditReport":
        commitment, samples, subject, auditor, ticket, rate, tolerance, reveals, recomputed, verdict, reason = (
            canonical.versioned(obj, 12, REPORT_VERSION, "audit report"))
        reveals = tuple(StepReveal.from_obj(r) for r in canonical.sequence(reveals, MAX_SPOT_STEPS, "audit reveals"))
        recomputed = tuple(canonical.sequence(recomputed, MAX_SPOT_STEPS, "audit recomputed"))
        return cls(WorkCommitment.from_obj(commitment), samples, subject, auditor, ticket, rate, tolerance, reveals,
                   recomputed, verdict, reason)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(r.step for r in self.reveals)

    def distances_ppm(self) -> tuple[int, ...]:
        return tuple(distance_ppm(r.sketch, mine) for r, mine in zip(self.reveals, self.recomputed))

    def check(self, claim: Claim) -> None:
        """Everything but the recomputation, as any replica can check it: the commitment and sample count are the
        signed claim's (`claim` is the audited claim, as the ledger holds it), the ticket is the auditor's and selects
        this claim at `rate_ppm`, the revealed steps are
        the ones the ticket draws and are the claimant's committed leaves, and the verdict follows from the sketches.
        Raises InvalidMessage (InvalidSignature for the ticket) naming the first problem."""
        check_claim_commitment(claim, self.commitment)
        if self.claimed_samples != claim.samples:
            raise InvalidMessage(f"the report says {self.claimed_samples} samples, the claim {claim.samples}")
        if self.tolerance_ppm < self.commitment.tolerance_ppm:
            raise InvalidMessage(f"tolerance {self.tolerance_ppm} ppm is below the {self.commitment.precision} rule's "
                                 f"{self.commitment.tolerance_ppm}")
        verify_ticket(self.auditor, self.subject, self.commitment.epoch, self.ticket)
        if not is_selected(self.ticket, self.rate_ppm):
            raise InvalidMessage(f"the ticket does not select this claim at rate {self.rate_ppm} ppm")
        if not self.reveals:  # nothing compared: the count alone fails, or no start state had the committed digest
            count_fails = self.claimed_samples > self.commitment.samples
            if self.verdict != ("fail" if count_fails else "inconclusive"):
                raise InvalidMessage(f"the verdict is {self.verdict!r} with no step compared")
            return
        wanted = spot_steps(self.ticket, self.commitment.leaves, len(self.reveals))
        if self.steps != wanted:
            raise InvalidMessage(f"revealed steps {list(self.steps)[:8]} are not the ticket's {list(wanted)[:8]}")
        for reveal in self.reveals:
            reveal.check(self.commitment)
        verdict, _ = judge(self.commitment, self.claimed_samples, self.reveals, self.recomputed, self.tolerance_ppm)
        if verdict != self.verdict:
            raise InvalidMessage(f"the verdict is {self.verdict!r}, the sketches say {verdict!r}")

    def to_json(self) -> dict[str, Any]:
        c = self.commitment
        return {"run_id": c.run_id.hex(), "peer": c.peer.hex(), "epoch": c.epoch, "steps": c.steps,
                "segment": c.segment,
                "batch_size": c.batch_size, "precision": c.precision, "claimed_samples": self.claimed_samples,
                "state_digest": c.state_digest.hex(),
                "subject": self.subject.hex(), "auditor": self.auditor.hex(), "rate_ppm": self.rate_ppm,
                "tolerance_ppm": self.tolerance_ppm, "checked_steps": list(self.steps),
                "distances_ppm": list(self.distances_ppm()), "verdict": self.verdict, "reason": self.reason}
