"""The optimizer zoo: sgd/adam/adamw with bounded hyperparameters, and the torch factories built from them."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from p2pcompute.errors import InvalidManifest
from p2pcompute.runs.schema import Bool, Dec, Param, Schema

_LR = Param("lr", Dec("0", "10", lo_open=True))
_WEIGHT_DECAY = Param("weight_decay", Dec("0", "1"), "0")
_ADAM = (
    _LR,
    Param("beta1", Dec("0", "1"), "0.9"),
    Param("beta2", Dec("0", "1"), "0.999"),
    Param("eps", Dec("0", "1", lo_open=True), "0.00000001"),
)

OPTIMIZERS: dict[str, Schema] = {
    "sgd": Schema(_LR, Param("momentum", Dec("0", "1"), "0"), Param("nesterov", Bool(), False), _WEIGHT_DECAY),
    "adam": Schema(*_ADAM, _WEIGHT_DECAY),
    "adamw": Schema(*_ADAM, Param("weight_decay", Dec("0", "1"), "0.01")),
}


def optimizer_schema(name: str, where: str = "optimizer.name") -> Schema:
    schema = OPTIMIZERS.get(name) if isinstance(name, str) else None
    if schema is None:
        raise InvalidManifest(f"{where}: unknown optimizer {name!r} (choose one of: {', '.join(OPTIMIZERS)})")
    return schema


def check_optimizer(name: str, config: Mapping[str, Any], where: str = "optimizer") -> None:
    if name == "sgd" and config["nesterov"] and config["momentum"] == 0:
        raise InvalidManifest(f"{where}.nesterov: needs a momentum above 0")


def optimizer_factory(name: str, config: Mapping[str, Any]) -> Callable[[Any], torch.optim.Optimizer]:
    """A callable(params) -> torch optimizer, as hivemind.Optimizer wants it."""
    lr, wd = float(config["lr"]), float(config["weight_decay"])
    if name == "sgd":
        momentum, nesterov = float(config["momentum"]), config["nesterov"]
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    betas, eps = (float(config["beta1"]), float(config["beta2"])), float(config["eps"])
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return lambda params: cls(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
