"""The dataset zoo's sources (synthetic, local files checked by hash, the Python stdlib corpus), held-out splits and
reproducible batches."""

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
TOKEN_TEACHER_DIM = 16  # width of the random embedding behind the `tokens` dataset's labels


SPLITS = ("train", "eval")


class Dataset(ABC):
    """An opened dataset: draws (inputs, targets) for a batch from a seeded torch.Generator.

    `split` = "train" or "eval": datasets that hold a fixed pool of samples (files, text) keep their last
    `holdout` fraction for evaluation (training never draws from it); with holdout 0 both draw from the whole
    pool. Generated datasets (synthetic) draw fresh samples either way."""

    shape: DataShape
    data_wait_seconds: float = 0.0  # time samplers waited for data to arrive (fetched shards); 0 for local data

    @abstractmethod
    def sample(self, generator: torch.Generator, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def sample_at(self, run_id: bytes, peer_id: bytes, epoch: int, generator: torch.Generator,
                  size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One peer's batch in an epoch; a dataset whose samples depend on the epoch (shards) overrides this."""
        return self.sample(generator, size)

    def close(self) -> None:
        """Release what the dataset holds (threads, files in use); nothing for most."""


def split_range(count: int, holdout: float, split: str, what: str) -> tuple[int, int]:
    """[lo, hi) of the `count` items a split draws from: the last ceil(holdout * count) are held out for eval."""
    if holdout <= 0:
        return 0, count
    held = max(1, math.ceil(count * holdout))
    if held >= count:
        raise DatasetUnavailable(f"{what}: {count} samples are too few to hold out {holdout:.0%} for evaluation")
    return (0, count - held) if split == "train" else (count - held, count)


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
    return dataset.sample(torch.Generator().manual_seed(seed), size, "eval")


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

    def sample(self, generator: torch.Generator, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
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

    def __init__(self, cfg: Mapping[str, Any], data_dir: Path | None, holdout: float = 0.0):
        self.shape = dataset_spec("arrays").data_shape(cfg)
        self.holdout = holdout
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

    def sample(self, generator: torch.Generator, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = split_range(len(self.inputs), self.holdout, split, "dataset arrays")
        index = torch.randint(lo, hi, (size,), generator=generator)
        return self.inputs[index], self.targets[index]


# ---- byte-level text ------------------------------------------------------------------------------


class TextDataset(Dataset):
    """Language modelling on a token sequence (bytes, or a tokenizer's ids): each sample is a random window of
    seq_len + 1 tokens. The held-out split is the text's tail: no training window reaches into it."""

    def __init__(self, tokens: torch.Tensor, vocab: int, seq_len: int, where: str, holdout: float = 0.0):
        cut = len(tokens) - (max(1, math.ceil(len(tokens) * holdout)) if holdout > 0 else 0)
        parts = (tokens[:cut], tokens[cut:]) if holdout > 0 else (tokens,)
        if any(len(part) < seq_len + 1 for part in parts):
            raise DatasetUnavailable(f"{where}: the text has {len(tokens)} tokens, fewer than seq_len + 1 "
                                     f"{'in its training part or its held-out tail' if holdout > 0 else ''}".rstrip())
        self.shape = DataShape("lm", (seq_len,), vocab)
        self.tokens = tokens
        self.cut = cut
        self.seq_len = seq_len

    @classmethod
    def of_bytes(cls, corpus: bytes, seq_len: int, where: str, tokenizer=None, holdout: float = 0.0) -> "TextDataset":
        """Byte tokens, or the ids of `tokenizer` (runs.tokenizer.TextTokenizer) when the run names one."""
        if tokenizer is None:
            return cls(torch.frombuffer(bytearray(corpus), dtype=torch.uint8), BYTE_VOCAB, seq_len, where, holdout)
        return cls(tokenizer.encode_corpus(corpus), tokenizer.vocab_size, seq_len, where, holdout)

    def sample(self, generator: torch.Generator, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = (0, self.cut) if split == "train" or self.cut == len(self.tokens) else (self.cut, len(self.tokens))
        starts = torch.randint(lo, hi - self.seq_len, (size,), generator=generator)
        windows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]


# ---- synthetic token sequences --------------------------------------------------------------------


class TokenClassDataset(Dataset):
    """Sequence classification on random tokens: each token has a random embedding fixed by `seed`; a sequence's
    label is the argmax of its mean embedding times a random matrix, plus Gaussian noise (a learnable rule)."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.shape = dataset_spec("tokens").data_shape(cfg)
        self.noise = float(cfg["noise"])
        teacher = torch.Generator().manual_seed(cfg["seed"])
        self.embedding = torch.randn(cfg["vocab_size"], TOKEN_TEACHER_DIM, generator=teacher)
        self.readout = torch.randn(TOKEN_TEACHER_DIM, cfg["classes"], generator=teacher)

    def sample(self, generator: torch.Generator, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(self.shape.vocab, (size, *self.shape.input_shape), generator=generator)
        scores = self.embedding[tokens].mean(dim=1) @ self.readout
        scores = scores + self.noise * torch.randn(scores.shape, generator=generator)
        return tokens, scores.argmax(dim=1)


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


def _open_pystdlib(cfg: Mapping[str, Any], data_dir: Path | None, stdlib_dir: Path | None, tokenizer,
                   holdout: float) -> Dataset:
    stdlib_dir = default_stdlib_dir() if stdlib_dir is None else Path(stdlib_dir)
    try:
        corpus = stdlib_corpus(stdlib_dir, cfg["packages"])
    except OSError as e:
        raise DatasetUnavailable(f"cannot read the Python standard library at {stdlib_dir}: {e}") from None
    if cfg["sha256"] and crypto.sha256(corpus).hex() != cfg["sha256"]:
        raise DatasetUnavailable(f"this machine's Python standard library ({stdlib_dir}) differs from the run's "
                                 f"corpus (sha256 {cfg['sha256'][:16]}...): another Python version?")
    return TextDataset.of_bytes(corpus, cfg["seq_len"], "dataset pystdlib", tokenizer, holdout)


def _open_p2p(cfg: Mapping[str, Any], shards, tokenizer) -> Dataset:
    from p2pcompute.runs.sharded import ShardedDataset

    if shards is None:
        raise DatasetUnavailable("a peer-to-peer dataset needs a node to fetch its shards (p2pc node start)")
    return ShardedDataset(cfg, shards, tokenizer=tokenizer)


# (config, data_dir, stdlib_dir, tokenizer, holdout) -> Dataset
_OPENERS: dict[str, Callable[..., Dataset]] = {
    "synthetic": lambda cfg, data_dir, stdlib_dir, tokenizer, holdout: SyntheticDataset(cfg),
    "tokens": lambda cfg, data_dir, stdlib_dir, tokenizer, holdout: TokenClassDataset(cfg),
    "arrays": lambda cfg, data_dir, stdlib_dir, tokenizer, holdout: ArrayDataset(cfg, data_dir, holdout),
    "text": lambda cfg, data_dir, stdlib_dir, tokenizer, holdout: TextDataset.of_bytes(
        _read_checked(data_dir, cfg["file"], cfg["sha256"], "text"), cfg["seq_len"], f"dataset file {cfg['file']}",
        tokenizer, holdout),
    "pystdlib": _open_pystdlib,
}


def open_dataset(name: str, config: Mapping[str, Any], data_dir: Path | None = None,
                 stdlib_dir: Path | None = None, tokenizer=None, holdout: float = 0.0, shards=None) -> Dataset:
    """Open a dataset on this machine; DatasetUnavailable if its files are missing or do not match.
    `data_dir` holds the files a researcher shipped out of band; `stdlib_dir` overrides the stdlib location;
    `tokenizer` (runs.tokenizer.TextTokenizer) tokenizes text sources instead of byte tokens; `holdout` is the
    fraction of a fixed pool kept for evaluation (the run's [eval] section); `shards` (runs.sharded.ShardSource) is
    how the node fetches a peer-to-peer dataset's files."""
    dataset_spec(name)
    if name == "p2p":
        return _open_p2p(config, shards, tokenizer)
    return _OPENERS[name](config, data_dir, stdlib_dir, tokenizer, holdout)
