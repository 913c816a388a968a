"""Run artifacts named by sha256 (initial weights, tokenizers): the node's content-addressed cache and the one
resolver every reader goes through.

A manifest names a file it needs only by the sha256 of its bytes. `ArtifactStore.resolve(sha256)` is the single
place that turns such a name into a local, verified file: it looks in the node's cache
(`<data-dir>/artifacts/<sha256>`), then in extra directories (a worker's `--artifact-dir`), then asks
`fetch` (on a node: the peer-to-peer fetcher of shared data, runs.sharded.ShardSource.fetch_artifact, which
brings the file from any peer announcing it into the cache). Every file is hashed before it is returned, so a
wrong or truncated file is never used.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from p2pcompute.crypto import sha256_file
from p2pcompute.errors import DatasetUnavailable

ARTIFACTS_DIRNAME = "artifacts"
# 350M fp32 parameters (model_specs.MAX_PARAMETERS) are 1.4 GB; a tokenizer.json is a few MB. Beyond this a file
# is refused before it is read.
MAX_ARTIFACT_BYTES = 2 << 30
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# fetch(sha256 hex): bring the artifact from elsewhere (peers) into the cache and return its path, or raise
# DatasetUnavailable. The store verifies the hash after it.
Fetcher = Callable[[str], Path]


@dataclasses.dataclass(frozen=True)
class ArtifactStore:
    cache_dir: Path  # <data-dir>/artifacts
    extra_dirs: tuple[Path, ...] = ()
    fetch: Fetcher | None = None

    @classmethod
    def for_data_dir(cls, data_dir: Path, extra_dirs: tuple[Path, ...] = (), fetch: Fetcher | None = None
                     ) -> "ArtifactStore":
        return cls(Path(data_dir) / ARTIFACTS_DIRNAME, tuple(Path(d) for d in extra_dirs), fetch)

    def resolve(self, sha256: str) -> Path:
        """A local file whose bytes hash to `sha256`; DatasetUnavailable if none can be found or fetched."""
        if not _SHA256_HEX.fullmatch(sha256):
            raise DatasetUnavailable(f"artifact {sha256[:70]!r} is not a sha256 hex digest")
        for directory in (self.cache_dir, *self.extra_dirs):
            path = directory / sha256
            if path.is_file():
                self._verify(path, sha256)
                return path
        if self.fetch is not None:
            path = Path(self.fetch(sha256))
            self._verify(path, sha256)
            return path
        raise DatasetUnavailable(f"artifact {sha256[:16]}... is not on this node (looked in {self.cache_dir}"
                                 f"{''.join(', ' + str(d) for d in self.extra_dirs)})")

    def add(self, source: Path) -> str:
        """Copy a local file into the cache under its sha256 (atomically); returns the digest."""
        source = Path(source)
        try:
            size = source.stat().st_size
            if size > MAX_ARTIFACT_BYTES:
                raise DatasetUnavailable(f"{source}: {size} bytes is above the artifact limit of {MAX_ARTIFACT_BYTES}")
            sha256 = sha256_file(source)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            path = self.cache_dir / sha256
            if not path.is_file():
                tmp = path.with_name(f"{sha256}.{os.getpid()}.tmp")
                shutil.copyfile(source, tmp)
                os.replace(tmp, path)
        except OSError as e:
            raise DatasetUnavailable(f"cannot add artifact {source}: {e.strerror or e}") from None
        return sha256

    @staticmethod
    def _verify(path: Path, sha256: str) -> None:
        try:
            size = path.stat().st_size
            if size > MAX_ARTIFACT_BYTES:
                raise DatasetUnavailable(f"{path}: {size} bytes is above the artifact limit of {MAX_ARTIFACT_BYTES}")
            actual = sha256_file(path)
        except OSError as e:
            raise DatasetUnavailable(f"cannot read artifact {path}: {e.strerror or e}") from None
        if actual != sha256:
            raise DatasetUnavailable(f"{path}: its sha256 is {actual[:16]}..., not {sha256[:16]}... as named")
