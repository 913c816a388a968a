"""Shard bytes: a parquet file of one Arrow type per column type, written by the publisher and checked when read back."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from p2pcompute.errors import InvalidMessage
from p2pcompute.runs.data_manifest import Column, MAX_SHARD_BYTES, Shard

if TYPE_CHECKING:
    import pyarrow as pa

# A shard's decoded columns may be larger than its compressed bytes, but not by more than this in all: parquet
# metadata announces the uncompressed size, so a shard that would decode into gigabytes is refused unread.
MAX_DECODED_BYTES = 4 * MAX_SHARD_BYTES
COMPRESSION = "zstd"  # ~2-4x on text, fast to decode; every pyarrow wheel has it


def arrow_types() -> dict[str, "pa.DataType"]:
    """Column type -> the one Arrow type its values are stored as."""
    import pyarrow as pa

    return {"text": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
            "bytes": pa.binary(), "uint8[]": pa.list_(pa.uint8()), "int[]": pa.list_(pa.int64()),
            "float[]": pa.list_(pa.float32())}


def column_type(arrow_type: "pa.DataType") -> str | None:
    """The column type an Arrow type is published as (after flattening nested lists), or None if unsupported."""
    import pyarrow.types as t

    if t.is_string(arrow_type) or t.is_large_string(arrow_type):
        return "text"
    if t.is_boolean(arrow_type):
        return "bool"
    if t.is_integer(arrow_type):
        return "int"
    if t.is_floating(arrow_type):
        return "float"
    if t.is_binary(arrow_type) or t.is_large_binary(arrow_type) or t.is_fixed_size_binary(arrow_type):
        return "bytes"
    if t.is_list(arrow_type) or t.is_large_list(arrow_type) or t.is_fixed_size_list(arrow_type):
        inner = arrow_type.value_type
        while t.is_list(inner) or t.is_large_list(inner) or t.is_fixed_size_list(inner):
            inner = inner.value_type
        if t.is_uint8(inner):
            return "uint8[]"
        if t.is_integer(inner) or t.is_boolean(inner):
            return "int[]"
        if t.is_floating(inner):
            return "float[]"
    return None


def encode_shard(table: "pa.Table") -> bytes:
    """The parquet bytes of a table whose columns already have their published Arrow types."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression=COMPRESSION)
    return sink.getvalue()


def decode_shard(data: bytes, shard: Shard, columns: tuple[Column, ...], wanted: tuple[str, ...]) -> "pa.Table":
    """Read the `wanted` columns of a shard whose bytes already match its sha256, checking that it is the parquet
    file the manifest describes (rows, columns and their types, a bounded decoded size); InvalidMessage if not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = arrow_types()
    try:
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
        if meta.num_rows != shard.rows:
            raise InvalidMessage(f"shard {shard.hex[:12]} has {meta.num_rows} rows, the manifest says {shard.rows}")
        decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if decoded > MAX_DECODED_BYTES:
            raise InvalidMessage(f"shard {shard.hex[:12]} would decode into {decoded} bytes "
                                 f"(limit {MAX_DECODED_BYTES})")
        table = pq.read_table(io.BytesIO(data), columns=list(wanted))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InvalidMessage(f"shard {shard.hex[:12]} is not a readable parquet file: {str(e)[:200]}") from None
    declared = {c.name: c.type for c in columns}
    for name in wanted:
        if table.schema.field(name).type != types[declared[name]]:
            raise InvalidMessage(f"shard {shard.hex[:12]}: column {name!r} is {table.schema.field(name).type}, "
                                 f"the manifest says {declared[name]}")
    return table
