"""Model zoo specs (torch-free): the architectures a manifest may name, their bounded configs and sizes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from p2pcompute.errors import InvalidManifest
from p2pcompute.runs import hf_specs
from p2pcompute.runs.schema import Choice, Int, ListOf, Param, Schema, zoo_lookup

# The largest model a manifest may ask for: GPT-2-medium size. In fp32 with Adam that is ~5.6 GB of
# weights, gradients and optimizer state, the most a volunteer's 8-12 GB consumer GPU can train.
MAX_PARAMETERS = 350_000_000

TASKS = ("regression", "classification", "lm")
ACTIVATIONS = ("relu", "gelu", "tanh")


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What a dataset produces, so a model config can be checked against it before anything is built.

    regression: inputs float [B, *input_shape], targets float [B, outputs]
    classification: inputs float [B, *input_shape], targets int64 [B] in [0, outputs)
    lm: inputs int64 [B, seq_len] tokens in [0, outputs), targets the same shifted by one
    `vocab` > 0: the inputs are int64 tokens in [0, vocab) (a classification dataset of token sequences)
    """

    task: str
    input_shape: tuple[int, ...]
    outputs: int
    vocab: int = 0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    schema: Schema
    count_parameters: Callable[[Mapping[str, Any]], int]
    check_against: Callable[[Mapping[str, Any], DataShape], None]  # raises ValueError naming the mismatch


def _mlp_count(cfg: Mapping[str, Any]) -> int:
    widths = [cfg["in_features"], *cfg["hidden"], cfg["out_features"]]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def _mlp_check(cfg: Mapping[str, Any], shape: DataShape) -> None:
    if shape.task == "lm" or shape.vocab:
        raise ValueError("an MLP cannot train on a language-model dataset; use model 'transformer'")
    if cfg["in_features"] != math.prod(shape.input_shape):
        raise ValueError(f"in_features is {cfg['in_features']} but the dataset's inputs have "
                         f"{math.prod(shape.input_shape)} features")
    if cfg["out_features"] != shape.outputs:
        raise ValueError(f"out_features is {cfg['out_features']} but the dataset has {shape.outputs} outputs")


def _cnn_count(cfg: Mapping[str, Any]) -> int:
    k2 = cfg["kernel_size"] ** 2
    channels = [cfg["in_channels"], *cfg["channels"]]
    convs = sum(a * b * k2 + b for a, b in zip(channels, channels[1:]))
    return convs + channels[-1] * cfg["num_classes"] + cfg["num_classes"]


def _cnn_check(cfg: Mapping[str, Any], shape: DataShape) -> None:
    expected = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    if shape.task == "lm" or shape.vocab:
        raise ValueError("a CNN cannot train on a language-model dataset; use model 'transformer'")
    if cfg["kernel_size"] % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {cfg['kernel_size']}")
    if tuple(shape.input_shape) != expected:
        raise ValueError(f"expects inputs of shape {list(expected)} (in_channels, image_size, image_size) "
                         f"but the dataset gives {list(shape.input_shape)}")
    if cfg["num_classes"] != shape.outputs:
        raise ValueError(f"num_classes is {cfg['num_classes']} but the dataset has {shape.outputs} outputs")


def _transformer_count(cfg: Mapping[str, Any]) -> int:
    d, v, ff = cfg["d_model"], cfg["vocab_size"], cfg["ff_mult"] * cfg["d_model"]
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
    return v * d + cfg["context"] * d + cfg["n_layers"] * per_layer + 2 * d + d * v + v


def _transformer_check(cfg: Mapping[str, Any], shape: DataShape) -> None:
    if shape.task != "lm":
        raise ValueError(f"a transformer LM needs a language-model dataset, not a {shape.task} one")
    if cfg["d_model"] % cfg["n_heads"]:
        raise ValueError(f"d_model ({cfg['d_model']}) must be divisible by n_heads ({cfg['n_heads']})")
    if cfg["vocab_size"] < shape.outputs:
        raise ValueError(f"vocab_size is {cfg['vocab_size']} but the dataset's tokens go up to {shape.outputs}")
    if cfg["context"] < shape.input_shape[0]:
        raise ValueError(f"context is {cfg['context']} but the dataset's sequences are {shape.input_shape[0]} long")


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        Schema(
            Param("in_features", Int(1, 1 << 20), doc="input features (product of the dataset's input shape)"),
            Param("hidden", ListOf(Int(1, 16384), 0, 16), doc="widths of the hidden layers"),
            Param("out_features", Int(1, 1 << 20), doc="outputs (regression dims or classes)"),
            Param("activation", Choice(ACTIVATIONS), "relu"),
        ),
        _mlp_count, _mlp_check,
    ),
    "cnn": ModelSpec(
        Schema(
            Param("in_channels", Int(1, 64)),
            Param("image_size", Int(2, 1024)),
            Param("channels", ListOf(Int(1, 1024), 1, 8), doc="output channels of each conv block"),
            Param("kernel_size", Int(1, 7), 3),
            Param("num_classes", Int(1, 1 << 20)),
        ),
        _cnn_count, _cnn_check,
    ),
    "transformer": ModelSpec(
        Schema(
            Param("vocab_size", Int(2, 65536), 256),
            Param("context", Int(2, 4096)),
            Param("d_model", Int(8, 4096)),
            Param("n_layers", Int(1, 48)),
            Param("n_heads", Int(1, 64)),
            Param("ff_mult", Int(1, 8), 4),
        ),
        _transformer_count, _transformer_check,
    ),
    # a Hugging Face transformers architecture given by its config (runs/hf_specs.py); needs the `hf` extra
    "hf": ModelSpec(hf_specs.SCHEMA, hf_specs.count_parameters, hf_specs.check_against),
}


def model_spec(name: str, where: str = "model.name") -> ModelSpec:
    return zoo_lookup(MODELS, name, where, "model")


def check_model(name: str, config: Mapping[str, Any], shape: DataShape, where: str = "model") -> int:
    """Check a (schema-valid) model config against the dataset and the size cap; return its parameter count."""
    spec = model_spec(name)
    try:
        spec.check_against(config, shape)
    except ValueError as e:
        raise InvalidManifest(f"{where}: {e}") from None
    count = spec.count_parameters(config)
    if count > MAX_PARAMETERS:
        raise InvalidManifest(f"{where}: {count:,} parameters is above the limit of {MAX_PARAMETERS:,}")
    return count
