"""The same run in the NAT topology and in an all-public one, in one sitting (issue 11): swarm samples/s, epochs
and receipts per node, side by side with the ratio.

    sudo PYTHONPATH=. python scripts/bench_nat.py [--epochs 10] [--target 3072]

NAT: a bootstrap and a public node, two nodes each behind its own MASQUERADE router (p2pcompute.devtools.netns).
All-public: the same bootstrap and three nodes on public addresses. Every node is started as a volunteer would
(`p2pc node start --bootstrap <boot>`, reachability "auto"); the run is the demo MLP in gradients mode. Swarm
samples/s = epochs x target_batch_size / (time from publish to every node at the last epoch); final loss: the
mean of the nodes' training loss (EMA) as `run status` last showed it; epochs paid: payouts in each node's
ledger. Relayed bytes are not shown: p2pd exposes no counter for them (docs/nat.md, "Relays").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2pcompute.cli.demo import demo_spec
from p2pcompute.devtools.netns import NatTopology, unavailable
from p2pcompute.retry import poll_until

RUN_TIMEOUT = 600.0  # seconds for the run to finish on every node on a loaded 2-core box
POLL = 3.0  # seconds between `run status` reads (each is a CLI start: ~2-5 s of CPU)


def cli(topology: NatTopology, host: str, node, *args: str):
    proc = topology.p2pc(host, *args, "--json", "--data-dir", str(node.data_dir), timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"p2pc {' '.join(args)} on {host}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def one_swarm(kind: str, root: Path, epochs: int, target: int) -> dict:
    trainers = ("pub", "h1", "h2") if kind == "nat" else ("pub", "pub2", "pub3")
    with NatTopology(root, routers=2 if kind == "nat" else 0, extra_public=0 if kind == "nat" else 2) as topology:
        boot = topology.spawn("boot", ["bootstrap"], "boot")
        address = next(a for a in boot.maddrs if topology.hosts["boot"].address in a)
        nodes = {h: topology.spawn(h, ["node", "start"], h, ["--bootstrap", address, "--name", h, "--min-peers", "3"],
                                   wait=False) for h in trainers}
        for node in nodes.values():
            node.wait_ready()
        spec = root / "run.toml"
        spec.write_text(demo_spec(epochs, target))
        run_id = cli(topology, "pub", nodes["pub"], "run", "publish", str(spec), "--force")["run_id"]
        started = time.monotonic()
        reached = {n.peer_id: 0 for n in nodes.values()}
        losses: dict[str, float] = {}  # peer id -> its training loss (EMA) when it was last seen, at its last epoch

        def done() -> bool:
            for peer_id, peer in cli(topology, "pub", nodes["pub"], "run", "status", run_id)["peers"].items():
                reached[peer_id] = max(reached.get(peer_id, 0), peer["epoch"])
                if peer["loss"] is not None:
                    losses[peer_id] = peer["loss"]
            return all(e >= epochs for e in reached.values())

        poll_until(done, RUN_TIMEOUT, interval=POLL, what="every node at the last epoch")
        seconds = time.monotonic() - started
        time.sleep(10)  # the last receipts settle
        out = {"seconds": seconds, "samples_per_s": epochs * target / seconds, "nodes": {},
               "final_loss": sum(losses.values()) / max(1, len(losses))}
        for host, node in nodes.items():
            status = cli(topology, host, node, "node", "status")
            export = topology.p2pc(host, "ledger", "export", "--format", "jsonl", "--data-dir", str(node.data_dir))
            claims = [e["body"]["claim"] for e in map(json.loads, export.stdout.splitlines()) if e["kind"] == "payout"]
            epochs_paid = {c["epoch"] for c in claims if c["peer"] == node.peer_id and c["run_id"] == run_id}
            out["nodes"][host] = {"reachability": status["reachability"]["state"], "receipts": len(epochs_paid),
                                  "credits": status["credits"] / 1e6}
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--target", type=int, default=3072, help="target_batch_size (samples per epoch)")
    args = parser.parse_args()
    console = Console()
    reason = unavailable()
    if reason is not None:
        raise SystemExit(f"cannot build the topology here: {reason}")
    os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-nat-") as tmp:
        for kind in ("public", "nat"):
            console.print(f"{kind}: {args.epochs} epochs of {args.target} samples (load {os.getloadavg()[0]:.2f})")
            results[kind] = one_swarm(kind, Path(tmp) / kind, args.epochs, args.target)
    table = Table(title=f"demo MLP, gradients mode, {args.epochs} x {args.target} samples, 3 trainers")
    table.add_column("swarm")
    table.add_column("run s")
    table.add_column("swarm samples/s")
    table.add_column("final loss")
    table.add_column("per node: reachability, epochs paid, credits")
    for kind, r in results.items():
        nodes = "; ".join(f"{h} {n['reachability']} {n['receipts']}/{args.epochs} {n['credits']:.2f}"
                          for h, n in r["nodes"].items())
        table.add_row(kind, f"{r['seconds']:.0f}", f"{r['samples_per_s']:.0f}", f"{r['final_loss']:.4f}", nodes)
    console.print(table)
    console.print(f"NAT / all-public samples/s: {results['nat']['samples_per_s'] / results['public']['samples_per_s']:.2f}")
    console.print(json.dumps(results))


if __name__ == "__main__":
    main()
