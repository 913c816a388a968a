"""The dataset zoo: synthetic, local files checked by hash, the Python stdlib corpus; reproducible batches."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import sysconfig
from pathlib import Path
from typing import Any, Callable, Mapping

import msgpack
import numpy as np
import torch

from p2pcompute import crypto
from p2pcompute.errors import DatasetUnavailable, InvalidManifest
from p2pcompute.runs.models import DataShape
from p2pcompute.runs.schema import FILE_NAME, SHA256_HEX, Choice, Dec, Int, ListOf, Param, Schema, Str

BATCH_DOMAIN = b"p2pc/batch/v1"
EVAL_DOMAIN = b"p2pc/eval/v1"
# Inputs of one sample may hold at most this many values (a 3x512x512 image is 786k): keeps a
# manifest from asking every volunteer for gigabytes per batch.
MAX_SAMPLE_VALUES = 1 << 20
# A local data file is read whole into memory and hashed; beyond this a volunteer's RAM is at risk.
MAX_DATA_FILE_BYTES = 4 << 30
BYTE_VOCAB = 256  # text datasets are byte-level: one token per byte

REQUIRED_SHA256 = Str(64, r"[0-9a-f]{64}", "sha256 hex digest (64 lower-case hex digits)")


class Dataset:
    """An opened dataset: draws (inputs, targets) for a batch from a seeded torch.Generator."""

    shape: DataShape

    def sample(self, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def batch_seed(run_id: bytes, peer_id: bytes, epoch: int, step: int) -> int:
    """The RNG seed of one peer's batch: a hash of (run, peer, epoch, step), so an auditor can redraw it."""
    packed = msgpack.packb([bytes(run_id), bytes(peer_id), int(epoch), int(step)])
    return int.from_bytes(crypto.digest(BATCH_DOMAIN + packed)[:8], "little") >> 1


