"""Volunteers behind home routers (issue 11), in network namespaces with real NAT routers (iptables MASQUERADE):
a bootstrap and a node on public addresses, two nodes each behind its own router (p2pcompute.devtools.netns).

The finding reproduced: with both NATed nodes in one run, one of them could not be dialled by the other (each
advertised its LAN address) and fell behind the swarm's epochs, earning little or nothing, while nothing told
its owner why. Now each learns it is private at start (a dial-back by the bootstrap), takes part as a DHT and
averaging client, and says so in `node status` and in its peer record."""

from __future__ import annotations

import json
import time

import pytest

from conftest import wait_until
from p2pcompute.cli.demo import demo_spec
from p2pcompute.devtools.netns import NatTopology, unavailable

EPOCHS = 10  # 90% of the epochs must be paid: one of ten may be missed (a round that found no group)
TARGET_BATCH_SIZE = 3072  # the demo's epoch: ~0.1-0.3 s of swarm compute, so the run is mostly rounds
TTL = "6"  # seconds a peer record lives: records with the reachability appear quickly
RUN_TIMEOUT = 240.0  # seconds for the run to finish on every peer (~60-90 s on a loaded 2-core box)
NATED = ("h1", "h2")


@pytest.fixture(scope="module")
def nat(tmp_path_factory):
    """The topology with a bootstrap on `boot` and a node on each of `pub`, `h1`, `h2`, all started with the
    defaults a volunteer uses (listen on every interface, one bootstrap address, nothing about NAT)."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    topology = NatTopology(tmp_path_factory.mktemp("nat"))
    try:
        topology.start()
        boot = topology.spawn("boot", ["bootstrap"], "boot", ["--record-ttl", TTL])
        address = next(a for a in boot.maddrs if topology.hosts["boot"].address in a)
        nodes = {host: topology.spawn(host, ["node", "start"], host, [
            "--bootstrap", address, "--record-ttl", TTL, "--name", host, "--min-peers", "3", "--sync-interval", "2",
        ], wait=False) for host in ("pub", *NATED)}
        for node in nodes.values():
            node.wait_ready()
        topology.nodes = nodes
        yield topology
    finally:
        topology.shutdown()


def cli_json(nat: NatTopology, host: str, *args: str, timeout: float = 180):  # a CLI start takes ~60 s at load 17
    proc = nat.p2pc(host, *args, "--json", "--data-dir", str(nat.nodes[host].data_dir), timeout=timeout)
    assert proc.returncode == 0, f"p2pc {' '.join(args)} on {host} failed ({proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


def receipt_epochs(nat: NatTopology, host: str, peer_id: str, run_id: str) -> set[int]:
    """Epochs paid to `peer_id` for the run (payouts by its issuer), in `host`'s ledger replica."""
    proc = nat.p2pc(host, "ledger", "export", "--format", "jsonl", "--data-dir", str(nat.nodes[host].data_dir))
    assert proc.returncode == 0, proc.stderr
    claims = [e["body"]["claim"] for e in map(json.loads, proc.stdout.splitlines()) if e["kind"] == "payout"]
    return {c["epoch"] for c in claims if c["peer"] == peer_id and c["run_id"] == run_id}


def test_reachability_known_and_shown(nat):
    for host in NATED:
        status = cli_json(nat, host, "node", "status")
        assert status["reachability"]["state"] == "private", status["reachability"]
        assert "could not dial us back" in status["reachability"]["reason"]
    assert cli_json(nat, "pub", "node", "status")["reachability"]["state"] == "public"
    text = nat.p2pc("h1", "node", "status", "--data-dir", str(nat.nodes["h1"].data_dir)).stdout
    assert "private" in text and "dial us back" in " ".join(text.split())
    expected = {nat.nodes["pub"].peer_id: "public", **{nat.nodes[h].peer_id: "private" for h in NATED}}

    def seen():  # records of every node, with their reachability, as the public node reads them from the DHT
        peers = {p["peer_id"]: p.get("reachability") for p in cli_json(nat, "pub", "peers")}
        return all(peers.get(k) == v for k, v in expected.items()) and peers

    peers = wait_until(seen, timeout=60, interval=2, what="every node's reachability in `p2pc peers --json`")
    assert peers[nat.procs[0].peer_id] == "public"  # the bootstrap


@pytest.mark.timeout(600)
def test_nated_nodes_train_and_earn(nat):
    """Both NATed nodes keep up with the swarm's epochs to the end of the run and are paid for (almost) every
    epoch: before, the second one fell behind (its mate could not dial it) and earned little or nothing."""
    spec = nat.root / "run.toml"
    spec.write_text(demo_spec(EPOCHS, TARGET_BATCH_SIZE))
    # --force: the demo's 3,072-sample epochs are shorter than the publish check asks for; we want many rounds
    run_id = cli_json(nat, "pub", "run", "publish", str(spec), "--force", timeout=120)["run_id"]
    started = time.monotonic()

    reached = {nat.nodes[host].peer_id: 0 for host in ("pub", *NATED)}

    def finished():  # a peer that finished first may withdraw its progress record before the others finish
        for peer_id, peer in cli_json(nat, "pub", "run", "status", run_id)["peers"].items():
            reached[peer_id] = max(reached.get(peer_id, 0), peer["epoch"])
        return all(epoch >= EPOCHS for epoch in reached.values())

    wait_until(finished, timeout=RUN_TIMEOUT, interval=3, what=f"every node to reach epoch {EPOCHS}: {reached}")
    elapsed = time.monotonic() - started
    for host in NATED:
        peer_id = nat.nodes[host].peer_id

        def paid():  # payouts are appended by the run's issuer (the publisher) and replicated: read the claimant's
            epochs = receipt_epochs(nat, host, peer_id, run_id)
            return len(epochs) >= 0.9 * EPOCHS and epochs

        epochs = wait_until(paid, timeout=60, interval=3, what=f"{host}'s payouts (run took {elapsed:.0f} s)")
        assert epochs <= set(range(EPOCHS + 1))
        assert cli_json(nat, host, "node", "status")["credits"] > 0


def test_verdict_and_modes(tmp_path):
    """The pure parts: the verdict from dial-back answers, and the mode the config starts p2pd in."""
    from p2pcompute.config import load_config
    from p2pcompute.node.reachability import initial
    from p2pcompute.services.reach import Answer, decide

    assert decide([Answer("a", False, "refused"), Answer("b", True, "dialled x")], 3).state == "public"
    private = decide([Answer("a", False, "none of your addresses is at 10.99.0.21")], 1)
    assert private.state == "private" and "10.99.0.21" in private.reason
    assert decide([], 2).state == "unknown" and decide([], 0).state == "unknown"
    boot = "/ip4/10.99.0.10/tcp/1/p2p/12D3KooWDv3hsZNdFazqFFVWdcLdohqn5sPDYvRqdd68whhfLVxi"

    def mode(role="node", **settings):
        config = load_config(tmp_path, environ={}, overrides=dict(bootstrap=(boot,), **settings))
        found, reachability = initial(config, role)
        return found, reachability and reachability.state

    assert mode() == ("auto", None)  # listening on every interface: checked at start
    assert mode(listen=("/ip4/127.0.0.1/tcp/0",)) == ("local", "public")
    assert mode(public=True) == ("public", "public") and mode(public=False) == ("local", "public")
    assert mode(public="private") == ("private", "private")
    assert mode(role="bootstrap") == ("public", "public")
