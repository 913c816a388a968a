"""The peer-to-peer dataset: a run's shards fetched as its assignment needs them, decoded and prefetched off the training thread."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from p2pcompute.errors import DatasetUnavailable, InvalidMessage, P2PCError
from p2pcompute.retry import retry_until
from p2pcompute.runs.artifact_cache import ArtifactCache
from p2pcompute.runs.artifacts import MAX_ARTIFACT_BYTES
from p2pcompute.runs.data_manifest import MAX_MANIFEST_BYTES, DatasetManifest, Shard
from p2pcompute.runs.datasets import Dataset
from p2pcompute.runs.dataset_specs import dataset_spec
from p2pcompute.runs.images import decode_images
from p2pcompute.runs.model_specs import DataShape
from p2pcompute.runs.shard_assignment import epoch_shards
from p2pcompute.runs.shard_format import decode_shard

logger = logging.getLogger(__name__)

# Seconds the training thread waits for the shards of its epoch before giving up: a fetch tries every provider
# (each bounded by the shard protocol's call timeout per chunk); beyond this the run cannot be trained here.
SHARD_WAIT_TIMEOUT = 600.0
# A fetch that found no provider is tried again for this long (a publisher's or volunteer's provider record may
# not have reached the DHT yet, a provider may be back soon), every RETRY_DELAY seconds at most.
FETCH_RETRY_TIMEOUT = 300.0
MANIFEST_RETRY_TIMEOUT = 60.0  # the same for the dataset manifest, when a trainer starts
ARTIFACT_RETRY_TIMEOUT = 60.0  # and for a run's initial weights or tokenizer (the publisher announces them at once)
RETRY_DELAY = 5.0
LOADER_THREADS = 2  # fetch + decode the current epoch's and the next epoch's shards side by side
TEXT_SEPARATOR = b"\x00"  # between the rows of a text column, as in the pystdlib corpus


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """Where a node gets content-addressed files: `fetch(sha256, collection=, index=, size=, max_bytes=)` returns
    the path of a verified file in `cache` (fetching it from peers if needed), or raises a P2PCError."""

    fetch: Callable[..., Path]
    cache: ArtifactCache

    def fetch_artifact(self, sha256_hex: str) -> Path:
        """A run's file named by sha256 (initial weights, a tokenizer; runs.artifacts.ArtifactStore's `fetch` hook):
        from any peer announcing it (a file of its own collection), tried again while nobody serves it."""
        return fetch_retrying(self, bytes.fromhex(sha256_hex), ARTIFACT_RETRY_TIMEOUT, collection=None, index=None,
                              size=None, max_bytes=MAX_ARTIFACT_BYTES)


class _Closed(Exception):
    """The dataset was closed while a loader thread waited to fetch again."""


def fetch_retrying(source: ShardSource, sha256: bytes, timeout: float, closing: threading.Event | None = None,
                   **options) -> Path:
    """source.fetch, tried again while no provider serves the file (DatasetUnavailable) until `timeout`."""
    closing = closing or threading.Event()
    failures: list[DatasetUnavailable] = []

    def attempt(_remaining: float) -> Path:
        if closing.is_set():
            raise _Closed
        return source.fetch(sha256, **options)

    def failed(e: BaseException) -> None:
        failures.append(e)
        logger.info("fetching %s: %s (trying again)", sha256.hex()[:12], e)

    path = retry_until(attempt, timeout, retry_on=(DatasetUnavailable,), on_failure=failed, max_delay=RETRY_DELAY,
                       sleep=closing.wait)
    if path is None:
        raise failures[-1] if failures else DatasetUnavailable(f"{sha256.hex()[:12]}: no time left to fetch it")
    return path


def load_dataset_manifest(source: ShardSource, dataset_id: bytes) -> DatasetManifest:
    path = fetch_retrying(source, dataset_id, MANIFEST_RETRY_TIMEOUT, collection=dataset_id, index=None, size=None,
                          max_bytes=MAX_MANIFEST_BYTES)
    try:
        return DatasetManifest.from_wire(Path(path).read_bytes())
    except InvalidMessage as e:
        raise DatasetUnavailable(f"dataset {dataset_id.hex()[:16]}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Decoded:
    inputs: torch.Tensor  # lm: uint8 bytes (int64 token ids with a tokenizer); classification: float [rows, *shape]
    targets: torch.Tensor | None  # classification: int64 labels


class ShardedDataset(Dataset):
    """A dataset published peer to peer (docs/data.md).

    `sample_at(run, peer, epoch, generator, size)` draws from the shards `epoch_shards` gives for (run, peer,
    epoch), waiting for them if they are not decoded yet (the wait is counted in `data_wait_seconds`) and
    starting on the next epoch's in the background. Shards being read are held in use in the cache.
    `sample(generator, size)` (no peer: the run's fixed evaluation batch) draws from shard 0. With a `tokenizer`
    (runs.tokenizer.TextTokenizer) an lm dataset's text is tokenized as each shard is decoded, on a loader thread."""

    def __init__(self, cfg: Mapping[str, Any], source: ShardSource, manifest: DatasetManifest | None = None,
                 clock: Callable[[], float] = time.perf_counter, tokenizer=None):
        self.cfg = dict(cfg)
        self.tokenizer = tokenizer
        self.shape: DataShape = dataset_spec("p2p").data_shape(cfg)
        if tokenizer is not None and cfg["task"] == "lm":
            self.shape = dataclasses.replace(self.shape, outputs=tokenizer.vocab_size)
        self.source = source
        self.dataset_id = bytes.fromhex(cfg["id"])
        self.manifest = manifest or load_dataset_manifest(source, self.dataset_id)
        if self.manifest.dataset_id != self.dataset_id:
            raise DatasetUnavailable(f"dataset {cfg['id'][:16]}: the manifest hashes to another id")
        self.columns = self._check_columns()
        self.data_wait_seconds = 0.0
        self._clock = clock
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._loads: dict[int, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(LOADER_THREADS, thread_name_prefix="shard-loader")
        self._epoch_key: tuple | None = None
        self._epoch_data: _Decoded | None = None
        self._eval_data: _Decoded | None = None  # shard 0, for the run's fixed evaluation batch
        self.source.cache.acquire([self.dataset_id])
        self._closed = False

    def _check_columns(self) -> tuple[str, ...]:
        m, cfg = self.manifest, self.cfg
        where = f"dataset {m.name} ({cfg['id'][:16]})"
        if cfg["task"] == "lm":
            wanted = {cfg["text_column"]: ("text",)}
        else:
            wanted = {cfg["image_column"]: ("uint8[]", "int[]", "float[]", "int", "float", "bytes"),
                      cfg["label_column"]: ("int",)}
            if math.prod(cfg["input_shape"]) != 1 and m.column(cfg["image_column"]) is not None \
                    and m.column(cfg["image_column"]).type in ("int", "float"):
                raise DatasetUnavailable(f"{where}: column {cfg['image_column']!r} holds one number a row, "
                                         f"the run's input_shape is {list(cfg['input_shape'])}")
        for name, types in wanted.items():
            column = m.column(name)
            if column is None:
                raise DatasetUnavailable(f"{where} has no column {name!r} (it has: "
                                         f"{', '.join(c.name for c in m.columns)})")
            if column.type not in types:
                raise DatasetUnavailable(f"{where}: column {name!r} is {column.type}, the run needs "
                                         f"{' or '.join(types)}")
        return tuple(wanted)

    # ---- sampling (the training thread) -----------------------------------------------------------

    def sample_at(self, run_id: bytes, peer_id: bytes, epoch: int, generator: torch.Generator,
                  size: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = len(self.manifest.shards), self.cfg["shards_per_epoch"]
        wanted = epoch_shards(run_id, peer_id, epoch, n, k)
        following = epoch_shards(run_id, peer_id, epoch + 1, n, k)
        data = self._epoch(wanted, following)
        return self._draw(data, generator, size)

    def sample(self, generator: torch.Generator, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Draws from shard 0, which the epochs' assignment leaves out: the run's fixed evaluation data whatever the
        split asked for (a p2p dataset's held-out part is that shard, not a tail fraction)."""
        if self._eval_data is None:  # loaded once, apart from the epochs' shards (it does not disturb them)
            self.source.cache.acquire([self.manifest.shards[0].sha256])
            self._eval_data = self._load(0)
        return self._draw(self._eval_data, generator, size)

    def prefetch(self, indices: tuple[int, ...]) -> None:
        """Start fetching and decoding these shards in the background."""
        with self._lock:
            for i in indices:
                if i not in self._loads and not self._closed:
                    self.source.cache.acquire([self.manifest.shards[i].sha256])  # in use from now: not evicted
                    self._loads[i] = self._pool.submit(self._load, i)

    def _epoch(self, wanted: tuple[int, ...], following: tuple[int, ...]) -> _Decoded:
        if self._epoch_key == wanted and self._epoch_data is not None:
            return self._epoch_data
        self.prefetch(wanted)
        self.prefetch(following)
        started = self._clock()
        parts = []
        for i in wanted:
            try:
                parts.append(self._loads[i].result(SHARD_WAIT_TIMEOUT))
            except concurrent.futures.TimeoutError:
                raise DatasetUnavailable(f"shard {i} of dataset {self.manifest.name} did not arrive within "
                                         f"{SHARD_WAIT_TIMEOUT:.0f} s") from None
            except P2PCError:
                with self._lock:  # a later epoch may try again (other providers by then)
                    self._loads.pop(i, None)
                raise
        self.data_wait_seconds += self._clock() - started
        self._forget(set(wanted) | set(following))
        if self.cfg["task"] == "lm":
            data = _Decoded(torch.cat([p.inputs for p in parts]), None)
        else:
            data = _Decoded(torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts]))
        self._epoch_key, self._epoch_data = wanted, data
        return data

    def _forget(self, keep: set[int]) -> None:
        with self._lock:
            for i in [i for i in self._loads if i not in keep]:
                future = self._loads.pop(i)
                future.cancel()
                future.add_done_callback(self._releaser(self.manifest.shards[i].sha256))  # now, or once loaded

    def _releaser(self, sha256: bytes) -> Callable[[concurrent.futures.Future], None]:
        def release(future: concurrent.futures.Future) -> None:
            if future.cancelled() or future.exception() is None:  # a failed load released its file itself
                self.source.cache.release([sha256])

        return release

    def _draw(self, data: _Decoded, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg["task"] == "lm":
            seq_len = self.cfg["seq_len"]
            if len(data.inputs) < seq_len + 1:
                raise DatasetUnavailable(f"dataset {self.manifest.name}: the epoch's shards hold "
                                         f"{len(data.inputs)} tokens of text, fewer than seq_len + 1")
            starts = torch.randint(len(data.inputs) - seq_len, (size,), generator=generator)
            windows = torch.stack([data.inputs[s:s + seq_len + 1] for s in starts.tolist()]).long()
            return windows[:, :-1], windows[:, 1:]
        index = torch.randint(len(data.inputs), (size,), generator=generator)
        return data.inputs[index], data.targets[index]

    # ---- loading (loader threads) -----------------------------------------------------------------

    def _load(self, index: int) -> _Decoded:
        """Fetch and decode a shard its caller holds in use; a failure lets go of it."""
        shard = self.manifest.shards[index]
        try:
            path = fetch_retrying(self.source, shard.sha256, FETCH_RETRY_TIMEOUT, self._closing,
                                  collection=self.dataset_id, index=index, size=shard.bytes, max_bytes=shard.bytes)
            return self._decode(Path(path).read_bytes(), shard)
        except (InvalidMessage, OSError) as e:
            self.source.cache.release([shard.sha256])
            raise DatasetUnavailable(f"dataset {self.manifest.name}, shard {index}: {e}") from None
        except BaseException:
            self.source.cache.release([shard.sha256])
            raise

    def _decode(self, data: bytes, shard: Shard) -> _Decoded:
        table = decode_shard(data, shard, self.manifest.columns, self.columns).drop_null()
        if self.cfg["task"] == "lm":
            texts = table.column(self.cfg["text_column"]).to_pylist()
            joined = TEXT_SEPARATOR.join(t.encode() for t in texts)
            if self.tokenizer is not None:  # documents split at TEXT_SEPARATOR again, as for local text
                return _Decoded(self.tokenizer.encode_corpus(joined), None)
            return _Decoded(torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined
                            else torch.zeros(0, dtype=torch.uint8), None)
        return self._decode_images(table, shard)

    def _decode_images(self, table, shard: Shard) -> _Decoded:
        import pyarrow as pa
        import pyarrow.compute as pc

        cfg = self.cfg
        shape, per_row = tuple(cfg["input_shape"]), math.prod(cfg["input_shape"])
        column = table.column(cfg["image_column"]).combine_chunks()
        rows = len(column)
        if pa.types.is_binary(column.type):  # PNG/JPEG bytes, decoded here on a loader thread
            values = decode_images(column.to_pylist(), shape)
        elif pa.types.is_list(column.type):
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            if rows and (lengths.min() != per_row or lengths.max() != per_row):
                raise InvalidMessage(f"column {cfg['image_column']!r} has rows of {int(lengths.min())}-"
                                     f"{int(lengths.max())} values, the run's input_shape {list(shape)} "
                                     f"needs {per_row}")
            values = column.flatten().to_numpy(zero_copy_only=False)
        else:
            values = column.to_numpy(zero_copy_only=False)
        scale = 255.0 if column.type in (pa.list_(pa.uint8()), pa.binary()) else 1.0
        inputs = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(rows, *shape) / scale)
        labels = table.column(cfg["label_column"]).to_numpy()
        if rows and (labels.min() < 0 or labels.max() >= cfg["outputs"]):
            raise InvalidMessage(f"column {cfg['label_column']!r} has labels outside [0, {cfg['outputs']})")
        if rows == 0:
            raise InvalidMessage("no rows left once rows with missing values are dropped")
        return _Decoded(inputs, torch.from_numpy(labels.astype(np.int64)))

    # ---- end ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the loader threads and let the cache evict this dataset's files again."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._forget(set())
        released = [self.dataset_id] + ([self.manifest.shards[0].sha256] if self._eval_data is not None else [])
        self.source.cache.release(released)

