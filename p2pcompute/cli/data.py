"""`p2pc data ...`: publish local files as a peer-to-peer dataset, list and show the datasets in the node's cache."""

from __future__ import annotations

from pathlib import Path

import click

from p2pcompute.cli.common import console, data_dir_option, emit, json_option, print_table
from p2pcompute.config import resolve_data_dir
from p2pcompute.errors import NotFound, UsageError


@click.group()
def data() -> None:
    """Datasets shared peer to peer (researchers publish, volunteers fetch what they train on)."""


def _cache(data_dir: str | None):
    from p2pcompute.runs.artifact_cache import ArtifactCache, artifacts_dir

    directory = resolve_data_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # as `p2pc node start` makes it
    return ArtifactCache(artifacts_dir(directory))


@data.command("publish")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Dataset name (letters, digits, '.', '_', '-'); default: the first file's.")
@click.option("--shard-mb", type=float, default=64.0, show_default=True,
              help="Target shard size in MiB (measured on the decoded columns).")
@click.option("--shard-rows", type=int, default=None, help="At most this many rows a shard.")
@click.option("--columns", default="", help="Comma-separated columns to publish (default: all).")
@data_dir_option
@json_option
def publish(paths: tuple[Path, ...], name: str | None, shard_mb: float, shard_rows: int | None, columns: str,
            data_dir: str | None, as_json: bool) -> None:
    """Cut PATHS (parquet, JSON lines, Arrow files or a `datasets` save_to_disk directory; text, numbers or pixel
    arrays with labels) into content-addressed parquet shards in the node's cache, and print the dataset id.

    \b
    A run names it with:  [dataset]  name = "p2p"  id = "<dataset id>"  (docs/data.md)
    The node of --data-dir serves the shards (running now, or once started); they are never evicted from it."""
    from p2pcompute.runs.shard_writer import default_name, publish as publish_files

    wanted = tuple(c.strip() for c in columns.split(",") if c.strip())
    if len(set(wanted)) != len(wanted):
        raise UsageError("--columns names a column twice")
    manifest = publish_files(list(paths), _cache(data_dir), name=name or default_name(paths), shard_mb=shard_mb,
                             shard_rows=shard_rows, columns=wanted)
    report = manifest.summary()

    def render(r: dict) -> None:
        console.print(f"[bold green]published[/] dataset [bold]{r['name']}[/]: {r['rows']:,} rows in "
                      f"{len(r['shards'])} shards, {r['bytes']:,} bytes", highlight=False)
        console.print("columns: " + ", ".join(f"{k} ({v})" for k, v in r["columns"].items()), highlight=False)
        console.print(f"dataset id {r['dataset_id']}", highlight=False)

    emit(report, as_json, render)


@data.command("list")
@data_dir_option
@json_option
def list_datasets(data_dir: str | None, as_json: bool) -> None:
    """The datasets in the node's cache: published here or fetched, with the shards held."""
    cache = _cache(data_dir)
    held, pinned = cache.held(), cache.pinned()
    rows = []
    for manifest in cache.dataset_manifests():
        have = [s for s in manifest.shards if s.sha256 in held]
        rows.append({"dataset_id": manifest.dataset_id.hex(), "name": manifest.name, "rows": manifest.rows,
                     "shards": len(manifest.shards), "shards_held": len(have),
                     "bytes_held": sum(s.bytes for s in have), "published_here": manifest.dataset_id in pinned})
    rows.sort(key=lambda r: r["name"])

    def render(items: list[dict]) -> None:
        print_table(f"{len(items)} datasets", ["dataset id", "name", "rows", "shards held", "bytes held", "published"],
                    [(r["dataset_id"][:16], r["name"], r["rows"], f"{r['shards_held']}/{r['shards']}",
                      r["bytes_held"], "yes" if r["published_here"] else "") for r in items])

    emit(rows, as_json, render)


@data.command("show")
@click.argument("dataset_ref", metavar="DATASET")
@data_dir_option
@json_option
def show(dataset_ref: str, data_dir: str | None, as_json: bool) -> None:
    """A dataset's manifest (columns, shards with their sha256, rows and bytes); DATASET is an id or its prefix."""
    cache = _cache(data_dir)
    matches = [m for m in cache.dataset_manifests() if m.dataset_id.hex().startswith(dataset_ref.lower())]
    if not dataset_ref or len(matches) != 1:
        raise NotFound(f"{len(matches)} datasets in {cache.directory} match {dataset_ref!r}")
    held = cache.held()
    report = matches[0].summary()
    for shard in report["shards"]:
        shard["held"] = bytes.fromhex(shard["sha256"]) in held

    def render(r: dict) -> None:
        console.print(f"[bold]{r['name']}[/] {r['dataset_id']}: {r['rows']:,} rows, {r['bytes']:,} bytes",
                      highlight=False)
        console.print("columns: " + ", ".join(f"{k} ({v})" for k, v in r["columns"].items()), highlight=False)
        print_table(None, ["#", "sha256", "rows", "bytes", "held"],
                    [(i, s["sha256"][:16], s["rows"], s["bytes"], "yes" if s["held"] else "")
                     for i, s in enumerate(r["shards"])])

    emit(report, as_json, render)
