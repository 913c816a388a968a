"""The node's content-addressed file cache (<data-dir>/artifacts/<sha256 hex>): checked writes, pins, LRU eviction under a cap.

Every file is named by the sha256 of its bytes and written whole (temporary file, fsync, rename) only after its
hash was checked, so a name always stands for its content. Files the node published are pinned (listed in
`pinned`, one hex digest a line) and never evicted; files a trainer is reading are held in use (a count per
file) and never evicted either; the rest go least recently used first once the cache is over its cap. The
modification time is the last use (set on every `path()` lookup), so the order survives restarts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from p2pcompute import crypto
from p2pcompute.errors import InvalidMessage, StoreError
from p2pcompute.runs.data_manifest import HEADER, MAX_MANIFEST_BYTES, DatasetManifest

logger = logging.getLogger(__name__)

DIRNAME = "artifacts"
PINS_FILENAME = "pinned"
_HEX_NAME = re.compile(r"[0-9a-f]{64}")
STALE_TEMP_SECONDS = 3600.0  # a temporary file older than this was left by a crash: removed on the next scan


def artifacts_dir(data_dir: Path) -> Path:
    return Path(data_dir) / DIRNAME


class ArtifactCache:
    """Files by sha256 under `directory`, at most `cap_bytes` of them unpinned (0: no cap). Thread-safe; several
    processes may share the directory (the node and `p2pc data publish`): every write is an atomic rename."""

    def __init__(self, directory: Path, cap_bytes: int = 0, clock: Callable[[], float] = time.time):
        self.directory = Path(directory)
        self.cap_bytes = cap_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._in_use: dict[str, int] = {}
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StoreError(f"cannot create the artifact cache {self.directory}: {e.strerror}") from None

    # ---- reading ------------------------------------------------------------------------------------

    def _file(self, sha256: bytes) -> Path:
        if not isinstance(sha256, bytes) or len(sha256) != 32:
            raise InvalidMessage("an artifact is named by a 32-byte sha256")
        return self.directory / sha256.hex()  # hex digits only: never a path outside the cache

    def has(self, sha256: bytes) -> bool:
        return self._file(sha256).is_file()

    def path(self, sha256: bytes) -> Path | None:
        """The file holding `sha256` (its use time refreshed), or None if the cache lacks it."""
        path = self._file(sha256)
        now = self.clock()
        try:
            os.utime(path, (now, now))
        except FileNotFoundError:
            return None
        return path

    def size(self, sha256: bytes) -> int | None:
        try:
            return self._file(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def read_chunk(self, sha256: bytes, offset: int, length: int) -> tuple[int, bytes] | None:
        """(file size, up to `length` bytes from `offset`) or None if not held; serving does not count as a use."""
        try:
            with open(self._file(sha256), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(min(offset, size))
                return size, f.read(length)
        except FileNotFoundError:
            return None

    def held(self) -> dict[bytes, int]:
        """sha256 -> size of every file in the cache."""
        out = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if _HEX_NAME.fullmatch(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        out[bytes.fromhex(entry.name)] = entry.stat().st_size
        return out

    def dataset_manifests(self) -> list[DatasetManifest]:
        """The dataset manifests held (files that begin like one and decode as one)."""
        found = []
        for sha256, size in self.held().items():
            if size > MAX_MANIFEST_BYTES:
                continue
            try:
                with open(self._file(sha256), "rb") as f:
                    if not f.read(len(HEADER)) == HEADER:
                        continue
                    f.seek(0)
                    found.append(DatasetManifest.from_wire(f.read()))
            except FileNotFoundError:
                continue
            except InvalidMessage as e:
                logger.info("artifact %s looks like a dataset manifest but is not: %s", sha256.hex()[:12], e)
        return found

    # ---- writing ------------------------------------------------------------------------------------

    def put(self, sha256: bytes, data: bytes, pin: bool = False) -> Path:
        """Store `data` under its sha256 (InvalidMessage if the bytes do not hash to it), then evict to the cap."""
        if crypto.sha256(data) != sha256:
            raise InvalidMessage(f"artifact {sha256.hex()[:12]}: the bytes do not match their sha256")
        if pin:
            self.pin([sha256])
        path = self._file(sha256)
        tmp = self.directory / f".{sha256.hex()}.{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write {path}: {e.strerror}") from None
        self.evict(keep=(sha256,))
        return path

    def pin(self, sha256s: list[bytes]) -> None:
        """Never evict these (the node's own published files); appended before the files are written."""
        lines = "".join(s.hex() + "\n" for s in sha256s)
        try:
            with open(self.directory / PINS_FILENAME, "a") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise StoreError(f"cannot record pinned artifacts in {self.directory}: {e.strerror}") from None

    def pinned(self) -> set[bytes]:
        try:
            text = (self.directory / PINS_FILENAME).read_text()
        except FileNotFoundError:
            return set()
        return {bytes.fromhex(line) for line in text.split() if _HEX_NAME.fullmatch(line)}

    # ---- use and eviction ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def in_use(self, sha256s: list[bytes]) -> Iterator[None]:
        """Keep these files from eviction for a with-block (a trainer reading them)."""
        self.acquire(sha256s)
        try:
            yield
        finally:
            self.release(sha256s)

    def acquire(self, sha256s: list[bytes]) -> None:
        with self._lock:
            for s in sha256s:
                self._in_use[s.hex()] = self._in_use.get(s.hex(), 0) + 1

    def release(self, sha256s: list[bytes]) -> None:
        with self._lock:
            for s in sha256s:
                left = self._in_use.get(s.hex(), 0) - 1
                if left > 0:
                    self._in_use[s.hex()] = left
                else:
                    self._in_use.pop(s.hex(), None)

    def evict(self, keep: tuple[bytes, ...] = ()) -> list[bytes]:
        """Delete least recently used files (never pinned, in-use or `keep` ones) until the cache fits its cap;
        returns what went."""
        if not self.cap_bytes:
            return []
        with self._lock:
            keep = {s.hex() for s in self.pinned()} | set(self._in_use) | {s.hex() for s in keep}
            files = []
            total = 0
            now = self.clock()
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    if entry.name.startswith(".") and now - stat.st_mtime > STALE_TEMP_SECONDS:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                    if not _HEX_NAME.fullmatch(entry.name):
                        continue
                    total += stat.st_size
                    if entry.name not in keep:
                        files.append((stat.st_mtime, entry.name, stat.st_size))
            evicted = []
            for _mtime, name, size in sorted(files):
                if total <= self.cap_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                total -= size
                evicted.append(bytes.fromhex(name))
            if evicted:
                logger.info("artifact cache: evicted %d files to stay under %d bytes", len(evicted), self.cap_bytes)
            return evicted
