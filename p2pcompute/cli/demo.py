"""`p2pc demo`: a local swarm on 127.0.0.1 (bootstrap + N nodes as subprocesses) with live progress."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path

import click
from rich.live import Live
from rich.table import Table

from p2pcompute.cli.common import console
from p2pcompute.errors import UsageError
from p2pcompute.node.control import ControlClient
from p2pcompute.node.launcher import NodeProcess

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
DISCOVERY_TIMEOUT = 90.0  # seconds for every node to see every other on a loaded 2-core machine


@click.command()
@click.option("--nodes", "n_nodes", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Number of volunteer nodes to start.")
@click.option("--keep", is_flag=True, help="Keep the temp dir (logs, keys, ledgers) afterwards.")
def demo(n_nodes: int, keep: bool) -> None:
    """Start a bootstrap peer and N nodes on 127.0.0.1, show them find each other, then clean up.

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
        for i in range(n_nodes):
            node = NodeProcess(["node", "start"], root / f"node{i}",
                               ["--listen", LOOPBACK, "--bootstrap", boot.loopback_maddr(), "--name", f"demo-{i}",
                                "--record-ttl", "10"])
            procs.append(node.start(wait=False))
            nodes.append(node)
        for node in nodes:
            node.wait_ready()
        _show_discovery(boot, nodes)
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


def _show_discovery(boot: NodeProcess, nodes: list[NodeProcess]) -> None:
    everyone = {boot.peer_id} | {n.peer_id for n in nodes}
    deadline = time.monotonic() + DISCOVERY_TIMEOUT
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            seen = {}
            for node in nodes:
                peers = ControlClient(node.data_dir).call("peers")
                seen[node] = {p["peer_id"] for p in peers}
            live.update(_discovery_table(nodes, seen, len(everyone)))
            if all(s >= everyone for s in seen.values()):
                break
            if time.monotonic() > deadline:
                raise UsageError(f"the demo swarm did not converge within {DISCOVERY_TIMEOUT:.0f} s")
            time.sleep(0.5)
    console.print(f"[bold green]all {len(nodes)} nodes and the bootstrap peer see each other[/]")


def _discovery_table(nodes: list[NodeProcess], seen: dict, total: int) -> Table:
    table = Table(title="swarm discovery")
    table.add_column("node")
    table.add_column("peer id")
    table.add_column("peers seen", justify="right")
    for node in nodes:
        table.add_row(node.data_dir.name, node.peer_id, f"{len(seen.get(node, ()))}/{total}")
    return table
