"""A manifest made real on this machine: its dataset (held-out split, the run's tokenizer) and its initial model (the
run's seed, or its initial weights), with the files it names resolved by sha256 through an ArtifactStore."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from p2pcompute.errors import DatasetUnavailable
from p2pcompute.runs.artifacts import ArtifactStore
from p2pcompute.runs.datasets import Dataset, open_dataset
from p2pcompute.runs.manifest import Manifest
from p2pcompute.runs.models import build_model


def run_tokenizer(manifest: Manifest, artifacts: ArtifactStore | None):
    """The run's TextTokenizer, or None when it trains on byte tokens."""
    sha256 = manifest.artifacts().get("tokenizer")
    if sha256 is None:
        return None
    if artifacts is None:
        raise DatasetUnavailable(f"the run's tokenizer {sha256[:16]}... needs an artifact store")
    from p2pcompute.runs.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(artifacts.resolve(sha256))
    vocab = dict(manifest.model["config"]).get("vocab_size")
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise DatasetUnavailable(f"the run's tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                                 f"vocab_size {vocab}")
    return tokenizer


def run_dataset(manifest: Manifest, data_dir: Path | None = None, stdlib_dir: Path | None = None,
                artifacts: ArtifactStore | None = None, shards=None) -> Dataset:
    """The run's dataset as every peer opens it: its held-out tail reserved when the run evaluates, text tokenized
    with the run's tokenizer when it names one."""
    return open_dataset(manifest.dataset.name, manifest.dataset.as_dict(), data_dir, stdlib_dir,
                        tokenizer=run_tokenizer(manifest, artifacts), holdout=manifest.holdout, shards=shards)


def run_model(manifest: Manifest, artifacts: ArtifactStore | None = None, *, with_init: bool = True) -> nn.Module:
    """The run's initial model: seeded by the run id (every peer starts identical), then the run's initial weights
    if it names them (`with_init=False`: skipped, for a caller that overwrites every parameter)."""
    model = build_model(manifest.model.name, manifest.model.as_dict(), manifest.init_seed)
    sha256 = manifest.artifacts().get("init")
    if sha256 is not None and with_init:
        if artifacts is None:
            raise DatasetUnavailable(f"the run's initial weights {sha256[:16]}... need an artifact store")
        from p2pcompute.runs.hf_models import load_initial_weights

        load_initial_weights(model, artifacts.resolve(sha256))
    return model


def check_artifacts(manifest: Manifest, artifacts: ArtifactStore) -> dict[str, Path]:
    """Every file the run names, resolved and checked as a peer will use it: the tokenizer loads and fits the model's
    vocabulary; the initial weights have exactly the model's parameter names and shapes (read from the safetensors
    header against a build on the meta device: no memory, no weights loaded). Returns {"init"/"tokenizer": path}."""
    found = {kind: artifacts.resolve(sha256) for kind, sha256 in manifest.artifacts().items()}
    if "tokenizer" in found:
        run_tokenizer(manifest, artifacts)
    if "init" in found:
        from p2pcompute.runs.hf_models import check_weights_file

        check_weights_file(manifest.model["task"], manifest.model["config"], found["init"])
    return found
