"""Final checkpoints a node keeps on disk for finished runs: one file per run, with its epoch and sha256, under a
total size cap (least recently used dropped first)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from pathlib import Path

import msgpack

from p2pcompute.crypto import sha256_file

logger = logging.getLogger(__name__)

SUFFIX = ".pt"
META_SUFFIX = ".meta"  # msgpack [epoch, sha256 hex, size]
MANIFEST_SUFFIX = ".manifest"  # the run's signed manifest: a node keeping the result keeps the run findable
MAX_META_BYTES = 256


@dataclasses.dataclass(frozen=True)
class KeptCheckpoint:
    run_id: bytes
    epoch: int
    sha256: str  # hex of the file's bytes
    size: int
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path.with_suffix(MANIFEST_SUFFIX)


class CheckpointStore:
    """`<directory>/<run id hex>.pt` plus `.meta`; `add` moves a file in and drops the least recently used others
    until the total fits `cap_bytes`; `get` marks an entry used. Thread-safe (the supervisor adds, the protocol
    loop reads)."""

    def __init__(self, directory: Path, cap_bytes: int):
        self.directory = Path(directory)
        self.cap_bytes = cap_bytes
        self._lock = threading.Lock()

    def add(self, run_id: bytes, source: Path, epoch: int, signed_manifest: bytes) -> KeptCheckpoint | None:
        """Keep a copy of `source` as the run's final checkpoint (replacing an older one), with the run's signed
        manifest; None if it alone is larger than the cap."""
        size = Path(source).stat().st_size
        if size > self.cap_bytes:
            logger.warning("not keeping the final checkpoint of run %s: %d MiB is above the cap of %d MiB",
                           run_id.hex()[:16], size >> 20, self.cap_bytes >> 20)
            return None
        sha256 = sha256_file(source)
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._path(run_id)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, path)
            manifest = path.with_suffix(MANIFEST_SUFFIX)
            tmp_manifest = manifest.with_name(manifest.name + f".{os.getpid()}.tmp")
            tmp_manifest.write_bytes(signed_manifest)
            os.replace(tmp_manifest, manifest)
            meta = self._meta_path(run_id)
            tmp_meta = meta.with_name(meta.name + f".{os.getpid()}.tmp")
            tmp_meta.write_bytes(msgpack.packb([int(epoch), sha256, size]))
            os.replace(tmp_meta, meta)
            self._evict(keep=run_id)
        return KeptCheckpoint(bytes(run_id), int(epoch), sha256, size, path)

    def get(self, run_id: bytes) -> KeptCheckpoint | None:
        """The kept checkpoint of a run (its use time refreshed), or None."""
        with self._lock:
            kept = self._read(bytes(run_id))
            if kept is not None:
                os.utime(kept.path)
            return kept

    def kept(self) -> list[KeptCheckpoint]:
        with self._lock:
            return self._all()

    def read_chunk(self, kept: KeptCheckpoint, offset: int, length: int) -> bytes:
        with open(kept.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    # ---- internals (under the lock) -------------------------------------------------------------

    def _path(self, run_id: bytes) -> Path:
        return self.directory / (run_id.hex() + SUFFIX)

    def _meta_path(self, run_id: bytes) -> Path:
        return self.directory / (run_id.hex() + META_SUFFIX)

    def _read(self, run_id: bytes) -> KeptCheckpoint | None:
        path, meta = self._path(run_id), self._meta_path(run_id)
        try:
            raw = meta.read_bytes()
            size = path.stat().st_size
        except OSError:
            return None
        try:
            epoch, sha256, recorded = msgpack.unpackb(raw[:MAX_META_BYTES])
            if not (type(epoch) is int and isinstance(sha256, str) and type(recorded) is int):
                raise TypeError("wrong field types")
        except (ValueError, TypeError, msgpack.UnpackException):
            logger.warning("dropping kept checkpoint %s: unreadable metadata", path.name)
            self._drop(run_id)
            return None
        if recorded != size:  # a file changed behind our back: do not serve it
            logger.warning("dropping kept checkpoint %s: its size changed", path.name)
            self._drop(run_id)
            return None
        return KeptCheckpoint(run_id, epoch, sha256, size, path)

    def _all(self) -> list[KeptCheckpoint]:
        if not self.directory.is_dir():
            return []
        found = []
        for meta in self.directory.glob("*" + META_SUFFIX):
            try:
                run_id = bytes.fromhex(meta.name[:-len(META_SUFFIX)])
            except ValueError:
                continue
            kept = self._read(run_id)
            if kept is not None:
                found.append(kept)
        return found

    def _evict(self, keep: bytes) -> None:
        entries = sorted(self._all(), key=lambda k: k.path.stat().st_mtime)
        total = sum(k.size for k in entries)
        for kept in entries:
            if total <= self.cap_bytes:
                break
            if kept.run_id != keep:
                logger.info("dropping the kept final checkpoint of run %s (size cap)", kept.run_id.hex()[:16])
                self._drop(kept.run_id)
                total -= kept.size

    def _drop(self, run_id: bytes) -> None:
        self._meta_path(run_id).unlink(missing_ok=True)
        self._path(run_id).unlink(missing_ok=True)
        self._path(run_id).with_suffix(MANIFEST_SUFFIX).unlink(missing_ok=True)