def batch_for(dataset: Dataset, run_id: bytes, peer_id: bytes, epoch: int, step: int,
              batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch a peer trains on at (epoch, step) of a run: a pure function of its arguments."""
    generator = torch.Generator().manual_seed(batch_seed(run_id, peer_id, epoch, step))
    return dataset.sample(generator, batch_size)


def eval_batch(dataset: Dataset, run_id: bytes, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A held-out batch fixed by the run (the same on every machine), for comparing losses."""
    seed = int.from_bytes(crypto.digest(EVAL_DOMAIN + bytes(run_id))[:8], "little") >> 1
    return dataset.sample(torch.Generator().manual_seed(seed), size)


# ---- synthetic ------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """x ~ N(0, 1); the "true" function is a random one-hidden-layer tanh network fixed by `seed`:
    regression targets are its outputs plus Gaussian noise, classification labels the argmax of its
    outputs plus Gaussian noise."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.shape = _synthetic_shape(cfg)
        self.noise = float(cfg["noise"])
        features, hidden = math.prod(self.shape.input_shape), cfg["teacher_hidden"]
        teacher = torch.Generator().manual_seed(cfg["seed"])
        self.w1 = torch.randn(features, hidden, generator=teacher) / math.sqrt(features)
        self.w2 = torch.randn(hidden, self.shape.outputs, generator=teacher) * (2.0 / math.sqrt(hidden))

    def sample(self, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, *self.shape.input_shape, generator=generator)
        clean = torch.tanh(x.reshape(size, -1) @ self.w1) @ self.w2
        noisy = clean + self.noise * torch.randn(clean.shape, generator=generator)
        if self.shape.task == "regression":
            return x, noisy
        return x, noisy.argmax(dim=1)


def _synthetic_shape(cfg: Mapping[str, Any]) -> DataShape:
    return DataShape(cfg["task"], tuple(cfg["input_shape"]), cfg["outputs"])


# ---- local array files ----------------------------------------------------------------------------


def _read_checked(data_dir: Path | None, name: str, sha256_hex: str, what: str) -> bytes:
    if data_dir is None:
        raise DatasetUnavailable(f"dataset file {name!r} needs a data directory (where the run's files are kept)")
    path = Path(data_dir) / name
    try:
        size = path.stat().st_size
        if size > MAX_DATA_FILE_BYTES:
            raise DatasetUnavailable(f"{path}: {size} bytes is above the limit of {MAX_DATA_FILE_BYTES}")
        data = path.read_bytes()
    except OSError as e:
        raise DatasetUnavailable(f"cannot read {what} file {path}: {e.strerror}") from None
    if sha256_hex and crypto.sha256(data).hex() != sha256_hex:
        raise DatasetUnavailable(f"{path}: sha256 does not match the manifest ({sha256_hex[:16]}...)")
    return data


class ArrayDataset(Dataset):
    """Samples drawn uniformly (with replacement) from .npy arrays the researcher shipped out of band."""

    def __init__(self, cfg: Mapping[str, Any], data_dir: Path | None):
        self.shape = _array_shape(cfg)
        inputs = self._load(data_dir, cfg["inputs"], cfg["inputs_sha256"], "inputs")
        targets = self._load(data_dir, cfg["targets"], cfg["targets_sha256"], "targets")
        if inputs.ndim == 0 or inputs.shape[1:] != self.shape.input_shape or not np.issubdtype(inputs.dtype, np.floating):
            raise DatasetUnavailable(f"{cfg['inputs']}: expected a float array of shape "
                                     f"[N, {', '.join(map(str, self.shape.input_shape))}], got {inputs.dtype} {list(inputs.shape)}")
        if self.shape.task == "regression":
            ok = targets.shape == (len(inputs), self.shape.outputs) and np.issubdtype(targets.dtype, np.floating)
        else:
            ok = (targets.shape == (len(inputs),) and np.issubdtype(targets.dtype, np.integer)
                  and (len(targets) == 0 or (targets.min() >= 0 and targets.max() < self.shape.outputs)))
        if not ok or len(inputs) == 0:
            raise DatasetUnavailable(f"{cfg['targets']}: targets do not match the inputs and the task "
                                     f"({self.shape.task}, {self.shape.outputs} outputs)")
        self.inputs = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        self.targets = torch.from_numpy(np.ascontiguousarray(
            targets, dtype=np.float32 if self.shape.task == "regression" else np.int64))

    @staticmethod
    def _load(data_dir: Path | None, name: str, sha256_hex: str, what: str) -> np.ndarray:
        data = _read_checked(data_dir, name, sha256_hex, what)
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DatasetUnavailable(f"{name}: not a .npy array ({e})") from None

    def sample(self, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(self.inputs), (size,), generator=generator)
        return self.inputs[index], self.targets[index]


def _array_shape(cfg: Mapping[str, Any]) -> DataShape:
    return DataShape(cfg["task"], tuple(cfg["input_shape"]), cfg["outputs"])


# ---- byte-level text ------------------------------------------------------------------------------


class TextDataset(Dataset):
    """Language modelling on a byte string: each sample is a random window of seq_len + 1 bytes."""

    def __init__(self, corpus: bytes, seq_len: int, where: str):
        if len(corpus) < seq_len + 1:
            raise DatasetUnavailable(f"{where}: the text has {len(corpus)} bytes, fewer than seq_len + 1")
        self.shape = DataShape("lm", (seq_len,), BYTE_VOCAB)
        self.tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
        self.seq_len = seq_len

    def sample(self, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.seq_len, (size,), generator=generator)
        windows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]


def _text_shape(cfg: Mapping[str, Any]) -> DataShape:
    return DataShape("lm", (cfg["seq_len"],), BYTE_VOCAB)


def default_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(stdlib_dir: Path, packages: tuple[str, ...]) -> list[tuple[str, Path]]:
    """The corpus files: every .py under the stdlib directory (not site-packages), optionally only
    those of the named top-level packages/modules, sorted by their relative POSIX path."""
    found = []
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                path = Path(root) / name
                rel = path.relative_to(stdlib_dir).as_posix()
                top = rel.split("/", 1)[0].removesuffix(".py")
                if not packages or top in packages:
                    found.append((rel, path))
    return sorted(found)


def stdlib_corpus(stdlib_dir: Path, packages: tuple[str, ...]) -> bytes:
    """The files' bytes joined by NUL bytes (a document separator that never occurs in source)."""
    return b"\x00".join(path.read_bytes() for _, path in stdlib_files(stdlib_dir, packages))


