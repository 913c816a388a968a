"""The model zoo: architectures a manifest may name, their bounded configs, parameter counts and builders."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from p2pcompute.errors import InvalidManifest
from p2pcompute.runs.schema import Choice, Int, ListOf, Param, Schema

# The largest model a manifest may ask for: GPT-2-medium size. In fp32 with Adam that is ~5.6 GB of
# weights, gradients and optimizer state, the most a volunteer's 8-12 GB consumer GPU can train.
MAX_PARAMETERS = 350_000_000

TASKS = ("regression", "classification", "lm")


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What a dataset produces, so a model config can be checked against it before anything is built.

    regression: inputs float [B, *input_shape], targets float [B, outputs]
    classification: inputs float [B, *input_shape], targets int64 [B] in [0, outputs)
    lm: inputs int64 [B, seq_len] tokens in [0, outputs), targets the same shifted by one
    """

    task: str
    input_shape: tuple[int, ...]
    outputs: int


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    schema: Schema
    count_parameters: Callable[[Mapping[str, Any]], int]
    check_against: Callable[[Mapping[str, Any], DataShape], None]  # raises ValueError naming the mismatch
    build: Callable[[Mapping[str, Any]], nn.Module]


# ---- MLP ------------------------------------------------------------------------------------------

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _mlp_widths(cfg: Mapping[str, Any]) -> list[int]:
    return [cfg["in_features"], *cfg["hidden"], cfg["out_features"]]


def _mlp_count(cfg: Mapping[str, Any]) -> int:
    widths = _mlp_widths(cfg)
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def _mlp_check(cfg: Mapping[str, Any], shape: DataShape) -> None:
    if shape.task == "lm":
        raise ValueError("an MLP cannot train on a language-model dataset; use model 'transformer'")
    if cfg["in_features"] != math.prod(shape.input_shape):
        raise ValueError(f"in_features is {cfg['in_features']} but the dataset's inputs have "
                         f"{math.prod(shape.input_shape)} features")
    if cfg["out_features"] != shape.outputs:
        raise ValueError(f"out_features is {cfg['out_features']} but the dataset has {shape.outputs} outputs")


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], out_features: int, activation: str):
        super().__init__()
        widths = [in_features, *hidden, out_features]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(_ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---- CNN ------------------------------------------------------------------------------------------


def _cnn_count(cfg: Mapping[str, Any]) -> int:
    k2 = cfg["kernel_size"] ** 2
    channels = [cfg["in_channels"], *cfg["channels"]]
    convs = sum(a * b * k2 + b for a, b in zip(channels, channels[1:]))
    return convs + channels[-1] * cfg["num_classes"] + cfg["num_classes"]


def _cnn_check(cfg: Mapping[str, Any], shape: DataShape) -> None:
    expected = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    if shape.task == "lm":
        raise ValueError("a CNN cannot train on a language-model dataset; use model 'transformer'")
    if cfg["kernel_size"] % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {cfg['kernel_size']}")
    if tuple(shape.input_shape) != expected:
        raise ValueError(f"expects inputs of shape {list(expected)} (in_channels, image_size, image_size) "
                         f"but the dataset gives {list(shape.input_shape)}")
    if cfg["num_classes"] != shape.outputs:
        raise ValueError(f"num_classes is {cfg['num_classes']} but the dataset has {shape.outputs} outputs")


class CNN(nn.Module):
    """Conv-ReLU(-MaxPool while the image is larger than 1 pixel) blocks, global average pooling, a linear head."""

    def __init__(self, in_channels: int, image_size: int, channels: tuple[int, ...], kernel_size: int,
                 num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        size, c_in = image_size, in_channels
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


# ---- decoder-only transformer LM ------------------------------------------------------------------


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


class TransformerLM(nn.Module):
    """A small GPT-style decoder: learned positions, pre-norm blocks with causal self-attention, no dropout
    (training stays a deterministic function of the batch)."""

    def __init__(self, vocab_size: int, context: int, d_model: int, n_layers: int, n_heads: int, ff_mult: int):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=ff_mult * d_model, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        x = self.blocks(x, mask=mask, is_causal=True)
        return self.head(self.norm(x))


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(
        Schema(
            Param("in_features", Int(1, 1 << 20), doc="input features (product of the dataset's input shape)"),
            Param("hidden", ListOf(Int(1, 16384), 0, 16), doc="widths of the hidden layers"),
            Param("out_features", Int(1, 1 << 20), doc="outputs (regression dims or classes)"),
            Param("activation", Choice(tuple(_ACTIVATIONS)), "relu"),
        ),
        _mlp_count, _mlp_check,
        lambda c: MLP(c["in_features"], c["hidden"], c["out_features"], c["activation"]),
    ),
    "cnn": ModelEntry(
        Schema(
            Param("in_channels", Int(1, 64)),
            Param("image_size", Int(2, 1024)),
            Param("channels", ListOf(Int(1, 1024), 1, 8), doc="output channels of each conv block"),
            Param("kernel_size", Int(1, 7), 3),
            Param("num_classes", Int(1, 1 << 20)),
        ),
        _cnn_count, _cnn_check,
        lambda c: CNN(c["in_channels"], c["image_size"], c["channels"], c["kernel_size"], c["num_classes"]),
    ),
    "transformer": ModelEntry(
        Schema(
            Param("vocab_size", Int(2, 65536), 256),
            Param("context", Int(2, 4096)),
            Param("d_model", Int(8, 4096)),
            Param("n_layers", Int(1, 48)),
            Param("n_heads", Int(1, 64)),
            Param("ff_mult", Int(1, 8), 4),
        ),
        _transformer_count, _transformer_check,
        lambda c: TransformerLM(c["vocab_size"], c["context"], c["d_model"], c["n_layers"], c["n_heads"],
                                c["ff_mult"]),
    ),
}


def model_entry(name: str, where: str = "model.name") -> ModelEntry:
    entry = MODELS.get(name) if isinstance(name, str) else None
    if entry is None:
        raise InvalidManifest(f"{where}: unknown model {name!r} (the zoo has: {', '.join(MODELS)})")
    return entry


def check_model(name: str, config: Mapping[str, Any], shape: DataShape, where: str = "model") -> int:
    """Check a (schema-valid) model config against the dataset and the size cap; return its parameter count."""
    entry = model_entry(name)
    try:
        entry.check_against(config, shape)
    except ValueError as e:
        raise InvalidManifest(f"{where}: {e}") from None
    count = entry.count_parameters(config)
    if count > MAX_PARAMETERS:
        raise InvalidManifest(f"{where}: {count:,} parameters is above the limit of {MAX_PARAMETERS:,}")
    return count


def build_model(name: str, config: Mapping[str, Any], seed: int) -> nn.Module:
    """Build a zoo model with parameters initialised from `seed` (every peer of a run starts identical);
    the global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_entry(name).build(config)


def loss_function(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task == "regression":
        return nn.functional.mse_loss
    if task == "classification":
        return nn.functional.cross_entropy
    if task == "lm":
        return lambda logits, targets: nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())
    raise ValueError(f"unknown task {task!r}")
