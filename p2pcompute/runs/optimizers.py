"""The optimizer zoo: sgd/adam/adamw with bounded hyperparameters, and the torch factories built from them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from p2pcompute.errors import InvalidManifest
from p2pcompute.runs.schema import Bool, Dec, Param, Schema, zoo_lookup

if TYPE_CHECKING:
    import torch

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
    return zoo_lookup(OPTIMIZERS, name, where, "optimizer")


def check_optimizer(name: str, config: Mapping[str, Any], where: str = "optimizer") -> None:
    if name == "sgd" and config["nesterov"] and config["momentum"] == 0:
        raise InvalidManifest(f"{where}.nesterov: needs a momentum above 0")


def optimizer_factory(name: str, config: Mapping[str, Any],
                      with_state: bool = False) -> Callable[[Any], "torch.optim.Optimizer"]:
    """A callable(params) -> torch optimizer, as hivemind.Optimizer wants it.

    with_state: the optimizer comes with its state tensors already allocated (zero moments, step 0).
    hivemind needs them to exist for averaging and state download and otherwise creates them by
    running one optimizer step with zero gradients, which leaves Adam's step count at 1 and so shrinks
    its first real updates (bias correction); ours is exactly a fresh optimizer."""
    import torch

    lr, wd = float(config["lr"]), float(config["weight_decay"])
    if name == "sgd":
        momentum, nesterov = float(config["momentum"]), config["nesterov"]
        make = lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    else:
        betas, eps = (float(config["beta1"]), float(config["beta2"])), float(config["eps"])
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        make = lambda params: cls(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if not with_state:
        return make

    def make_with_state(params):
        optimizer = make(params)
        allocate_state(optimizer)
        return optimizer

    return make_with_state


def allocate_state(optimizer: "torch.optim.Optimizer") -> None:
    """One step with zero gradients at lr 0 (allocates every state tensor, moves no parameter), then zero
    the state: zero moments at step 0 are what a fresh Adam/SGD starts from (coupled weight decay would
    have put wd * param into them), so the next step is the first real one."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.grad for p in params]
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # decoupled weight decay (AdamW) would otherwise move the parameters
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved_lr):
        group["lr"] = lr
    for p, grad in zip(params, saved):
        p.grad = grad
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value.zero_()
            elif key == "step":
                state[key] = 0