def _open_pystdlib(cfg: Mapping[str, Any], data_dir: Path | None, stdlib_dir: Path | None) -> Dataset:
    stdlib_dir = default_stdlib_dir() if stdlib_dir is None else Path(stdlib_dir)
    try:
        corpus = stdlib_corpus(stdlib_dir, cfg["packages"])
    except OSError as e:
        raise DatasetUnavailable(f"cannot read the Python standard library at {stdlib_dir}: {e}") from None
    if cfg["sha256"] and crypto.sha256(corpus).hex() != cfg["sha256"]:
        raise DatasetUnavailable(f"this machine's Python standard library ({stdlib_dir}) differs from the run's "
                                 f"corpus (sha256 {cfg['sha256'][:16]}...): another Python version?")
    return TextDataset(corpus, cfg["seq_len"], "dataset pystdlib")


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    schema: Schema
    data_shape: Callable[[Mapping[str, Any]], DataShape]
    open: Callable[[Mapping[str, Any], Path | None, Path | None], Dataset]


_SHAPE = ListOf(Int(1, 4096), 1, 3)

DATASETS: dict[str, DatasetEntry] = {
    "synthetic": DatasetEntry(
        Schema(
            Param("task", Choice(("regression", "classification"))),
            Param("input_shape", _SHAPE, doc="shape of one input, e.g. [32] or [1, 8, 8]"),
            Param("outputs", Int(1, 4096), doc="regression dims or number of classes"),
            Param("noise", Dec("0", "10"), "0.1"),
            Param("seed", Int(0, (1 << 63) - 1), doc="fixes the true function"),
            Param("teacher_hidden", Int(1, 1024), 32),
        ),
        _synthetic_shape,
        lambda cfg, data_dir, stdlib_dir: SyntheticDataset(cfg),
    ),
    "arrays": DatasetEntry(
        Schema(
            Param("task", Choice(("regression", "classification"))),
            Param("inputs", FILE_NAME, doc=".npy float array [N, *input_shape], in the node's data directory"),
            Param("inputs_sha256", REQUIRED_SHA256),
            Param("targets", FILE_NAME, doc=".npy array: float [N, outputs] or integer labels [N]"),
            Param("targets_sha256", REQUIRED_SHA256),
            Param("input_shape", _SHAPE),
            Param("outputs", Int(1, 1 << 20)),
        ),
        _array_shape,
        lambda cfg, data_dir, stdlib_dir: ArrayDataset(cfg, data_dir),
    ),
    "text": DatasetEntry(
        Schema(
            Param("file", FILE_NAME, doc="a text (any bytes) file in the node's data directory"),
            Param("sha256", REQUIRED_SHA256),
            Param("seq_len", Int(2, 4096)),
        ),
        _text_shape,
        lambda cfg, data_dir, stdlib_dir: TextDataset(
            _read_checked(data_dir, cfg["file"], cfg["sha256"], "text"), cfg["seq_len"], f"dataset file {cfg['file']}"),
    ),
    "pystdlib": DatasetEntry(
        Schema(
            Param("seq_len", Int(2, 4096)),
            Param("packages", ListOf(Str(64, r"[A-Za-z_][A-Za-z0-9_]*", "module name"), 0, 256, unique=True), (),
                  doc="top-level stdlib packages/modules to use; empty: all"),
            Param("sha256", SHA256_HEX, "", doc="sha256 of the corpus; empty: not checked (Python versions differ)"),
        ),
        _text_shape,
        _open_pystdlib,
    ),
}


def dataset_entry(name: str, where: str = "dataset.name") -> DatasetEntry:
    entry = DATASETS.get(name) if isinstance(name, str) else None
    if entry is None:
        raise InvalidManifest(f"{where}: unknown dataset {name!r} (the zoo has: {', '.join(DATASETS)})")
    return entry


def data_shape(name: str, config: Mapping[str, Any], where: str = "dataset") -> DataShape:
    shape = dataset_entry(name).data_shape(config)
    if math.prod(shape.input_shape) > MAX_SAMPLE_VALUES:
        raise InvalidManifest(f"{where}.input_shape: {math.prod(shape.input_shape)} values per sample is above "
                              f"the limit of {MAX_SAMPLE_VALUES}")
    return shape


def open_dataset(name: str, config: Mapping[str, Any], data_dir: Path | None = None,
                 stdlib_dir: Path | None = None) -> Dataset:
    """Open a dataset on this machine; DatasetUnavailable if its files are missing or do not match."""
    return dataset_entry(name).open(config, data_dir, stdlib_dir)
