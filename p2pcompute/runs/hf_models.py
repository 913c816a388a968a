"""Hugging Face models built from a checked config (`from_config`, never remote code or hub downloads), their size
counted on the meta device, initial weights loaded from safetensors.

transformers is imported here only, and only when a run names `hf` (it takes seconds to import).
"""

from __future__ import annotations

import functools
import os
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import torch
from torch import nn

from p2pcompute.errors import InvalidManifest, TrainingError

# What transformers raises for a config it cannot build (checks spread over its modeling code); a manifest is
# validated inside the DHT process too, where anything else would escape a record validator.
BUILD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, RuntimeError)

# the transformers auto class for each task (runs.hf_specs.TASKS)
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}


# transformers' lazy module is not thread-safe: a thread reading `transformers.AutoModelForCausalLM` while another
# imports it got an AttributeError (a node checks manifests on its ledger sync thread while its trainer builds the
# model). The first import and the names we use are resolved under this lock, once.
_IMPORT_LOCK = threading.Lock()
_NAMES_USED = ("AutoConfig", "PreTrainedTokenizerFast", *AUTO_CLASSES.values())


def _transformers():
    """Import transformers with the hub switched off: nothing in this process may download (set before the import,
    which reads it). Thread-safe: the names we use are resolved under the lock before anyone gets the module."""
    with _IMPORT_LOCK:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        try:
            import transformers
        except ImportError:
            raise InvalidManifest("model.name: 'hf' models need the transformers package "
                                  "(pip install 'p2pcompute[hf]')") from None
        transformers.logging.set_verbosity_error()
        for name in _NAMES_USED:  # cached in the module after the first time
            getattr(transformers, name)
        return transformers


def hf_config(task: str, config: tuple[tuple[str, Any], ...]):
    """The transformers config object (`AutoConfig.for_model`): the manifest's keys, decimals as floats, no
    KV cache (training only), single-label classification for the classifiers."""
    transformers = _transformers()
    values = {k: float(v) if isinstance(v, Decimal) else v for k, v in config}
    model_type = values.pop("model_type")
    values["use_cache"] = False
    if task != "causal-lm":
        values["problem_type"] = "single_label_classification"
    try:
        return transformers.AutoConfig.for_model(model_type, **values)
    except BUILD_ERRORS as e:
        raise InvalidManifest(f"model.config: transformers refused it: {str(e).splitlines()[0][:200]}") from None


def build(task: str, config: tuple[tuple[str, Any], ...]) -> nn.Module:
    """A freshly initialised model (torch's global RNG: the caller seeds it), in training mode."""
    transformers = _transformers()
    auto = getattr(transformers, AUTO_CLASSES[task])
    try:
        model = auto.from_config(hf_config(task, config))
    except BUILD_ERRORS as e:
        raise InvalidManifest(f"model.config: transformers could not build it: {str(e).splitlines()[0][:200]}") from None
    return model.train()


@functools.lru_cache(maxsize=128)
def count_parameters(task: str, config: tuple[tuple[str, Any], ...]) -> int:
    """Parameters of the model, tied weights counted once, from a build on the meta device (shapes only: no
    memory, no initialisation), so an oversize config is refused before anything real is allocated."""
    with torch.device("meta"):
        model = build(task, config)
    return sum(p.numel() for p in model.parameters())


def load_initial_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file into the model: the keys and shapes must match exactly (tied weights may be stored
    once). TrainingError naming the difference otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError) as e:
        raise TrainingError(f"initial weights {path.name}: not a safetensors file ({e})") from None
    except RuntimeError as e:  # load_state_dict: a shape differs
        raise TrainingError(f"initial weights {path.name} do not fit the model: {str(e).splitlines()[-1][:200]}") from None
    absent = set(missing)
    missing = [group[0] for group in _tied_groups(model) if all(k in absent for k in group)]
    if missing or unexpected:
        raise TrainingError(f"initial weights {path.name} do not fit the model: missing {missing[:3]}, "
                            f"unexpected {list(unexpected)[:3]}")


def check_weights_file(task: str, config: tuple[tuple[str, Any], ...], path: Path) -> None:
    """The names and shapes in a safetensors file's header against the model built on the meta device (tied weights
    may be stored once); TrainingError naming the first difference."""
    from safetensors import SafetensorError, safe_open

    with torch.device("meta"):
        model = build(task, config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise TrainingError(f"initial weights {path.name}: not a safetensors file ({e})") from None
    missing = sorted(group[0] for group in _tied_groups(model) if not any(k in stored for k in group))
    unexpected = sorted(k for k in stored if k not in expected)
    wrong = sorted(k for k in stored if k in expected and stored[k] != expected[k])
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0]} has shape {list(stored[wrong[0]])}, the model {list(expected[wrong[0]])}")
        raise TrainingError(f"initial weights {path.name} do not fit the model: {detail}")


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they are (tied embeddings are one parameter under two names), by
    object identity, which also holds on the meta device (where every data pointer is 0)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def save_pretrained(model: nn.Module, directory: Path) -> None:
    """config.json + model.safetensors, what `AutoModelFor<task>.from_pretrained(directory)` loads."""
    model.save_pretrained(str(directory), safe_serialization=True)


def save_tokenizer(tokenizer_json: Path, directory: Path) -> None:
    """The tokenizer next to the model, loadable with AutoTokenizer.from_pretrained(directory)."""
    transformers = _transformers()
    from tokenizers import Tokenizer

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tokenizer_json)))
    fast.save_pretrained(str(directory))
