"""Checkpoints: a run model's state_dict and epoch in a file that loads with torch.load(weights_only=True); fetching one
from the swarm; exporting one as safetensors or as a Hugging Face directory."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2pcompute.errors import InvalidMessage, NotFound, UsageError
from p2pcompute.runs.artifacts import ArtifactStore
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.materialize import run_model

FORMAT = "p2pc-checkpoint/v1"
EXPORT_FORMATS = ("torch", "safetensors", "hf")
# A checkpoint file holds only tensors, ints and strings: torch.load(weights_only=True) refuses anything
# else, so a file from the network cannot run code. Its size is bounded by the model size cap.


def checkpoint_name(manifest: Manifest, epoch: int) -> str:
    return f"{manifest.name}-{manifest.run_id_hex[:12]}-epoch{epoch:06d}.pt"


def save_checkpoint(path: str | Path, model: nn.Module, manifest: Manifest, epoch: int) -> Path:
    """Write atomically: {"format", "run_id", "model" (zoo name), "epoch", "state_dict"}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "run_id": manifest.run_id_hex, "model": manifest.model.name, "epoch": int(epoch),
               "state_dict": state}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check the file's structure (weights_only: no code runs); InvalidMessage if malformed."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise NotFound(f"checkpoint {path} does not exist") from None
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # unreadable or unsafe
        raise InvalidMessage(f"{path} is not a loadable checkpoint: {str(e).splitlines()[0][:200]}") from None
    if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("run_id"), str)
            and isinstance(data.get("epoch"), int) and isinstance(data.get("state_dict"), dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data["state_dict"].items())):
        raise InvalidMessage(f"{path} is not a {FORMAT} file")
    return data


def load_checkpoint(path: str | Path, manifest: Manifest) -> tuple[nn.Module, int]:
    """The run's zoo model with the checkpoint's parameters, and its epoch."""
    data = read_checkpoint(path)
    if data["run_id"] != manifest.run_id_hex:
        raise InvalidMessage(f"{path} belongs to run {data['run_id'][:16]}..., not {manifest.run_id_hex[:16]}...")
    model = run_model(manifest, with_init=False)
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as e:
        raise InvalidMessage(f"{path}: parameters do not fit the run's model: {str(e).splitlines()[0]}") from None
    return model, data["epoch"]


def fetch_checkpoint(dht, manifest: Manifest, path: str | Path, timeout: float) -> int:
    """Download the current parameters from a peer training the run and write them as a checkpoint;
    returns the epoch. Uses the state download late joiners use, as a client: hivemind's TrainingStateAverager
    state in gradients mode (parameters and optimizer state; hivemind reads the epoch a moment after the
    parameters, so around an epoch boundary the label can be one ahead), the swarm's parameters phi in
    local mode (diloco.py)."""
    local = manifest.averaging.mode == "local"
    prefix = f"{manifest.hivemind_prefix}_{'outer' if local else 'state_averager'}"
    donors = dht.get(f"{prefix}.all_averagers", latest=True, return_future=True).result(timeout)
    if donors is None or not isinstance(donors.value, dict) or not any(
            isinstance(v.value, (int, float)) for v in donors.value.values()):
        raise NotFound(f"no peer of run {manifest.run_id_hex[:16]}... offers its state (is anyone training it?)")
    model = run_model(manifest, with_init=False)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # sentinel: any NaN left after the download means nothing arrived
    epoch = (_download_outer_state if local else _download_optimizer_state)(dht, manifest, model, prefix, timeout)
    if epoch is None or any(torch.isnan(param).any() for param in model.parameters()):
        raise NotFound(f"no peer of run {manifest.run_id_hex[:16]}... sent its state within {timeout:.0f} s")
    save_checkpoint(path, model, manifest, epoch)
    return epoch


