"""Shared CLI plumbing: --data-dir/--json options, JSON or rich-table output, one-line errors."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable, Sequence

import click
from rich.console import Console
from rich.table import Table

from p2pcompute.config import resolve_data_dir

console = Console()
err_console = Console(stderr=True)

data_dir_option = click.option(
    "--data-dir",
    "data_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Node data directory (default: $P2PC_DATA_DIR or ~/.local/share/p2pcompute).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def data_dir_path(data_dir: str | None):
    return resolve_data_dir(data_dir)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def print_fields(title: str | None, rows: Iterable[Sequence[Any]]) -> None:
    """A two-column key/value table (status pages)."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(str(key), "" if value is None else str(value))
    console.print(table)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Print `data` as JSON, or hand it to `render` for human output."""
    if as_json:
        print_json(data)
    else:
        render(data)
