"""Publishing a dataset: local files read, checked and cut into parquet shards in the node's cache, with a manifest.

Inputs are parquet, JSON lines, Arrow IPC files or streams, a `datasets` save_to_disk directory, read with
pyarrow, or an image folder (class folders of PNG/JPEG files, runs/images.py); their columns are checked and cast to the published types (runs/shard_format.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from p2pcompute import crypto
from p2pcompute.errors import InvalidMessage, UsageError
from p2pcompute.runs.artifact_cache import ArtifactCache
from p2pcompute.runs.data_manifest import (MAX_SHARD_BYTES, MAX_SHARDS, Column, DatasetManifest, Shard,
                                           check_name)
from p2pcompute.runs.images import is_image_folder, read_image_folder
from p2pcompute.runs.shard_format import arrow_types, column_type, encode_shard

if TYPE_CHECKING:
    import pyarrow as pa

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
            ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
MAX_INPUT_FILES = 4096
# Inputs are read into memory whole (pyarrow tables) before they are cut into shards: a bound on what one
# publish may ask of the researcher's machine, and a clear error instead of swapping.
MAX_INPUT_BYTES = 32 << 30
MIN_SHARD_MB, MAX_SHARD_MB = 0.001, MAX_SHARD_BYTES / 2**20


def read_table(path: Path) -> "pa.Table":
    """One input as an Arrow table; UsageError for what is not an input, InvalidMessage for unreadable content."""
    import pyarrow as pa

    path = Path(path)
    if is_image_folder(path):
        return read_image_folder(path, MAX_INPUT_BYTES)
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file or directory")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"{path}: unknown format (expected {', '.join(sorted(SUFFIXES))} or a directory written by "
                         "datasets' save_to_disk)")
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind == "jsonl":
            import pyarrow.json as pj

            return pj.read_json(path)
        try:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # not the file format: the stream format (what `datasets` caches)
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InvalidMessage(f"{path}: not a readable {kind} file: {_first_line(e)}") from None


def _read_saved_dataset(path: Path) -> "pa.Table":
    if not (path / "dataset_info.json").is_file() or not (path / "state.json").is_file():
        raise UsageError(f"{path}: a directory must be one split written by datasets' save_to_disk "
                         "(with dataset_info.json and state.json)")
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{path}: reading save_to_disk directories needs the `datasets` package "
                         "(pip install 'p2pcompute[data]')") from None
    try:
        return datasets.load_from_disk(str(path)).data.table
    except (OSError, ValueError, KeyError) as e:
        raise InvalidMessage(f"{path}: not a readable saved dataset: {_first_line(e)}") from None


def normalise(table: "pa.Table", columns: Sequence[str], where: str) -> tuple["pa.Table", tuple[Column, ...]]:
    """The chosen columns (all if none are named) cast to their published Arrow types (runs/shard_format.py)."""
    import pyarrow as pa

    names = list(columns) or table.column_names
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise UsageError(f"{where} has no column {missing[0]!r} (it has: {', '.join(table.column_names)})")
    types = arrow_types()
    arrays, described = [], []
    for name in names:
        column = table.column(name)
        if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
            import pyarrow.compute as pc

            column = pc.struct_field(column, "bytes")  # `datasets`' Image feature, {bytes, path}: the encoded image
        ctype = column_type(column.type)
        if ctype is None:
            raise UsageError(f"{where}: column {name!r} is {column.type}, which cannot be published (text, numbers, "
                             "bytes or numeric arrays such as pixels; choose columns with --columns)")
        try:
            values = _flatten_lists(column.combine_chunks()) if ctype.endswith("[]") else column
            arrays.append(values.cast(types[ctype], safe=ctype != "float[]"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InvalidMessage(f"{where}: column {name!r} does not convert to {ctype}: {_first_line(e)}") from None
        described.append(Column(name, ctype))
    return pa.table(arrays, names=names), tuple(described)


def _flatten_lists(array: "pa.Array") -> "pa.Array":
    """A list column nested any depth (an image as rows of pixels) as one flat list per row."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(array.type):
        array = array.cast(pa.list_(array.type.value_type))
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        inner = array.values
        if pa.types.is_fixed_size_list(inner.type):
            inner = inner.cast(pa.list_(inner.type.value_type))
        if not (pa.types.is_list(inner.type) or pa.types.is_large_list(inner.type)):
            return array
        if array.null_count or inner.null_count:
            raise InvalidMessage("nested lists with missing values cannot be flattened")
        # offsets of the outer list index inner lists: mapping them through the inner offsets gives value offsets
        array = pa.ListArray.from_arrays(inner.offsets.take(array.offsets), inner.values)
    return array


