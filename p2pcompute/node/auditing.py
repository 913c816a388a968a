"""The recomputation behind this node's audits as an issuer: a Recomputer per run (the trainer's dataset and start states when this node trains the run) and training/work.py's `audit_claim` over the claimant's answers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from p2pcompute.credits.audit import AuditReport, WorkCommitment
    from p2pcompute.credits.claims import Claim
    from p2pcompute.runs.manifest import Manifest
    from p2pcompute.services.audits import RevealFn, StateFn

logger = logging.getLogger(__name__)


class NodeRecompute:
    """`services.audits.Recompute` for this node. `trainer_of(run_id)`: this node's trainer of that run, if any (its
    dataset and start states are used: an issuer that trains its run has the epoch's start state itself, the usual
    case in gradients mode); otherwise the run's model and dataset are built here (`data_dir`) and the start state is
    the claimant's, digest-checked. Called on the audit worker's thread only."""

    def __init__(self, identity, trainer_of: Callable[[bytes], Any], data_dir: Path | None = None):
        self.identity, self.trainer_of, self.data_dir = identity, trainer_of, data_dir
        self._cached: tuple[bytes, Any, Any] | None = None  # (run_id, trainer or None, Recomputer)

    def _recomputer(self, manifest: "Manifest", trainer):
        from p2pcompute.training.work import Recomputer

        cached = self._cached
        if cached is None or cached[0] != manifest.run_id or cached[1] is not trainer:
            dataset = getattr(trainer, "dataset", None) if trainer is not None else None
            recomputer = Recomputer(manifest, dataset=dataset, data_dir=self.data_dir)
            self._cached = cached = (manifest.run_id, trainer, recomputer)
        return cached[2]

    def __call__(self, manifest: "Manifest", claim: "Claim", commitment: "WorkCommitment", subject: bytes,
                 reveal: "RevealFn", fetch_state: "StateFn") -> "AuditReport | None":
        import torch

        from p2pcompute.training.work import audit_claim

        trainer = self.trainer_of(manifest.run_id)
        recomputer = self._recomputer(manifest, trainer)
        own = trainer.start_state(commitment.epoch) if trainer is not None else None
        start = own[1] if own is not None and own[0] == commitment.state_digest else None
        params = recomputer.params

        def state_of(_commitment) -> Sequence[torch.Tensor] | None:
            raw = fetch_state(len(params), sum(p.numel() * 4 for p in params))
            if raw is None or any(len(b) != p.numel() * 4 for b, p in zip(raw, params)):
                return None
            return [torch.frombuffer(bytearray(b), dtype=torch.float32).reshape(p.shape) for b, p in zip(raw, params)]

        return audit_claim(recomputer, start, claim, commitment, subject, auditor=self.identity,
                           rate_ppm=manifest.credits.audit_ppm, reveal=lambda _c, leaves: reveal(leaves),
                           state_of=state_of)
