"""Reproducible work for audits: step gradients at an epoch's start state, the trainer's record of them (start states, step sketches, commitments) and the auditor's recomputation.

In gradients mode a peer's contribution to epoch E is the mean of its step gradients, every one taken at the same
parameters, E's start state theta_E (hivemind.Optimizer accumulates `.grad` after each backward pass and sends
accumulated / steps with weight = samples; the parameters change only at the epoch's end). Step s of peer P uses the
batch `batch_for(dataset, run, P, E, s, batch_size_per_step)`. So one step is recomputable by anyone holding the
manifest and theta_E, independently of every other step: an audit recomputes a few random steps, not the epoch.

In local (DiLoCo) mode step s is taken at the peer's own trajectory with its inner optimizer's private state, so steps
are recomputable only from a revealed state: the peer keeps the full training state (parameters and inner optimizer)
every SEGMENT_STEPS steps, commits per segment the digest of the state it starts from and the sketch of the
parameters' change over it (`LocalWorkRecorder`), and an audit replays whole segments from their revealed, digest-
checked start (Proof-of-Learning style). Not covered: gradients-mode runs with `delay_state_averaging`, where a
background state-averaging result may land mid-epoch and move the parameters under later steps.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from p2pcompute import canonical, crypto
from p2pcompute.credits.audit import (SPOT_STEPS, TOLERANCE_PPM, AuditReport, StepReveal, WorkCommitment, audit_ticket,
                                      check_claim_commitment, is_selected, judge, merkle_proofs, merkle_root,
                                      spot_steps)
from p2pcompute.credits.claims import Claim
from p2pcompute.credits.sketch import SketchBasis, sketch_seed, to_bytes, unpack_sketch
from p2pcompute.crypto import Signer
from p2pcompute.errors import InvalidMessage
from p2pcompute.identity import peer_id_bytes
from p2pcompute.runs.datasets import Dataset, batch_for, open_dataset
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.models import build_model, loss_function
from p2pcompute.runs.optimizers import optimizer_factory

logger = logging.getLogger(__name__)

STATE_DOMAIN = b"p2pcompute/training/start-state/v1\x00"
# Epochs whose step sketches a peer keeps to answer audits: an issuer audits when it pays, a few epochs after the
# claim (witnessing takes the next round or two). 8 epochs of a demo peer (~2,000 steps each) are ~2 MB.
KEEP_EPOCHS = 8
# Start states kept (parameters, float32, CPU), newest first: what this peer can audit others against, and what it
# hands an auditor whose own state differs. As many as the epochs of work kept (KEEP_EPOCHS): a commitment whose start
# state is gone can only be judged inconclusive (seen in the e2e test, where epochs last a second and audits come a few
# epochs late). 8 epochs of a 100M-parameter model are 3.2 GB, so the count is also capped by bytes
# (MAX_START_STATE_BYTES).
KEEP_START_STATES = KEEP_EPOCHS
# Epochs whose records (and start states) are kept beyond those while our claims for them wait to be paid: the
# credits service's open claims (services/credits.py keeps at most 64), ~250 KB each for the demo's MLP.
MAX_PINNED = 64
MAX_START_STATE_BYTES = 1 << 30
# Step gradients waiting to be sketched together (at least one): batching makes the per-step cost one copy. 4 MiB is
# ~190 steps of the demo MLP and one step of a 1M-parameter model (where a step costs far more than its sketch).
PENDING_BYTES = 4 << 20
# Local mode: steps per committed segment. Honest replays drift with the steps replayed (DESIGN.md: after 50 steps 1e-6,
# after 500 up to 0.1 with SGD momentum), and an audit replays one segment: 32 keeps drift negligible and an audit
# cheap, at one kept training state (3x the model with Adam) per 32 steps.
SEGMENT_STEPS = 32


def state_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """The digest of a start state: every tensor's shape, then its values as little-endian float32, in order."""
    tensors = [t.detach().to("cpu", torch.float32).contiguous() for t in tensors]
    layout = canonical.pack([list(t.shape) for t in tensors])
    return crypto.digest_chunks([STATE_DOMAIN, layout, *(memoryview(t.numpy().astype("<f4", copy=False)).cast("B")
                                                       for t in tensors)])


