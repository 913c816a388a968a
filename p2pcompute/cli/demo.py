"""`p2pc demo`: a local swarm on 127.0.0.1 (bootstrap + N nodes as subprocesses) with live progress."""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import tempfile
from pathlib import Path

import click
from rich.live import Live
from rich.table import Table

from p2pcompute.cli.common import console
from p2pcompute.errors import TimedOut
from p2pcompute.node.control import ControlClient
from p2pcompute.node.launcher import NodeProcess
from p2pcompute.retry import Timeout, poll_until

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
DISCOVERY_TIMEOUT = 90.0  # seconds for every node to see every other on a loaded 2-core machine
TRAINING_TIMEOUT = 600.0  # seconds for the demo run to finish on a loaded 2-core machine (normally ~1 min)
CREDITS_TIMEOUT = 60.0  # seconds for the last receipts to reach every replica
PACING_TIMEOUT = 120.0  # seconds for node0 to measure the demo run's speed (a few; more on a loaded machine)

# The demo's run: a small MLP learning a fixed random teacher on synthetic data (nothing to download).
# Its [averaging] timeouts: manifest.LOCAL_NETWORK_AVERAGING, but groups gather for 1.5 s instead of 2.
DEMO_AVERAGING_OVERRIDES = {"matchmaking_time": "1.5"}
# Its epoch: at least this many samples, and as many as this machine needs for epochs that are long enough for
# their rounds (the publish check, docs/training.md "Epoch length"), times DEMO_PACING_MARGIN so that a
# slightly different estimate at publish still passes. A fixed number would be too short on a fast machine.
DEMO_TARGET_BATCH_SIZE = 3072
DEMO_PACING_MARGIN = 1.25


def demo_spec(epochs: int, target_batch_size: int = DEMO_TARGET_BATCH_SIZE, mode: str = "gradients") -> str:
    """The demo run's TOML spec for a run of `epochs` epochs of `target_batch_size` samples (`mode`: its averaging
    mode; the demo trains in gradients mode, the steady-state checks try local mode too)."""
    # imported here, not at the top: every p2pc command loads this module
    from p2pcompute.runs.specs import mlp_synthetic_spec

    return mlp_synthetic_spec(
        "demo-mlp", description="p2pc demo: an MLP learns a synthetic teacher function", batch_size_per_step=64,
        target_batch_size=target_batch_size, max_epochs=epochs, in_features=16, hidden=[64, 64], out_features=4,
        activation="relu", noise="0.05", seed=7, optimizer="adam", lr="0.01", mode=mode,
        averaging={"compression": "none", **({"average_state_every": 5} if mode == "gradients" else {}),
                   **DEMO_AVERAGING_OVERRIDES},
        hardware={"min_memory_mb": 256, "devices": ["cpu", "cuda"]}, credits={"rate": 1000, "quorum": 1})


