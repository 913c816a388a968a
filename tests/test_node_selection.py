"""Run selection: the one run-prefix rule (id prefix of 4+ hex digits, or exact name) and the node's choice of run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from p2pcompute.errors import NotFound, UsageError
from p2pcompute.identity import Identity
from p2pcompute.node.selection import MIN_RUN_PREFIX, choose_run, find_run
from p2pcompute.runs.manifest import Manifest, sign_manifest

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
GIB = 2**30


@pytest.fixture(scope="module")
def runs():
    publisher = Identity.generate()
    return {name: sign_manifest(Manifest.load(EXAMPLES / f"{name}.toml"), publisher)
            for name in ("mlp-synthetic", "cnn-synthetic", "transformer-pystdlib")}


def test_find_run_by_name_or_prefix(runs):
    listed = list(runs.values())
    mlp = runs["mlp-synthetic"]
    assert find_run(listed, "mlp-synthetic") is mlp
    assert find_run(listed, mlp.run_id.hex()[:MIN_RUN_PREFIX]) is mlp
    assert find_run(listed, mlp.run_id.hex()[:MIN_RUN_PREFIX + 2].upper()) is mlp
    with pytest.raises(NotFound):  # too short to be a prefix, and no run has that name
        find_run(listed, mlp.run_id.hex()[:MIN_RUN_PREFIX - 1])
    for bad in ("", None, 7):
        with pytest.raises(UsageError):
            find_run(listed, bad)
    twin = sign_manifest(dataclasses.replace(mlp.manifest, description="another"), Identity.generate())
    with pytest.raises(UsageError, match="matches 2 runs"):
        find_run(listed + [twin], "mlp-synthetic")


def test_choose_run_follows_the_same_rule_and_the_hardware(runs):
    listed = list(runs.values())
    mlp, transformer = runs["mlp-synthetic"], runs["transformer-pystdlib"]
    assert choose_run(listed, "cpu", 8 * GIB, wanted=mlp.run_id.hex()[:MIN_RUN_PREFIX]) == (mlp, "asked for")
    run, why = choose_run(listed, "cpu", 8 * GIB, wanted="no-such-run")
    assert run is None and "not announced" in why
    run, why = choose_run(listed, "cpu", 512 * 2**20, wanted="transformer-pystdlib")
    assert run is None and "memory" in why
    assert choose_run(listed, "cpu", 8 * GIB) == (transformer, "best fit for this hardware")  # the largest model
    assert choose_run(listed, "cpu", 512 * 2**20) == (mlp, "best fit for this hardware")  # the largest that fits
    assert choose_run(listed, "cpu", 8 * GIB, skip=frozenset({transformer.run_id}))[0] is mlp
    everything = frozenset(r.run_id for r in listed)
    assert choose_run(listed, "cpu", 8 * GIB, skip=everything) == (None, "every announced run has ended here")
    assert choose_run([], "cpu", 8 * GIB) == (None, "no run is announced in the swarm")