class _Pinned:
    """Epochs kept past the newest-first count while a claim of ours for them is open (`pin`/`unpin`, from the
    credits service's thread): an issuer audits when the claim is handed in, which a claim that waited for its
    witnesses does many epochs late. Seen in the NAT test: an epoch-1 claim audited at epoch 9, whose records were gone
    (KEEP_EPOCHS), could never be answered and was never paid. The set is replaced whole, never changed in place, so
    the training thread reads it without a lock. At most MAX_PINNED epochs."""

    pinned: frozenset[int] = frozenset()

    def pin(self, epoch: int) -> None:
        if len(self.pinned) < MAX_PINNED:
            self.pinned = self.pinned | {epoch}

    def unpin(self, epoch: int) -> None:
        self.pinned = self.pinned - {epoch}

    def _trim(self, kept: collections.OrderedDict, keep: int) -> None:
        """Keep the newest `keep` unpinned entries of `kept` (epoch -> ...), and the pinned ones."""
        pinned = self.pinned
        unpinned = [e for e in kept if e not in pinned]
        for epoch in unpinned[:max(0, len(unpinned) - keep)]:
            del kept[epoch]


class StartStates(_Pinned):
    """The parameters at the start of the last few epochs (CPU float32 copies), capped by count and bytes: the states
    this peer can recompute others' steps at. Memory: min(count, max_bytes / model bytes) x the model's float32 size
    (pinned epochs may exceed the count, never the bytes)."""

    def __init__(self, keep: int = KEEP_START_STATES, max_bytes: int = MAX_START_STATE_BYTES):
        self.keep, self.max_bytes = keep, max_bytes
        self._states: collections.OrderedDict[int, tuple[bytes, list[torch.Tensor]]] = collections.OrderedDict()

    def put(self, epoch: int, params: Iterable[torch.Tensor]) -> bytes:
        """Keep a copy of `params` as the start of `epoch`; returns its digest."""
        copies = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
        digest = state_digest(copies)
        size = sum(t.numel() * 4 for t in copies)
        by_bytes = self.max_bytes // max(1, size)
        self._states.pop(epoch, None)
        if min(self.keep, by_bytes) > 0:
            self._states[epoch] = (digest, copies)
        self._trim(self._states, self.keep)
        while len(self._states) > by_bytes:
            self._states.popitem(last=False)
        return digest

    def get(self, epoch: int) -> tuple[bytes, list[torch.Tensor]] | None:
        """(digest, tensors) of the start of `epoch`, if kept."""
        return self._states.get(epoch)

    def epochs(self) -> list[int]:
        return list(self._states)