def _download_optimizer_state(dht, manifest: Manifest, model: nn.Module, prefix: str, timeout: float) -> int | None:
    from p2pcompute.runs.optimizers import optimizer_factory
    from p2pcompute.training.observed import ObservedStateAverager, RoundObserver

    averager = ObservedStateAverager(
        observer=RoundObserver(), dht=dht, prefix=prefix, start=True,
        optimizer=optimizer_factory(manifest.optimizer.name, manifest.optimizer.as_dict(), with_state=True),
        params=list(model.parameters()), client_mode=True, allow_state_sharing=False, initialize_optimizer=False,
        min_matchmaking_time=float(manifest.averaging.matchmaking_time),
        request_timeout=float(manifest.averaging.request_timeout),
        next_chunk_timeout=float(manifest.averaging.next_chunk_timeout),
    )
    try:
        averager.load_state_from_peers(timeout=timeout)
        return averager.local_epoch
    finally:
        averager.shutdown()


def _download_outer_state(dht, manifest: Manifest, model: nn.Module, prefix: str, timeout: float) -> int | None:
    from p2pcompute.training.diloco import download_outer_state

    params = list(model.parameters())
    downloaded = download_outer_state(dht, prefix, params, momentum=manifest.averaging.outer_momentum > 0,
                                      timeout=timeout, next_chunk_timeout=float(manifest.averaging.next_chunk_timeout))
    if downloaded is None:
        return None
    epoch, tensors = downloaded
    with torch.no_grad():
        for param, tensor in zip(params, tensors):
            param.copy_(tensor)
    return epoch


def export_checkpoint(source: str | Path, manifest: Manifest, fmt: str, out: str | Path,
                      artifacts: ArtifactStore | None = None) -> dict[str, Any]:
    """Write a checkpoint file of the run in another format; returns what was written.

    torch: the checkpoint file itself. safetensors: the parameters (tied weights stored once) with the run id,
    model and epoch as metadata. hf (runs of `hf` models only): a directory with config.json and
    model.safetensors that `AutoModelFor<task>.from_pretrained(out)` loads, plus the run's tokenizer
    (tokenizer.json, AutoTokenizer-loadable) if it names one and `artifacts` holds it. Written next to `out`
    and moved into place, so a failure leaves no half-written output."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    out = Path(out)
    if fmt == "hf" and manifest.model.name != "hf":
        raise UsageError(f"--format hf needs a run of an hf model; this run trains the zoo's {manifest.model.name!r} "
                         "(use torch or safetensors)")
    if fmt == "hf" and out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; --format hf writes a directory")
    if fmt != "hf" and out.is_dir():
        raise UsageError(f"{out} is a directory; --format {fmt} writes a file")
    model, epoch = load_checkpoint(source, manifest)
    report: dict[str, Any] = {"path": str(out), "format": fmt, "epoch": epoch}
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    try:
        if fmt == "torch":
            shutil.copyfile(source, tmp)
        elif fmt == "safetensors":
            from safetensors.torch import save_model

            save_model(model, str(tmp), metadata={"format": FORMAT, "run_id": manifest.run_id_hex,
                                                  "model": manifest.model.name, "epoch": str(epoch)})
        else:
            from p2pcompute.runs import hf_models

            hf_models.save_pretrained(model, tmp)
            report["tokenizer"] = _export_tokenizer(manifest, artifacts, tmp)
        if out.is_dir() and fmt == "hf":
            if any(out.iterdir()):
                raise UsageError(f"{out} is a directory that is not empty")
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return report


def _export_tokenizer(manifest: Manifest, artifacts: ArtifactStore | None, directory: Path) -> str | None:
    """Copy the run's tokenizer next to an hf export; the reason it is missing otherwise (never fatal: the model is
    what was asked for)."""
    from p2pcompute.errors import DatasetUnavailable
    from p2pcompute.runs import hf_models

    sha256 = manifest.artifacts().get("tokenizer")
    if sha256 is None:
        return None
    if artifacts is None:
        return f"missing: no artifact store to find tokenizer {sha256[:16]}... in"
    try:
        hf_models.save_tokenizer(artifacts.resolve(sha256), directory)
    except DatasetUnavailable as e:
        return f"missing: {e}"
    return "tokenizer.json"
