"""Run specs written by code: the TOML of a small MLP learning synthetic data, for the demo, benchmarks and tests."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from p2pcompute.runs.manifest import LOCAL_NETWORK_AVERAGING, toml_lines


def mlp_synthetic_spec(name: str, *, batch_size_per_step: int, target_batch_size: int, in_features: int,
                       hidden: Sequence[int], out_features: int, seed: int, description: str | None = None,
                       max_epochs: int | None = None, activation: str | None = None, noise: str | None = None,
                       optimizer: str = "adam", lr: str = "0.01", mode: str = "gradients",
                       averaging: Mapping[str, Any] = {}, hardware: Mapping[str, Any] = {},
                       credits: Mapping[str, Any] = {}) -> str:
    """A TOML run spec (what `Manifest.from_toml` reads): an `mlp` of `in_features -> hidden -> out_features`
    learning the `synthetic` regression task of the same shape (its teacher fixed by `seed`).

    [averaging] is `mode` over manifest.LOCAL_NETWORK_AVERAGING (peers on one machine or a LAN), then `averaging`
    (e.g. {"average_state_every": 5, "overlap": True}); [hardware] and [credits] hold what is given. A value
    left None, like any field not named here, is the manifest's default. Decimals are given as strings ("0.05")."""
    top = {"name": name, "description": description, "batch_size_per_step": batch_size_per_step,
           "target_batch_size": target_batch_size, "max_epochs": max_epochs}
    model = {"name": "mlp", "in_features": in_features, "hidden": list(hidden), "out_features": out_features,
             "activation": activation}
    dataset = {"name": "synthetic", "task": "regression", "input_shape": [in_features], "outputs": out_features,
               "noise": noise, "seed": seed}
    tables = {"model": model, "dataset": dataset, "optimizer": {"name": optimizer, "lr": lr},
              "averaging": {"mode": mode, **LOCAL_NETWORK_AVERAGING, **averaging}, "hardware": hardware,
              "credits": credits}
    return _given(top) + "".join(f"\n[{table}]\n{_given(values)}" for table, values in tables.items() if values)


def _given(values: Mapping[str, Any]) -> str:
    return toml_lines({key: value for key, value in values.items() if value is not None})
