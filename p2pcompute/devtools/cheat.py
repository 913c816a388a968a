"""A cheating trainer for tests and benchmarks: `fabricate_gradients()` makes every Trainer built afterwards in this
process replace each step's gradient by a random one of the same norm. Never a production option: the node has no
way to do this; a test starts a node process that calls it first (tests/cheat_node.py).

The fabrication is what a free-rider does who wants credits without the compute: its gradient carries no information
about its batches, yet its commitment is honest about what it sent (it sketches the random gradient), the sample count
is the real one, the witnesses see a normal weight. Only a recomputation of its steps can tell.
"""

from __future__ import annotations

import torch

from p2pcompute.training import trainer


def _same_norm_noise(grad: torch.Tensor) -> torch.Tensor:
    noise = torch.randn_like(grad)
    return noise * (grad.norm() / noise.norm().clamp_min(1e-12))


def fabricate_gradients() -> None:
    """From now on, models the trainer builds (training/trainer.py: run_model) get a hook on every parameter that
    replaces its gradient in backward by random noise of the same norm (idempotent)."""
    honest = trainer.run_model
    if getattr(honest, "fabricates", False):
        return

    def cheating_model(*args, **kwargs):
        model = honest(*args, **kwargs)
        for param in model.parameters():
            param.register_hook(_same_norm_noise)  # runs in backward: .grad receives the noise, not the gradient
        return model

    cheating_model.fabricates = True
    trainer.run_model = cheating_model
