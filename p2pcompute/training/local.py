"""Single-process training and evaluation with a run's own model, data and optimizer: the reference swarms are compared to."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from p2pcompute.runs.datasets import Dataset, batch_for, eval_batch, open_dataset
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.models import build_model, loss_function
from p2pcompute.runs.optimizers import optimizer_factory

REFERENCE_PEER = b"p2pc/reference"  # the "peer id" whose batches the reference run draws


def evaluate_loss(model: nn.Module, dataset: Dataset, run_id: bytes, size: int,
                  device: torch.device | str = "cpu") -> float:
    """Loss on the run's fixed held-out batch (the same on every machine)."""
    x, y = eval_batch(dataset, run_id, size)
    with torch.no_grad():
        return float(loss_function(dataset.shape.task)(model(x.to(device)), y.to(device)))


def train_locally(manifest: Manifest, epochs: Sequence[Sequence[tuple[bytes, int]]], data_dir: Path | None = None,
                  dataset: Dataset | None = None) -> tuple[nn.Module, Dataset]:
    """One optimizer step per epoch, from the run's initial model, over that epoch's batches: for each
    (peer id, steps) of epochs[e], the batches batch_for(run, peer, e, s) for s < steps, all together.

    Given the peers and step counts of a swarm's epochs, this recomputes the swarm on the very samples
    its peers drew (hivemind weights each peer's gradient by its sample count, so an epoch's averaged
    gradient is the mean over all of them): the auditor's view. `single_process(...)` plans a plain run."""
    dataset = dataset or open_dataset(manifest.dataset.name, manifest.dataset.as_dict(), data_dir)
    model = build_model(manifest.model.name, manifest.model.as_dict(), manifest.init_seed)
    optimizer = optimizer_factory(manifest.optimizer.name, manifest.optimizer.as_dict())(model.parameters())
    loss_fn = loss_function(dataset.shape.task)
    size = manifest.batch_size_per_step
    for epoch, contributions in enumerate(epochs):
        batches = [batch_for(dataset, manifest.run_id, peer, epoch, step, size)
                   for peer, steps in contributions for step in range(steps)]
        optimizer.zero_grad()
        loss_fn(model(torch.cat([x for x, _ in batches])), torch.cat([y for _, y in batches])).backward()
        optimizer.step()
    return model, dataset


def single_process(epochs: int, steps_per_epoch: int) -> list[list[tuple[bytes, int]]]:
    """The plan of one process taking `steps_per_epoch` local batches per optimizer step."""
    return [[(REFERENCE_PEER, steps_per_epoch)] for _ in range(epochs)]