@click.command()
@click.option("--nodes", "n_nodes", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Number of volunteer nodes to start.")
@click.option("--epochs", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Epochs (hivemind global steps) of the demo run.")
@click.option("--keep", is_flag=True, help="Keep the temp dir (logs, keys, ledgers) afterwards.")
def demo(n_nodes: int, epochs: int, keep: bool) -> None:
    """A local swarm on 127.0.0.1: a bootstrap peer and N nodes find each other, train a published run
    together (loss going down), and earn credits in the replicated ledger; then everything is stopped.

    Every process is started in a temp dir and stopped on exit or Ctrl-C; nothing is left behind."""
    root = Path(tempfile.mkdtemp(prefix="p2pc-demo-"))
    procs: list[NodeProcess] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        console.print(f"[bold]p2pcompute demo[/] in {root}")
        boot = NodeProcess(["bootstrap"], root / "bootstrap", ["--listen", LOOPBACK])
        procs.append(boot.start())
        console.print(f"bootstrap peer up: {boot.loopback_maddr()}", highlight=False)
        nodes = []
        threads = demo_cpu_threads(n_nodes)
        for i in range(n_nodes):
            node = NodeProcess(["node", "start"], root / f"node{i}",
                               ["--listen", LOOPBACK, "--bootstrap", boot.loopback_maddr(), "--name", f"demo-{i}",
                                "--record-ttl", "10", "--sync-interval", "2", "--min-peers", str(n_nodes),
                                "--cpu-threads", str(threads)])
            procs.append(node.start(wait=False))
            nodes.append(node)
        for node in nodes:
            node.wait_ready()
        _show_discovery(boot, nodes)
        spec = root / "demo-run.toml"
        spec.write_text(demo_spec(epochs, _paced_target(nodes[0], epochs)))
        published = ControlClient(nodes[0].data_dir, timeout=PACING_TIMEOUT).call(
            "runs/publish", {"manifest": _manifest_hex(spec)})
        console.print(f"published run [bold]{published['name']}[/] {published['run_id'][:16]} from node0; "
                      f"every node picks it up", highlight=False)
        losses = _show_training(nodes, published["run_id"], epochs)
        _show_loss_curve(losses)
        _show_credits(nodes)
    except KeyboardInterrupt:
        console.print("interrupted; stopping every process")
    finally:
        for proc in reversed(procs):
            proc.stop()
        signal.signal(signal.SIGTERM, previous)
        if keep:
            console.print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    console.print("[green]all demo processes stopped[/]")


def demo_cpu_threads(n_nodes: int) -> int:
    """Each demo node's share of this machine's cores for torch (at least one): N trainers with torch's default
    thread count each on one machine stall each other (training/device.py cpu_threads)."""
    from p2pcompute.training.device import usable_cores  # (torch: imported by the demo only)

    return max(1, usable_cores() // n_nodes)


def demo_target_batch_size(min_target_batch_size: int | None, batch_size_per_step: int) -> int:
    """DEMO_TARGET_BATCH_SIZE, or the publish check's smallest target times DEMO_PACING_MARGIN if that is more
    (a whole number of steps)."""
    step = batch_size_per_step
    return max(DEMO_TARGET_BATCH_SIZE, math.ceil((min_target_batch_size or 0) * DEMO_PACING_MARGIN / step) * step)


def demo_spec_sized_here(nodes: int, mode: str = "gradients", epochs: int = 0, pacing=None) -> str:
    """The demo run's spec with the epoch `p2pc demo` would give it on this machine for `nodes` nodes on it (the
    publish check's estimate: this machine's measured speed, nodes sharing its cores), without starting a node.
    `pacing`: a `node.pacing.PublishPacing` whose measurements to use (and keep), e.g. to check the spec with."""
    import os

    from p2pcompute.node.pacing import PublishPacing
    from p2pcompute.runs.manifest import Manifest
    from p2pcompute.runs.pacing import Throughput, check_pacing

    manifest = Manifest.from_toml(demo_spec(epochs, mode=mode))
    per_peer, source = (pacing or PublishPacing("cpu", [])).per_peer(manifest)
    shared = min(nodes, os.cpu_count() or 1)
    verdict = check_pacing(manifest, Throughput(per_peer * shared, nodes, source))
    return demo_spec(epochs, demo_target_batch_size(verdict.min_target_batch_size, manifest.batch_size_per_step), mode)


def _manifest_hex(spec: Path) -> str:
    from p2pcompute.runs.manifest import Manifest

    return Manifest.load(spec).to_wire().hex()


def _paced_target(node: NodeProcess, epochs: int) -> int:
    """The demo run's target_batch_size on this machine: DEMO_TARGET_BATCH_SIZE, or what the node's publish check
    asks for (with DEMO_PACING_MARGIN) if that is more."""
    from p2pcompute.runs.manifest import Manifest

    manifest = Manifest.from_toml(demo_spec(epochs))
    pacing = ControlClient(node.data_dir, timeout=PACING_TIMEOUT).call("runs/pacing",
                                                                       {"manifest": manifest.to_wire().hex()})
    speed = pacing["throughput"]
    target = demo_target_batch_size(pacing["min_target_batch_size"], manifest.batch_size_per_step)
    console.print(f"epochs of {target:,} samples: ~{target / speed['samples_per_s']:.1f} s of compute at the "
                  f"~{speed['samples_per_s']:,.0f} samples/s node0 estimates for {speed['peers']} peers "
                  f"(rounds need >= {pacing['min_epoch_seconds']:.1f} s)", highlight=False)
    return target


def _show_training(nodes: list[NodeProcess], run_id: str, epochs: int) -> dict[int, float]:
    """Live table of every node's trainer until the run reaches its last epoch; returns epoch -> loss."""
    losses: dict[int, float] = {}
    with Live(console=console, refresh_per_second=4) as live:
        def finished() -> bool:
            status = ControlClient(nodes[0].data_dir).call("runs/status", {"run": run_id})
            if status["loss"] is not None:
                losses.setdefault(status["epoch"], status["loss"])
            live.update(_training_table(status, epochs))
            return status["epoch"] >= epochs

        try:
            poll_until(finished, TRAINING_TIMEOUT, interval=0.5, what="the demo run to finish")
        except Timeout:
            raise TimedOut(f"the demo run did not finish within {TRAINING_TIMEOUT:.0f} s") from None
    return losses


def _training_table(status: dict, epochs: int) -> Table:
    loss = "-" if status["loss"] is None else f"{status['loss']:.4f}"
    table = Table(title=f"run {status['name']}: epoch {status['epoch']}/{epochs}, loss {loss}, "
                        f"{status['samples_per_second']:.0f} samples/s, {status['training_peers']} peers training")
    for column in ("peer", "status", "epoch", "loss", "samples/s", "samples"):
        table.add_column(column, justify="left" if column in ("peer", "status") else "right")
    for peer, p in status["peers"].items():
        table.add_row(peer[-12:], p["status"], str(p["epoch"]), "-" if p["loss"] is None else f"{p['loss']:.4f}",
                      f"{p['samples_per_second']:.0f}", str(p["samples_done"]))
    return table


def _show_loss_curve(losses: dict[int, float]) -> None:
    if len(losses) < 2:
        return
    epochs = sorted(losses)
    first, last = losses[epochs[0]], losses[epochs[-1]]
    table = Table(title="training loss (swarm mean) by epoch")
    table.add_column("epoch", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("")
    top = max(losses.values())
    for epoch in epochs:
        table.add_row(str(epoch), f"{losses[epoch]:.4f}", "█" * max(1, int(40 * losses[epoch] / top)))
    console.print(table)
    verdict = "went down" if last < first else "did not go down"
    console.print(f"[bold]loss {verdict}: {first:.4f} -> {last:.4f}[/]", highlight=False)


def _show_credits(nodes: list[NodeProcess]) -> None:
    """Balances as every replica sees them, once the replicas agree and every witnessed claim is settled (the last
    epochs' claims are witnessed, drawn for audits and paid a few seconds after the run ends: shown before, the
    table missed them, e.g. 10 of a node's 20 epochs)."""
    views: list = []
    open_claims: list = []
    clients = [ControlClient(n.data_dir) for n in nodes]

    def settled() -> bool:
        views[:] = [c.call("ledger/top", {}) for c in clients]
        open_claims[:] = [claim for c in clients for claim in c.call("credits")["pending_claims"] or ()]
        return all(v == views[0] for v in views) and bool(views[0]) and not any(c["witnesses"] for c in open_claims)

    with contextlib.suppress(Timeout):  # past the deadline: shown as they are, the lines below say what is missing
        poll_until(settled, CREDITS_TIMEOUT, interval=1.0, what="every replica's balances to agree")
    table = Table(title="credits earned (micro-credits), replica of node0")
    for column in ("peer", "credits", "samples", "receipts"):
        table.add_column(column, justify="left" if column == "peer" else "right")
    for row in views[0]:
        table.add_row(row["peer_id"][-12:], str(row["credits"]), str(row["samples"]), str(row["receipts"]))
    console.print(table)
    agree = all(v == views[0] for v in views)
    console.print(f"every node's replica holds the same balances: {agree}", highlight=False)
    if open_claims:
        witnessed = sum(1 for c in open_claims if c["witnesses"])
        console.print(f"claims not paid yet: {len(open_claims)} ({witnessed} witnessed, waiting for their issuer; "
                      f"{len(open_claims) - witnessed} with no witness yet)", highlight=False)


def _show_discovery(boot: NodeProcess, nodes: list[NodeProcess]) -> None:
    everyone = {boot.peer_id} | {n.peer_id for n in nodes}
    with Live(console=console, refresh_per_second=4) as live:
        def converged() -> bool:
            seen = {}
            for node in nodes:
                peers = ControlClient(node.data_dir).call("peers")
                seen[node] = {p["peer_id"] for p in peers}
            live.update(_discovery_table(nodes, seen, len(everyone)))
            return all(s >= everyone for s in seen.values())

        try:
            poll_until(converged, DISCOVERY_TIMEOUT, interval=0.5, what="every node to see every other")
        except Timeout:
            raise TimedOut(f"the demo swarm did not converge within {DISCOVERY_TIMEOUT:.0f} s") from None
    console.print(f"[bold green]all {len(nodes)} nodes and the bootstrap peer see each other[/]")


def _discovery_table(nodes: list[NodeProcess], seen: dict, total: int) -> Table:
    table = Table(title="swarm discovery")
    table.add_column("node")
    table.add_column("peer id")
    table.add_column("peers seen", justify="right")
    for node in nodes:
        table.add_row(node.data_dir.name, node.peer_id, f"{len(seen.get(node, ()))}/{total}")
    return table
