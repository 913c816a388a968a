"""The model zoo's torch modules (MLP, CNN, decoder-only transformer LM), built from checked configs; `hf` models
through runs/hf_models.py."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from p2pcompute.runs.model_specs import model_spec

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


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


_BUILDERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "mlp": lambda c: MLP(c["in_features"], c["hidden"], c["out_features"], c["activation"]),
    "cnn": lambda c: CNN(c["in_channels"], c["image_size"], c["channels"], c["kernel_size"], c["num_classes"]),
    "transformer": lambda c: TransformerLM(c["vocab_size"], c["context"], c["d_model"], c["n_layers"],
                                           c["n_heads"], c["ff_mult"]),
    "hf": lambda c: _build_hf(c["task"], c["config"]),
}


def _build_hf(task: str, config) -> nn.Module:
    from p2pcompute.runs import hf_models  # lazy: transformers takes seconds to import

    return hf_models.build(task, config)


def build_model(name: str, config: Mapping[str, Any], seed: int) -> nn.Module:
    """Build a zoo model with parameters initialised from `seed` (every peer of a run starts identical);
    the global torch RNG is left as it was."""
    model_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[name](config)


def logits_of(output: Any) -> torch.Tensor:
    """A model's prediction tensor: zoo models return it, transformers models a ModelOutput holding `.logits`."""
    return output if isinstance(output, torch.Tensor) else output.logits


def loss_function(task: str) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """loss(model output, targets) for a dataset task; the output may be logits or a transformers ModelOutput."""
    if task == "regression":
        return lambda output, targets: nn.functional.mse_loss(logits_of(output), targets)
    if task == "classification":
        return lambda output, targets: nn.functional.cross_entropy(logits_of(output), targets)
    if task == "lm":
        return lambda output, targets: nn.functional.cross_entropy(logits_of(output).flatten(0, -2),
                                                                   targets.flatten())
    raise ValueError(f"unknown task {task!r}")
