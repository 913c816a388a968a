"""Dataset manifests: a published dataset's columns and content-addressed shards, canonical bytes and id (docs/data.md).

A dataset manifest is one canonical msgpack array (canonical.py: no maps, no floats, one encoding per value):

    ["p2pc/dataset", 1, name, [[column, type], ...], [[sha256, rows, bytes], ...]]

Its sha256 is the dataset id a run manifest names; each shard (a parquet file, runs/shard_format.py) is named by
its own sha256, so every byte a volunteer fetches is checked against what the publisher wrote.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from p2pcompute import canonical, crypto
from p2pcompute.errors import InvalidMessage

MAGIC = "p2pc/dataset"
VERSION = 1
SHA256_SIZE = 32
# 65,536 shards of up to 256 MiB is 16 TiB: beyond any volunteer run; it keeps the manifest under ~3 MB and a
# provider's bitfield of shards held (swarm/providers.py) under 8 KiB.
MAX_SHARDS = 1 << 16
# A shard is fetched whole and decoded in memory on a volunteer's machine: 256 MiB bounds both.
MAX_SHARD_BYTES = 256 << 20
MAX_SHARD_ROWS = 1 << 31
MAX_COLUMNS = 256  # a table wider than this is not a training set
MAX_MANIFEST_BYTES = 4 << 20  # MAX_SHARDS shards of ~45 bytes each, with room for the columns
MAX_NAME = 64
MAX_COLUMN_NAME = 128
# Column types, each stored as one Arrow type in the shards (runs/shard_format.py says which).
COLUMN_TYPES = ("text", "int", "float", "bool", "bytes", "uint8[]", "int[]", "float[]")
HEADER = bytes([canonical.FIXARRAY | 5]) + canonical.pack(MAGIC)  # how every dataset manifest's bytes begin
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str


@dataclasses.dataclass(frozen=True)
class Shard:
    sha256: bytes
    rows: int
    bytes: int

    @property
    def hex(self) -> str:
        return self.sha256.hex()


@dataclasses.dataclass(frozen=True)
class DatasetManifest(canonical.WireRecord):
    """What a publisher wrote: a name, the columns every shard has, and the shards in order."""

    WIRE_NAME = "dataset manifest"
    MAX_WIRE_SIZE = MAX_MANIFEST_BYTES

    name: str
    columns: tuple[Column, ...]
    shards: tuple[Shard, ...]

    def __post_init__(self) -> None:
        check_name(self.name)
        if not 1 <= len(self.columns) <= MAX_COLUMNS:
            raise InvalidMessage(f"dataset manifest: 1 to {MAX_COLUMNS} columns, got {len(self.columns)}")
        seen = set()
        for column in self.columns:
            if (not isinstance(column.name, str) or not 0 < len(column.name) <= MAX_COLUMN_NAME
                    or not column.name.isprintable()):
                raise InvalidMessage(f"dataset manifest: bad column name {column.name!r:.60}")
            if column.name in seen:
                raise InvalidMessage(f"dataset manifest: column {column.name!r} appears twice")
            seen.add(column.name)
            if column.type not in COLUMN_TYPES:
                raise InvalidMessage(f"dataset manifest: column {column.name!r} has unknown type {column.type!r:.40}")
        if not 1 <= len(self.shards) <= MAX_SHARDS:
            raise InvalidMessage(f"dataset manifest: 1 to {MAX_SHARDS} shards, got {len(self.shards)}")
        for i, shard in enumerate(self.shards):
            canonical.fixed_bytes(shard.sha256, SHA256_SIZE, f"shard {i} sha256")
            canonical.uint(shard.rows, 1, MAX_SHARD_ROWS, f"shard {i} rows")
            canonical.uint(shard.bytes, 1, MAX_SHARD_BYTES, f"shard {i} bytes")

    # ---- wire form ---------------------------------------------------------------------------------

    def to_obj(self) -> list:
        return [MAGIC, VERSION, self.name, [[c.name, c.type] for c in self.columns],
                [[s.sha256, s.rows, s.bytes] for s in self.shards]]

    @classmethod
    def from_obj(cls, obj: Any) -> "DatasetManifest":
        magic, version, name, columns, shards = canonical.array(obj, 5, "dataset manifest")
        if magic != MAGIC:
            raise InvalidMessage("not a dataset manifest")
        if version != VERSION or type(version) is not int:
            raise InvalidMessage(f"dataset manifest version {version!r:.20} is not supported "
                                 f"(this node reads {VERSION})")
        if not isinstance(name, str):
            raise InvalidMessage("dataset manifest: name must be text")
        cols = []
        for i, item in enumerate(canonical.sequence(columns, MAX_COLUMNS, "columns")):
            col_name, col_type = canonical.array(item, 2, f"column {i}")
            if not (isinstance(col_name, str) and isinstance(col_type, str)):
                raise InvalidMessage(f"dataset manifest: column {i} must be [name, type] text")
            cols.append(Column(col_name, col_type))
        items = []
        for i, item in enumerate(canonical.sequence(shards, MAX_SHARDS, "shards")):
            sha, rows, size = canonical.array(item, 3, f"shard {i}")
            items.append(Shard(sha, rows, size))
        return cls(name, tuple(cols), tuple(items))

    # ---- derived -----------------------------------------------------------------------------------

    @property
    def dataset_id(self) -> bytes:
        """The sha256 of the canonical bytes: what a run manifest names, and the file's name in the cache."""
        return crypto.sha256(self.to_wire())

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    def summary(self) -> dict:
        return {"dataset_id": self.dataset_id.hex(), "name": self.name, "rows": self.rows, "bytes": self.total_bytes,
                "columns": {c.name: c.type for c in self.columns},
                "shards": [{"sha256": s.hex, "rows": s.rows, "bytes": s.bytes} for s in self.shards]}


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not _NAME.fullmatch(name):
        raise InvalidMessage(f"dataset name {name!r:.70} must be 1-{MAX_NAME} letters, digits, '.', '_' or '-'")
    return name