class _EpochWork:
    def __init__(self, epoch: int, digest: bytes, basis: SketchBasis, versions: list[int]):
        self.epoch, self.digest, self.basis, self.versions = epoch, digest, basis, versions
        self.sketches: list[bytes] = []
        self.pending = basis.rows(max(1, PENDING_BYTES // (4 * basis.width)))  # step gradients not sketched yet
        self.waiting = 0
        self.broken = False  # a step came out of order or was not finite: no commitment for this epoch

    def flush(self) -> None:
        """Sketch the waiting step gradients in one pass (per-step calls would cost more than the steps of a small
        model: measured ~20% of its training time, against ~2% batched)."""
        if not self.waiting or self.broken:
            return
        sketches = self.basis.sketch_rows(self.pending[:self.waiting])
        finite = torch.isfinite(sketches).all(dim=1)
        if not finite.all():
            # fp16 loss scaling overflowed: the scaler skipped that step (hivemind never saw it) while the trainer
            # counted it; a commitment would hold a step nobody can recompute, so this epoch has none
            step = len(self.sketches) + int((~finite).nonzero()[0])
            logger.info("epoch %d: step %d has a non-finite gradient; no work commitment for this epoch", self.epoch,
                        step)
            self.broken = True
        self.sketches += [to_bytes(row) for row in sketches]
        self.waiting = 0


class _Recorded(_Pinned):
    """What a recorder keeps of its last `keep_epochs` committed epochs, and of pinned ones: epoch -> (commitment,
    *what reveals need). Its pins are its start states' (one set: pinning an epoch keeps both)."""

    start_states: StartStates

    def __init__(self, keep_epochs: int):
        self.keep_epochs = keep_epochs
        self._done: collections.OrderedDict[int, tuple] = collections.OrderedDict()

    @property
    def pinned(self) -> frozenset[int]:
        return self.start_states.pinned

    def pin(self, epoch: int) -> None:
        self.start_states.pin(epoch)

    def unpin(self, epoch: int) -> None:
        self.start_states.unpin(epoch)

    def _remember(self, epoch: int, commitment: WorkCommitment, *kept) -> WorkCommitment:
        self._done[epoch] = (commitment, *kept)
        self._trim(self._done, self.keep_epochs)
        return commitment

    def commitment(self, epoch: int) -> WorkCommitment | None:
        done = self._done.get(epoch)
        return done[0] if done is not None else None


def _versions(params: Sequence[torch.Tensor]) -> list[int]:
    """torch's in-place modification counters of the parameters (`Tensor._version`, what autograd checks saved tensors
    with): a parameter written during an epoch (a state download or averaging result landing mid-epoch) changes its
    counter, and the steps after it are no longer at the epoch's start state."""
    return [p._version for p in params]


class WorkRecorder(_Recorded):
    """The trainer's record of its work, for audits (gradients mode). The trainer calls `begin_epoch` when an epoch
    starts (with the parameters it trains, now at the epoch's start state), `record_step` after each backward pass (the
    same parameters; the step's gradient is in their `.grad`),
    `end_epoch` when the epoch ends (a commitment if it completed). Costs: per step one copy of the gradient into a
    buffer (PENDING_BYTES), sketched in one pass when it is full; per epoch a copy of the parameters, their hash and a
    new sketch basis (one random sign per parameter)."""

    def __init__(self, run_id: bytes, peer: bytes, batch_size: int, keep_epochs: int = KEEP_EPOCHS,
                 start_states: StartStates | None = None, precision: str = "fp32"):
        super().__init__(keep_epochs)
        self.run_id, self.peer, self.batch_size, self.precision = bytes(run_id), bytes(peer), batch_size, precision
        self.start_states = start_states if start_states is not None else StartStates()
        self._current: _EpochWork | None = None

    @property
    def epoch(self) -> int | None:
        return self._current.epoch if self._current is not None else None

    def begin_epoch(self, epoch: int, params: Sequence[torch.Tensor]) -> None:
        digest = self.start_states.put(epoch, params)
        numel = sum(p.numel() for p in params)
        basis = (self._current.basis if self._current is not None and self._current.digest == digest
                 and self._current.epoch == epoch
                 else SketchBasis(sketch_seed(self.run_id, epoch, digest), numel, device=params[0].device))
        self._current = _EpochWork(epoch, digest, basis, _versions(params))

    def record_step(self, epoch: int, step: int, params: Sequence[torch.Tensor], grad_scale: float = 1.0) -> None:
        """Record step `step`'s gradient (in the parameters' .grad, multiplied by `grad_scale`: 1 / the loss scale if
        a loss scaler scaled the loss). Steps must come in order from 0, at the parameters the epoch began with, and
        have finite gradients; anything else leaves the epoch without a commitment."""
        work = self._current
        if work is None or work.epoch != epoch or work.broken:
            return
        if step != len(work.sketches) + work.waiting:
            logger.info("epoch %d: step %d recorded after %d steps; no work commitment for this epoch", epoch, step,
                        len(work.sketches) + work.waiting)
            work.broken = True
            return
        if _versions(params) != work.versions:
            logger.info("epoch %d: the parameters changed before step %d; no work commitment for this epoch", epoch,
                        step)
            work.broken = True
            return
        row = work.pending[work.waiting]
        work.basis.flatten_into([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], row)
        if grad_scale != 1.0:
            row.mul_(grad_scale)
        work.waiting += 1
        if work.waiting == len(work.pending):
            work.flush()

    def end_epoch(self, epoch: int, completed: bool) -> WorkCommitment | None:
        """Close `epoch`: its commitment if it completed with every step recorded, else None."""
        work = self._current
        if work is None or work.epoch != epoch:
            return None
        self._current = None
        work.flush()
        if not completed or work.broken or not work.sketches:
            return None
        commitment = WorkCommitment(self.run_id, self.peer, epoch, len(work.sketches), self.batch_size, work.digest,
                                    merkle_root(work.sketches), self.precision)
        return self._remember(epoch, commitment, work.sketches)

    def reveal(self, epoch: int, steps: Sequence[int]) -> list[StepReveal] | None:
        """The claimant's answer to an audit of `steps` of `epoch` (None if the epoch is no longer kept)."""
        done = self._done.get(epoch)
        if done is None:
            return None
        commitment, sketches = done
        if any(not 0 <= s < commitment.steps for s in steps):
            raise InvalidMessage(f"epoch {epoch} has {commitment.steps} steps")
        return [StepReveal(s, sketches[s], proof) for s, proof in zip(steps, merkle_proofs(sketches, steps))]


# ---- local (DiLoCo) mode ---------------------------------------------------------------------------------------


def optimizer_tensors(state: dict) -> list[torch.Tensor]:
    """An optimizer's `state_dict()["state"]` as float32 tensors in a fixed order (parameter index, then key), for its
    digest. Hyperparameters are not in it: they come from the manifest."""
    return [torch.as_tensor(per_param[key], dtype=torch.float32).reshape(-1)
            for index in sorted(state) for per_param in [state[index]] for key in sorted(per_param)]


@dataclasses.dataclass(frozen=True)
class SegmentState:
    """The full training state where a local-mode segment starts: parameters (CPU float32 copies) and the inner
    optimizer's per-parameter state (`state_dict()["state"]`, CPU copies)."""

    params: tuple[torch.Tensor, ...]
    optimizer: dict

    @classmethod
    def capture(cls, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> "SegmentState":
        state = copy.deepcopy({i: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                               for i, s in optimizer.state_dict()["state"].items()})
        return cls(tuple(p.detach().to("cpu", torch.float32, copy=True) for p in params), state)

    @functools.cached_property
    def digest(self) -> bytes:
        return state_digest([*self.params, *optimizer_tensors(self.optimizer)])


class LocalWorkRecorder(_Recorded):
    """The trainer's record of its work in local mode. `begin_epoch` at the epoch's first step (parameters and inner
    optimizer as the epoch starts), `after_step` after each inner optimizer step (`last`: the epoch ends with it, before
    the outer step moves the parameters), `end_epoch` when the epoch ends. Keeps a SegmentState every `segment` steps
    (memory: epochs kept x steps / segment x the model and its optimizer state)."""

    def __init__(self, run_id: bytes, peer: bytes, batch_size: int, segment: int = SEGMENT_STEPS,
                 keep_epochs: int = KEEP_EPOCHS, start_states: StartStates | None = None, precision: str = "fp32"):
        super().__init__(keep_epochs)
        self.run_id, self.peer, self.batch_size, self.segment = bytes(run_id), bytes(peer), batch_size, segment
        self.precision = precision
        self.start_states = start_states if start_states is not None else StartStates()
        self._epoch: int | None = None

    @property
    def epoch(self) -> int | None:
        return self._epoch

    def begin_epoch(self, epoch: int, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self._epoch, self._steps, self._broken, self._closed = epoch, 0, False, False
        self._digest = self.start_states.put(epoch, params)
        self._basis = SketchBasis(sketch_seed(self.run_id, epoch, self._digest), sum(p.numel() for p in params),
                                  device=params[0].device)
        self._starts = [SegmentState.capture(params, optimizer)]
        self._sketches: list[bytes] = []

    def after_step(self, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, last: bool) -> None:
        if self._epoch is None or self._broken or self._closed:
            return
        self._steps += 1
        if self._steps % self.segment and not last:
            return
        start = self._starts[-1].params
        sketch = self._basis.sketch([p.detach().float().cpu() - s for p, s in zip(params, start)])
        if not all(map(math.isfinite, unpack_sketch(sketch))):
            logger.info("epoch %d: a non-finite update; no work commitment for this epoch", self._epoch)
            self._broken = True
            return
        self._sketches.append(sketch)
        if last:
            self._closed = True  # the outer step follows: nothing after it belongs to this epoch
        else:
            self._starts.append(SegmentState.capture(params, optimizer))

    def end_epoch(self, epoch: int, completed: bool) -> WorkCommitment | None:
        if self._epoch != epoch:
            return None
        self._epoch = None
        if not completed or self._broken or not self._closed:
            return None
        starts = [s.digest for s in self._starts]
        commitment = WorkCommitment(self.run_id, self.peer, epoch, self._steps, self.batch_size, self._digest,
                                    merkle_root(self._sketches, starts), self.precision, self.segment)
        return self._remember(epoch, commitment, self._sketches, self._starts)

    def reveal(self, epoch: int, leaves: Sequence[int]) -> list[StepReveal] | None:
        done = self._done.get(epoch)
        if done is None:
            return None
        commitment, sketches, starts = done
        if any(not 0 <= i < commitment.leaves for i in leaves):
            raise InvalidMessage(f"epoch {epoch} has {commitment.leaves} segments")
        digests = [s.digest for s in starts]
        return [StepReveal(i, sketches[i], proof, digests[i])
                for i, proof in zip(leaves, merkle_proofs(sketches, leaves, digests))]

    def segment_state(self, epoch: int, leaf: int) -> SegmentState | None:
        done = self._done.get(epoch)
        return done[2][leaf] if done is not None and 0 <= leaf < len(done[2]) else None


# ---- the auditor's side --------------------------------------------------------------------------------------


class Recomputer:
    """Recomputes step gradients of a run on this machine (CPU, float32, the zoo's model and dataset), from a start
    state given as tensors. Deterministic up to float summation order (thread count, kernels)."""

    def __init__(self, manifest: Manifest, dataset: Dataset | None = None, data_dir: Path | None = None,
                 stdlib_dir: Path | None = None):
        self.manifest = manifest
        self.dataset = dataset or open_dataset(manifest.dataset.name, manifest.dataset.as_dict(), data_dir, stdlib_dir)
        self.model = build_model(manifest.model.name, manifest.model.as_dict(), manifest.init_seed)
        self.params = list(self.model.parameters())
        self.loss_fn = loss_function(self.dataset.shape.task)
        self._basis: tuple[int, SketchBasis] | None = None

    @torch.no_grad()
    def load(self, state: Sequence[torch.Tensor]) -> bytes:
        """Set the model to `state`; returns its digest."""
        if len(state) != len(self.params) or any(s.shape != p.shape for s, p in zip(state, self.params)):
            raise InvalidMessage("the start state does not fit the run's model")
        for param, value in zip(self.params, state):
            param.copy_(value)
        return state_digest(self.params)

    def step_gradient(self, peer: bytes, epoch: int, step: int) -> list[torch.Tensor]:
        """The gradient of step `step` of `peer` (its public key; batches are seeded by its PeerID) in `epoch` at the
        loaded state (what the trainer's .grad held)."""
        x, y = batch_for(self.dataset, self.manifest.run_id, peer_id_bytes(peer), epoch, step,
                         self.manifest.batch_size_per_step)
        self.model.zero_grad(set_to_none=False)
        self.loss_fn(self.model(x), y).backward()
        return [p.grad.detach().clone() for p in self.params]

    def contribution(self, peer: bytes, epoch: int, steps: int) -> list[torch.Tensor]:
        """The peer's whole contribution to `epoch` at the loaded state: the mean of its first `steps` step gradients
        (what hivemind's GradientAverager sends, with weight steps x batch_size)."""
        total = [torch.zeros_like(p) for p in self.params]
        for step in range(steps):
            for acc, grad in zip(total, self.step_gradient(peer, epoch, step)):
                acc.add_(grad)
        return [t / steps for t in total]

    def replay(self, peer: bytes, epoch: int, steps: range, start: SegmentState) -> list[torch.Tensor]:
        """Local mode: the parameters after inner optimizer steps `steps` of `peer` in `epoch`, from `start`."""
        self.load(start.params)
        optimizer = optimizer_factory(self.manifest.optimizer.name, self.manifest.optimizer.as_dict())(self.params)
        optimizer.load_state_dict({"state": copy.deepcopy(start.optimizer),
                                   "param_groups": optimizer.state_dict()["param_groups"]})
        for step in steps:
            self.step_gradient(peer, epoch, step)
            optimizer.step()
        return [p.detach().clone() for p in self.params]

    def segment_sketches(self, commitment: WorkCommitment, leaves: Sequence[int],
                         starts: Sequence[SegmentState]) -> list[bytes]:
        """Local mode: sketches of the parameters' change over the given segments, replayed from their starts."""
        basis = self._basis_for(commitment)
        sketches = []
        for leaf, start in zip(leaves, starts):
            end = self.replay(commitment.peer, commitment.epoch, commitment.leaf_steps(leaf), start)
            sketches.append(basis.sketch([e - s for e, s in zip(end, start.params)]))
        return sketches

    def _basis_for(self, commitment: WorkCommitment) -> SketchBasis:
        seed = sketch_seed(commitment.run_id, commitment.epoch, commitment.state_digest)
        if self._basis is None or self._basis[0] != seed:
            self._basis = (seed, SketchBasis(seed, sum(p.numel() for p in self.params)))
        return self._basis[1]

    def step_sketches(self, commitment: WorkCommitment, steps: Sequence[int]) -> list[bytes]:
        """Sketches of the given steps of the commitment's peer and epoch, at the loaded state, in the commitment's
        sketch basis."""
        basis = self._basis_for(commitment)
        sketches = []
        for step in steps:
            self.step_gradient(commitment.peer, commitment.epoch, step)
            sketches.append(basis.sketch_grads(self.params))
        return sketches


Reveal = Callable[[WorkCommitment, Sequence[int]], "Sequence[StepReveal] | None"]
StateOf = Callable[[WorkCommitment], "Sequence[torch.Tensor] | None"]
SegmentStateOf = Callable[[WorkCommitment, int], "SegmentState | None"]


def audit_claim(recomputer: Recomputer, start_state: Sequence[torch.Tensor] | None, claim: Claim,
                commitment: WorkCommitment, subject: bytes, auditor: Signer, rate_ppm: int, reveal: Reveal,
                state_of: StateOf | None = None, segment_state: SegmentStateOf | None = None, spot: int = SPOT_STEPS,
                tolerance_ppm: int | None = None) -> AuditReport | None:
    """The auditor's whole job for one claim, given the commitment the claimant sent for it. `subject`: the id the
    ticket signs (the claim's digest, or its payout entry's id). None if the ticket does not select the claim, or if
    the claimant did not answer with its committed work (a commitment that is not the claim's, no reveal, sketches that
    are not its committed leaves, segment states that are not the committed ones: not provable to others; the issuer
    does not pay such a claim). Otherwise a report.

    Gradients mode: when `start_state` (the auditor's own state for the epoch) is missing or is not the one the
    claimant committed to (an honest peer that missed a round trains on other parameters until the next state
    averaging), the auditor asks `state_of` (the claimant's state for that epoch, e.g. `Trainer.start_state` over the
    network) and recomputes at it if its digest is the committed one: work at any parameters costs the same, so what is
    checked is that it was done; keep that state, it is the report's evidence. With no such state the report is
    "inconclusive" (nobody blamed, nothing verified: do not pay). Local mode: the drawn segments are replayed from the
    states `segment_state` returns (the claimant's `LocalWorkRecorder.segment_state`), checked against the committed
    digests; keep them, they are the evidence."""
    if claim.run_id != recomputer.manifest.run_id:
        raise InvalidMessage("the claim is for another run")
    try:
        check_claim_commitment(claim, commitment)
    except InvalidMessage as e:
        logger.info("epoch %d: %s", claim.epoch, e)
        return None
    ticket = audit_ticket(auditor, subject, commitment.epoch)
    if not is_selected(ticket, rate_ppm):
        return None
    tolerance_ppm = commitment.tolerance_ppm if tolerance_ppm is None else max(tolerance_ppm, commitment.tolerance_ppm)

    def report(reveals=(), recomputed=(), verdict="inconclusive", reason="") -> AuditReport:
        return AuditReport(commitment, claim.samples, subject, auditor.public_key, ticket, rate_ppm, tolerance_ppm,
                           tuple(reveals), tuple(recomputed), verdict, reason)

    if claim.samples > commitment.samples:
        return report(verdict="fail", reason=judge(commitment, claim.samples, (), (), tolerance_ppm)[1])
    if not commitment.segment and (start_state is None or state_digest(start_state) != commitment.state_digest):
        start_state = state_of(commitment) if state_of is not None else None
        if start_state is None or state_digest(start_state) != commitment.state_digest:
            return report(reason="no start state with the committed digest")
    leaves = spot_steps(ticket, commitment.leaves, spot)
    reveals = _answer(commitment, leaves, reveal(commitment, leaves))
    if reveals is None:
        return None
    if commitment.segment:
        states = [segment_state(commitment, leaf) if segment_state is not None else None for leaf in leaves]
        if any(st is None or st.digest != r.start for st, r in zip(states, reveals)):
            logger.info("epoch %d: the claimant's segment states are not the committed ones", commitment.epoch)
            return None
        if leaves[0] == 0 and state_digest(states[0].params) != commitment.state_digest:
            logger.info("epoch %d: the claimant's segment 0 does not start at its committed start", commitment.epoch)
            return None
        recomputed = recomputer.segment_sketches(commitment, leaves, states)
    else:
        recomputer.load(start_state)
        recomputed = recomputer.step_sketches(commitment, leaves)
    verdict, reason = judge(commitment, claim.samples, reveals, recomputed, tolerance_ppm)
    return report(reveals, recomputed, verdict, reason)


def _answer(commitment: WorkCommitment, leaves: tuple[int, ...], reveals) -> tuple[StepReveal, ...] | None:
    """The claimant's reveals if they are exactly the asked leaves, as committed; else None (logged)."""
    if reveals is None:
        return None
    reveals = tuple(reveals)
    if tuple(r.step for r in reveals) != leaves:
        logger.info("the claimant answered leaves %s, not %s", [r.step for r in reveals][:8], list(leaves)[:8])
        return None
    try:
        for r in reveals:
            r.check(commitment)
    except InvalidMessage as e:
        logger.info("the claimant's reveal is not its commitment: %s", e)
        return None
    return reveals


def recheck_report(recomputer: Recomputer, start_state: Sequence[torch.Tensor] | None, report: AuditReport,
                   claim: Claim, segment_state: Callable[[int], "SegmentState | None"] | None = None,
                   tolerance_ppm: int = TOLERANCE_PPM["fp32"]) -> None:
    """Re-check an audit offline, recomputation included: `report.check` (signatures, selection, Merkle paths, verdict
    from the sketches), then the leaves recomputed here must be within `tolerance_ppm` (fp32's: both sides recompute in
    fp32) of the auditor's recomputed sketches: steps from `start_state` (gradients mode; it must have the committed
    digest), segments from the states `segment_state(leaf)` gives (local mode; each must have the revealed digest).
    Raises InvalidMessage naming the first problem."""
    report.check(claim)
    if not report.reveals:
        return
    commitment = report.commitment
    if commitment.segment:
        states = [segment_state(r.step) if segment_state is not None else None for r in report.reveals]
        if any(st is None or st.digest != r.start for st, r in zip(states, report.reveals)):
            raise InvalidMessage("these segment states are not the ones the claim committed to")
        mine = recomputer.segment_sketches(commitment, report.steps, states)
    else:
        if start_state is None or recomputer.load(start_state) != commitment.state_digest:
            raise InvalidMessage("this start state is not the one the claim committed to")
        mine = recomputer.step_sketches(commitment, report.steps)
    theirs = [StepReveal(s, sketch, ()) for s, sketch in zip(report.steps, report.recomputed)]
    verdict, reason = judge(commitment, commitment.samples, theirs, mine, tolerance_ppm)
    if verdict != "pass":
        raise InvalidMessage(f"the auditor's recomputation does not match this one: {reason}")
