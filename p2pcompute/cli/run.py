"""`p2pc run ...`: publish a run spec to the swarm, list runs, follow a run's progress."""

from __future__ import annotations

import click

from p2pcompute.cli.common import console, data_dir_option, emit, err_console, json_option, print_table
from p2pcompute.config import resolve_data_dir
from p2pcompute.node.control import CLIENT_TIMEOUT, ControlClient

# publishing measures the run's training speed on the node first (a few seconds, more on a loaded machine)
PUBLISH_TIMEOUT = CLIENT_TIMEOUT + 60.0


@click.group()
def run() -> None:
    """Publish training runs and follow them (researchers)."""


@run.command("publish")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True,
              help="Publish even if the run's epochs look too short for its averaging rounds (warns instead).")
@click.option("--artifact", "artifacts", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="A file the run names by sha256 (initial weights, tokenizer.json): copied into the node's "
                   "artifact cache. Repeatable.")
@data_dir_option
@json_option
def publish(spec: str, force: bool, artifacts: tuple[str, ...], data_dir: str | None, as_json: bool) -> None:
    """Validate a TOML run SPEC, sign it with the node's key, record it in the ledger and announce it.

    The running node of --data-dir signs and announces; the run id is the hash of the canonical manifest.
    The node refuses a run whose epochs are too short for its averaging rounds at the swarm's estimated
    throughput (docs/training.md, "Epoch length"), naming the smallest target_batch_size that would do,
    and a run naming files (by sha256) that are not in its artifact cache: give them with --artifact."""
    from pathlib import Path

    from p2pcompute.runs.artifacts import ArtifactStore
    from p2pcompute.runs.manifest import Manifest

    manifest = Manifest.load(spec)  # a bad spec fails here, naming the field, before the node is contacted
    store = ArtifactStore.for_data_dir(resolve_data_dir(data_dir))
    added = [store.add(Path(path)) for path in artifacts]
    if added:  # the node serves them to volunteers (a file of its own in the DHT): never evicted from its cache
        from p2pcompute.runs.artifact_cache import ArtifactCache

        ArtifactCache(store.cache_dir).pin([bytes.fromhex(sha256) for sha256 in added])
    report = ControlClient(resolve_data_dir(data_dir), timeout=PUBLISH_TIMEOUT).call(
        "runs/publish", {"manifest": manifest.to_wire().hex(), "force": force})
    if report.get("warning"):
        err_console.print(f"[yellow]warning:[/] published anyway (--force): {report['warning']}", highlight=False)

    def render(r: dict) -> None:
        console.print(f"[bold green]published[/] run [bold]{r['name']}[/] id {r['run_id']}", highlight=False)
        console.print(f"ledger entry {r['entry_id']}; announced in the DHT: {r['announced']}", highlight=False)
        pacing, speed = r["pacing"], r["pacing"]["throughput"]
        console.print(f"epochs ~{pacing['epoch_seconds']:.1f} s of compute at ~{speed['samples_per_s']:,.0f} samples/s "
                      f"({speed['peers']} peers); its rounds need >= {pacing['min_epoch_seconds']:.1f} s",
                      highlight=False)

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


@run.command("status")
@click.argument("run_ref", metavar="RUN")
@data_dir_option
@json_option
def status(run_ref: str, data_dir: str | None, as_json: bool) -> None:
    """Epoch, loss, samples/s and the peers training RUN (id prefix or name), as the swarm reports it."""
    report = ControlClient(resolve_data_dir(data_dir)).call("runs/status", {"run": run_ref})

    def render(r: dict) -> None:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        console.print(f"[bold]{r['name']}[/] {r['run_id'][:16]}  epoch {r['epoch']}/{r['max_epochs'] or '∞'}  "
                      f"loss {loss}  {r['samples_per_second']:.1f} samples/s  "
                      f"{r['training_peers']} peers training", highlight=False)
        print_table(None, ["peer", "status", "epoch", "loss", "samples/s", "samples"],
                    [(peer[-12:], p["status"], p["epoch"], "-" if p["loss"] is None else f"{p['loss']:.4f}",
                      f"{p['samples_per_second']:.1f}", p["samples_done"]) for peer, p in r["peers"].items()])
        if r["evals"]:
            def show(value, fmt=".4f"):
                return "-" if value is None else format(value, fmt)

            print_table("evaluation (held-out samples, at the start of each epoch)",
                        ["epoch", "train loss", "eval loss", "perplexity", "accuracy", "peers"],
                        [(e["epoch"], show(e["train_loss"]), show(e["eval_loss"]), show(e["perplexity"], ".2f"),
                          show(e["accuracy"], ".3f"), e["peers"]) for e in r["evals"]])

    emit(report, as_json, render)


@run.command("checkpoint")
@click.argument("run_ref", metavar="RUN")
@click.option("-o", "--output", type=click.Path(), required=True,
              help="Where to write: a file (torch, safetensors) or a new directory (hf).")
@click.option("--format", "fmt", type=click.Choice(["torch", "safetensors", "hf"]), default="torch",
              show_default=True,
              help="torch: loads with torch.load(..., weights_only=True); safetensors: the parameters; hf: a directory "
                   "(config.json, model.safetensors, tokenizer) that AutoModelFor...from_pretrained loads.")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds to wait for a peer's state.")
@data_dir_option
@json_option
def checkpoint(run_ref: str, output: str, fmt: str, timeout: float, data_dir: str | None, as_json: bool) -> None:
    """Fetch RUN's parameters (this node's trainer, a kept final checkpoint, or the swarm) and write them."""
    from pathlib import Path

    path = Path(output).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    report = ControlClient(resolve_data_dir(data_dir), timeout=timeout + 30).call(
        "runs/checkpoint", {"run": run_ref, "path": str(path), "timeout": timeout, "format": fmt})

    def render(r: dict) -> None:
        console.print(f"wrote {r['path']} ({r['format']}, epoch {r['epoch']}, from {r['source']})", highlight=False)
        if (r.get("tokenizer") or "").startswith("missing"):
            err_console.print(f"[yellow]warning:[/] tokenizer {r['tokenizer']}", highlight=False)

    emit(report, as_json, render)
