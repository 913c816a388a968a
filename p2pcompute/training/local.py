"""Single-process training and evaluation with a run's own model, data and optimizer: the reference swarms are compared to."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from p2pcompute.runs.datasets import Dataset, batch_for, eval_batch
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.materialize import run_dataset, run_model
from p2pcompute.runs.models import logits_of, loss_function
from p2pcompute.runs.optimizers import optimizer_factory

REFERENCE_PEER = b"p2pc/reference"  # the "peer id" whose batches the reference run draws


@dataclasses.dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float | None  # classification: share of samples whose argmax is the label; None otherwise


def evaluate(model: nn.Module, dataset: Dataset, run_id: bytes, size: int, device: torch.device | str = "cpu",
             chunk: int | None = None) -> EvalResult:
    """Loss (and accuracy for classification) on the run's fixed held-out samples (the same on every machine),
    forwarded `chunk` samples at a time (bounds activation memory), without gradients, in eval mode."""
    x, y = eval_batch(dataset, run_id, size)
    task = dataset.shape.task
    loss_fn = loss_function(task)
    chunk = chunk or size
    total_loss, correct = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, size, chunk):
                xs, ys = x[start:start + chunk].to(device), y[start:start + chunk].to(device)
                output = model(xs)
                total_loss += float(loss_fn(output, ys)) * len(xs)
                if task == "classification":
                    correct += int((logits_of(output).argmax(dim=-1) == ys).sum())
    finally:
        model.train(was_training)
    return EvalResult(total_loss / size, correct / size if task == "classification" else None)


def evaluate_loss(model: nn.Module, dataset: Dataset, run_id: bytes, size: int,
                  device: torch.device | str = "cpu") -> float:
    """Loss on the run's fixed held-out batch (the same on every machine)."""
    return evaluate(model, dataset, run_id, size, device).loss


def train_locally(manifest: Manifest, epochs: Sequence[Sequence[tuple[bytes, int]]], data_dir: Path | None = None,
                  dataset: Dataset | None = None) -> tuple[nn.Module, Dataset]:
    """One optimizer step per epoch, from the run's initial model, over that epoch's batches: for each
    (peer id, steps) of epochs[e], the batches batch_for(run, peer, e, s) for s < steps, all together.

    Given the peers and step counts of a swarm's epochs, this recomputes the swarm on the very samples
    its peers drew (hivemind weights each peer's gradient by its sample count, so an epoch's averaged
    gradient is the mean over all of them): the auditor's view. `single_process(...)` plans a plain run."""
    dataset = dataset or run_dataset(manifest, data_dir)
    model = run_model(manifest)
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
