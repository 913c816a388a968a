"""Dataset zoo specs (torch-free): the sources a manifest may name, their configs and the data they yield."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from p2pcompute.errors import InvalidManifest
from p2pcompute.runs.model_specs import DataShape
from p2pcompute.runs.schema import FILE_NAME, SHA256_HEX, Choice, Dec, Int, ListOf, Param, Schema, Str, zoo_lookup

# Inputs of one sample may hold at most this many values (a 3x512x512 image is 786k): keeps a
# manifest from asking every volunteer for gigabytes per batch.
MAX_SAMPLE_VALUES = 1 << 20
BYTE_VOCAB = 256  # text datasets are byte-level: one token per byte

REQUIRED_SHA256 = Str(64, r"[0-9a-f]{64}", "sha256 hex digest (64 lower-case hex digits)")


def _features_shape(cfg: Mapping[str, Any]) -> DataShape:
    return DataShape(cfg["task"], tuple(cfg["input_shape"]), cfg["outputs"])


def _text_shape(cfg: Mapping[str, Any]) -> DataShape:
    return DataShape("lm", (cfg["seq_len"],), BYTE_VOCAB)


def _p2p_shape(cfg: Mapping[str, Any]) -> DataShape:
    if cfg["task"] == "lm":
        return _text_shape(cfg)
    return DataShape("classification", tuple(cfg["input_shape"]), cfg["outputs"])


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    schema: Schema
    data_shape: Callable[[Mapping[str, Any]], DataShape]


_SHAPE = ListOf(Int(1, 4096), 1, 3)
_COLUMN = Str(128, r"[^\x00-\x1f\x7f]+", "column name")

DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(
        Schema(
            Param("task", Choice(("regression", "classification"))),
            Param("input_shape", _SHAPE, doc="shape of one input, e.g. [32] or [1, 8, 8]"),
            Param("outputs", Int(1, 4096), doc="regression dims or number of classes"),
            Param("noise", Dec("0", "10"), "0.1"),
            Param("seed", Int(0, (1 << 63) - 1), doc="fixes the true function"),
            Param("teacher_hidden", Int(1, 1024), 32),
        ),
        _features_shape,
    ),
    "tokens": DatasetSpec(
        Schema(
            Param("seq_len", Int(1, 4096), doc="tokens per sequence"),
            Param("vocab_size", Int(2, 262_144), doc="tokens are drawn uniformly from [0, vocab_size)"),
            Param("classes", Int(2, 4096)),
            Param("noise", Dec("0", "10"), "0.1"),
            Param("seed", Int(0, (1 << 63) - 1), doc="fixes the labelling rule"),
        ),
        lambda cfg: DataShape("classification", (cfg["seq_len"],), cfg["classes"], vocab=cfg["vocab_size"]),
    ),
    "arrays": DatasetSpec(
        Schema(
            Param("task", Choice(("regression", "classification"))),
            Param("inputs", FILE_NAME, doc=".npy float array [N, *input_shape], in the node's data directory"),
            Param("inputs_sha256", REQUIRED_SHA256),
            Param("targets", FILE_NAME, doc=".npy array: float [N, outputs] or integer labels [N]"),
            Param("targets_sha256", REQUIRED_SHA256),
            Param("input_shape", _SHAPE),
            Param("outputs", Int(1, 1 << 20)),
        ),
        _features_shape,
    ),
    "text": DatasetSpec(
        Schema(
            Param("file", FILE_NAME, doc="a text (any bytes) file in the node's data directory"),
            Param("sha256", REQUIRED_SHA256),
            Param("seq_len", Int(2, 4096)),
        ),
        _text_shape,
    ),
    "pystdlib": DatasetSpec(
        Schema(
            Param("seq_len", Int(2, 4096)),
            Param("packages", ListOf(Str(64, r"[A-Za-z_][A-Za-z0-9_]*", "module name"), 0, 256, unique=True), (),
                  doc="top-level stdlib packages/modules to use; empty: all"),
            Param("sha256", SHA256_HEX, "", doc="sha256 of the corpus; empty: not checked (Python versions differ)"),
        ),
        _text_shape,
    ),
    # a dataset published peer to peer (docs/data.md): volunteers fetch the shards they train on from any peer
    "p2p": DatasetSpec(
        Schema(
            Param("id", REQUIRED_SHA256, doc="the dataset id `p2pc data publish` printed (sha256 of its manifest)"),
            Param("task", Choice(("lm", "classification")), "lm",
                  doc="lm: byte-level language modelling on a text column; classification: an image (or any "
                      "numeric array) column and an integer label column"),
            Param("text_column", _COLUMN, "text", doc="lm: the column of text"),
            Param("seq_len", Int(2, 4096), 128, doc="lm: bytes per sample"),
            Param("image_column", _COLUMN, "image", doc="classification: a numeric array column, one input a row"),
            Param("label_column", _COLUMN, "label", doc="classification: an integer column, 0 <= label < outputs"),
            Param("input_shape", _SHAPE, (1,), doc="classification: shape of one input, e.g. [1, 8, 8]"),
            Param("outputs", Int(1, 1 << 20), 2, doc="classification: number of classes"),
            Param("shards_per_epoch", Int(1, 1024), 1, doc="shards each peer draws its batches from in an epoch"),
        ),
        _p2p_shape,
    ),
}


def dataset_spec(name: str, where: str = "dataset.name") -> DatasetSpec:
    return zoo_lookup(DATASETS, name, where, "dataset")


def data_shape(name: str, config: Mapping[str, Any], where: str = "dataset") -> DataShape:
    shape = dataset_spec(name).data_shape(config)
    if math.prod(shape.input_shape) > MAX_SAMPLE_VALUES:
        raise InvalidManifest(f"{where}.input_shape: {math.prod(shape.input_shape)} values per sample is above "
                              f"the limit of {MAX_SAMPLE_VALUES}")
    return shape
