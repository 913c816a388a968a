"""The dataset zoo's sources (synthetic, local files checked by hash, the Python stdlib corpus) and reproducible batches."""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
import math
import os
import sysconfig
from pathlib import Path
from typing import Any, Callable, Mapping

import msgpack
import numpy as np
import torch

from p2pcompute import crypto
from p2pcompute.errors import DatasetUnavailable
from p2pcompute.runs.dataset_specs import BYTE_VOCAB, dataset_spec
from p2pcompute.runs.model_specs import DataShape

BATCH_DOMAIN = b"p2pc/batch/v1"
EVAL_DOMAIN = b"p2pc/eval/v1"
# A local data file is read whole into memory and hashed; beyond this a volunteer's RAM is at risk.
MAX_DATA_FILE_BYTES = 4 << 30


class Dataset(ABC):
    """An opened dataset: draws (inputs, targets) for a batch from a seeded torch.Generator."""

    shape: DataShape
    data_wait_seconds: float = 0.0  # time samplers waited for data to arrive (fetched shards); 0 for local data

    @abstractmethod
    def sample(self, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def sample_at(self, run_id: bytes, peer_id: bytes, epoch: int, generator: torch.Generator,
                  size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One peer's batch in an epoch; a dataset whose samples depend on the epoch (shards) overrides this."""
        return self.sample(generator, size)

    def close(self) -> None:
        """Release what the dataset holds (threads, files in use); nothing for most."""


def batch_seed(run_id: bytes, peer_id: bytes, epoch: int, step: int) -> int:
    """The RNG seed of one peer's batch: a hash of (run, peer, epoch, step), so an auditor can redraw it."""
    packed = msgpack.packb([bytes(run_id), bytes(peer_id), int(epoch), int(step)])
    return int.from_bytes(crypto.digest(BATCH_DOMAIN + packed)[:8], "little") >> 1


def batch_for(dataset: Dataset, run_id: bytes, peer_id: bytes, epoch: int, step: int,
              batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch a peer trains on at (epoch, step) of a run: a pure function of its arguments."""
    generator = torch.Generator().manual_seed(batch_seed(run_id, peer_id, epoch, step))
    return dataset.sample_at(bytes(run_id), bytes(peer_id), epoch, generator, batch_size)


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
        self.shape = dataset_spec("synthetic").data_shape(cfg)
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
        self.shape = dataset_spec("arrays").data_shape(cfg)
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


def _open_p2p(cfg: Mapping[str, Any], shards) -> Dataset:
    from p2pcompute.runs.sharded import ShardedDataset

    if shards is None:
        raise DatasetUnavailable("a peer-to-peer dataset needs a node to fetch its shards (p2pc node start)")
    return ShardedDataset(cfg, shards)


_OPENERS: dict[str, Callable[[Mapping[str, Any], Path | None, Path | None], Dataset]] = {
    "synthetic": lambda cfg, data_dir, stdlib_dir: SyntheticDataset(cfg),
    "arrays": lambda cfg, data_dir, stdlib_dir: ArrayDataset(cfg, data_dir),
    "text": lambda cfg, data_dir, stdlib_dir: TextDataset(
        _read_checked(data_dir, cfg["file"], cfg["sha256"], "text"), cfg["seq_len"], f"dataset file {cfg['file']}"),
    "pystdlib": _open_pystdlib,
}


def open_dataset(name: str, config: Mapping[str, Any], data_dir: Path | None = None,
                 stdlib_dir: Path | None = None, shards=None) -> Dataset:
    """Open a dataset on this machine; DatasetUnavailable if its files are missing or do not match.
    `data_dir` holds the files a researcher shipped out of band; `stdlib_dir` overrides the stdlib location;
    `shards` (runs.sharded.ShardSource) is how the node fetches a peer-to-peer dataset's files."""
    dataset_spec(name)
    if name == "p2p":
        return _open_p2p(config, shards)
    return _OPENERS[name](config, data_dir, stdlib_dir)