def plan_shards(rows: int, table_bytes: int, shard_bytes: int, max_rows: int | None) -> list[tuple[int, int]]:
    """(start, length) row ranges of about `shard_bytes` each (measured on the decoded table), at most `max_rows`."""
    per_row = max(1.0, table_bytes / max(1, rows))
    size = max(1, int(shard_bytes // per_row))
    if max_rows:
        size = min(size, max_rows)
    return [(start, min(size, rows - start)) for start in range(0, rows, size)]


def publish(paths: Sequence[Path], cache: ArtifactCache, *, name: str, shard_mb: float = 64.0,
            shard_rows: int | None = None, columns: Sequence[str] = ()) -> DatasetManifest:
    """Read, check and shard the inputs into `cache` (every file pinned: a publisher keeps what it published);
    returns the dataset manifest, stored in the cache under its id."""
    import pyarrow as pa

    check_name_usage(name)
    if not MIN_SHARD_MB <= shard_mb <= MAX_SHARD_MB:
        raise UsageError(f"--shard-mb must be between {MIN_SHARD_MB} and {MAX_SHARD_MB:.0f}, got {shard_mb}")
    if shard_rows is not None and shard_rows < 1:
        raise UsageError("--shard-rows must be at least 1")
    if not paths:
        raise UsageError("name at least one file to publish")
    if len(paths) > MAX_INPUT_FILES:
        raise UsageError(f"at most {MAX_INPUT_FILES} input files, got {len(paths)}")
    total = sum(_input_bytes(Path(p)) for p in paths)
    if total > MAX_INPUT_BYTES:
        raise UsageError(f"the inputs are {total} bytes, above the limit of {MAX_INPUT_BYTES} for one publish")
    tables, described = [], None
    for path in paths:
        table, cols = normalise(read_table(Path(path)), columns, str(path))
        if described is not None and cols != described:
            raise UsageError(f"{path}: its columns ({_show(cols)}) differ from {paths[0]}'s ({_show(described)})")
        tables.append(table)
        described = cols
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if table.num_rows == 0:
        raise UsageError("the inputs hold no rows")
    ranges = plan_shards(table.num_rows, table.nbytes, int(shard_mb * 2**20), shard_rows)
    if len(ranges) > MAX_SHARDS:
        raise UsageError(f"{len(ranges)} shards is above the limit of {MAX_SHARDS}: raise --shard-mb")
    shards = []
    for start, length in ranges:
        data = encode_shard(table.slice(start, length))
        if len(data) > MAX_SHARD_BYTES:
            raise UsageError(f"rows {start}-{start + length - 1} make a {len(data)}-byte shard, above the limit of "
                             f"{MAX_SHARD_BYTES}: lower --shard-mb or --shard-rows")
        sha256 = crypto.sha256(data)
        cache.put(sha256, data, pin=True)
        shards.append(Shard(sha256, length, len(data)))
    manifest = DatasetManifest(name, described, tuple(shards))
    cache.put(manifest.dataset_id, manifest.to_wire(), pin=True)
    return manifest


def check_name_usage(name: str) -> None:
    try:
        check_name(name)
    except InvalidMessage as e:
        raise UsageError(f"--name: {e}") from None


def _input_bytes(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None


def _show(columns: tuple[Column, ...]) -> str:
    return ", ".join(f"{c.name}: {c.type}" for c in columns)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def default_name(paths: Sequence[Path]) -> str:
    """The first input's stem, reduced to the characters a dataset name may hold."""
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(paths[0]).stem).strip("-._") if paths else ""
    return (stem or "dataset")[:64]
