"""Single-process training and evaluation with a run's own model, data and optimizer: the reference swarms are compared to."""

from __future__ import annotations

from pathlib import Path

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


def train_locally(manifest: Manifest, steps: int, batch_size: int, data_dir: Path | None = None,
                  dataset: Dataset | None = None) -> tuple[nn.Module, Dataset]:
    """`steps` optimizer steps of `batch_size` samples each, from the run's initial model: what the swarm
    computes when every epoch's averaged gradient covers `batch_size` samples."""
    dataset = dataset or open_dataset(manifest.dataset.name, manifest.dataset.as_dict(), data_dir)
    model = build_model(manifest.model.name, manifest.model.as_dict(), manifest.init_seed)
    optimizer = optimizer_factory(manifest.optimizer.name, manifest.optimizer.as_dict())(model.parameters())
    loss_fn = loss_function(dataset.shape.task)
    for step in range(steps):
        x, y = batch_for(dataset, manifest.run_id, REFERENCE_PEER, step, 0, batch_size)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return model, dataset
