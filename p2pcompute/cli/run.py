"""`p2pc run ...`: publish a run spec to the swarm, list runs, follow a run's progress."""

from __future__ import annotations

import click

from p2pcompute.cli.common import console, data_dir_option, emit, json_option, print_table
from p2pcompute.config import resolve_data_dir
from p2pcompute.node.control import ControlClient


@click.group()
def run() -> None:
    """Publish training runs and follow them (researchers)."""


@run.command("publish")
@click.argument("spec", type=click.Path(dir_okay=False))
@data_dir_option
@json_option
def publish(spec: str, data_dir: str | None, as_json: bool) -> None:
    """Validate a TOML run SPEC, sign it with the node's key, record it in the ledger and announce it.

    The running node of --data-dir signs and announces; the run id is the hash of the canonical manifest."""
    from p2pcompute.runs.manifest import Manifest

    manifest = Manifest.load(spec)  # a bad spec fails here, naming the field, before the node is contacted
    report = ControlClient(resolve_data_dir(data_dir)).call("runs/publish", {"manifest": manifest.to_wire().hex()})

    def render(r: dict) -> None:
        console.print(f"[bold green]published[/] run [bold]{r['name']}[/] id {r['run_id']}", highlight=False)
        console.print(f"ledger entry {r['entry_id']}; announced in the DHT: {r['announced']}", highlight=False)

    emit(report, as_json, render)


@run.command("list")
@data_dir_option
@json_option
def list_runs(data_dir: str | None, as_json: bool) -> None:
    """Runs the swarm knows, with their model, dataset and the peers training them."""
    runs = ControlClient(resolve_data_dir(data_dir)).call("runs")

    def render(rows: list[dict]) -> None:
        print_table(
            f"{len(rows)} runs",
            ["run id", "name", "model", "dataset", "target batch", "peers", "publisher"],
            [(r["run_id"][:16], r["name"], r["model"]["name"], r["dataset"]["name"], r["target_batch_size"],
              len(r["peers_training"]), r["publisher"][-12:]) for r in rows],
        )

    emit(runs, as_json, render)
