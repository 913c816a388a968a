"""Swarm behaviour through the real CLI: discovery, expiry of killed nodes, restarts, bad input."""

from __future__ import annotations

import json
import os
import socket
import stat
import time

import pytest

from conftest import LOOPBACK, p2pc_json, peer_ids_seen_by, run_p2pc, wait_until
from p2pcompute.errors import ConfigError
from p2pcompute.identity import Identity


def test_bootstrap_and_three_nodes_see_each_other(swarm):
    everyone = {swarm.bootstrap.peer_id} | {n.peer_id for n in swarm.nodes}
    for proc in [swarm.bootstrap, *swarm.nodes]:
        wait_until(lambda: peer_ids_seen_by(proc.data_dir) >= everyone, timeout=60,
                   what=f"{proc.data_dir.name} to see all 4 peers")
    peers = p2pc_json("peers", "--data-dir", str(swarm.nodes[0].data_dir))
    by_id = {p["peer_id"]: p for p in peers}
    assert by_id[swarm.bootstrap.peer_id]["status"] == "bootstrap"
    assert {by_id[n.peer_id]["name"] for n in swarm.nodes} == {"node0", "node1", "node2"}
    assert sum(p["self"] for p in peers) == 1


def test_node_status_and_id(swarm):
    node = swarm.nodes[1]
    status = p2pc_json("node", "status", "--data-dir", str(node.data_dir))
    assert status["peer_id"] == node.peer_id
    assert status["role"] == "node"
    assert status["status"] == "idle"
    assert status["uptime_s"] >= 0
    assert any(a.startswith("/ip4/127.0.0.1/tcp/") for a in status["multiaddrs"])
    assert (node.data_dir / "multiaddrs").read_text().split() == status["multiaddrs"]
    ident = run_p2pc("node", "id", "--data-dir", str(node.data_dir), check=True)
    assert ident.stdout.strip() == node.peer_id
    human = run_p2pc("node", "status", "--data-dir", str(node.data_dir), check=True)
    assert node.peer_id in human.stdout and "uptime" in human.stdout


def test_peers_via_one_shot_client(swarm):
    peers = p2pc_json("peers", "--bootstrap", swarm.bootstrap.loopback_maddr())
    assert {n.peer_id for n in swarm.nodes} <= {p["peer_id"] for p in peers}


def test_control_api_requires_token(swarm):
    import http.client

    endpoint = json.loads((swarm.nodes[0].data_dir / "control.json").read_text())
    assert endpoint["host"] == "127.0.0.1"
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        conn = http.client.HTTPConnection("127.0.0.1", endpoint["port"], timeout=10)
        conn.request("GET", "/api/status", headers=headers)
        assert conn.getresponse().status == 401
        conn.close()
    token_file = swarm.nodes[0].data_dir / "control.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((swarm.nodes[0].data_dir / "identity.key").stat().st_mode) == 0o600


def test_killed_node_disappears_after_expiry(swarm, tmp_path):
    from p2pcompute.node.launcher import NodeProcess

    victim = NodeProcess(["node", "start"], tmp_path / "victim",
                         ["--listen", LOOPBACK, "--bootstrap", swarm.bootstrap.loopback_maddr(),
                          "--record-ttl", "4", "--name", "victim"]).start()
    try:
        observer = swarm.nodes[0].data_dir
        wait_until(lambda: victim.peer_id in peer_ids_seen_by(observer), timeout=30, what="victim to be seen")
        victim.kill()
        killed_at = time.monotonic()
        wait_until(lambda: victim.peer_id not in peer_ids_seen_by(observer), timeout=30,
                   what="killed victim to vanish")
        assert time.monotonic() - killed_at < 30
        assert not victim.alive()
    finally:
        victim.kill()


def test_restart_keeps_peer_id_and_clean_shutdown_leaves_no_process(own_swarm):
    own_swarm.start_bootstrap()
    node = own_swarm.start_node("again")
    first_id = node.peer_id
    pid = node.pid
    assert node.stop() == 0  # SIGTERM -> clean exit 0
    # no process of that group survives (p2pd included)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not (node.data_dir / "multiaddrs").exists()
    node.start()
    assert node.peer_id == first_id


def test_insecure_key_permissions_refused(tmp_path):
    data_dir = tmp_path / "n"
    Identity.generate().write(data_dir / "identity.key")
    os.chmod(data_dir / "identity.key", 0o644)
    proc = run_p2pc("node", "start", "--data-dir", str(data_dir), "--listen", LOOPBACK, timeout=60)
    assert proc.returncode == 3
    assert "chmod 600" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "config_text, env, expected",
    [
        ('[swarm]\nrecord_ttl = "abc"\n', {}, "swarm.record_ttl"),
        ("[swarm]\nrecord_ttl = 1\n", {}, "out of range"),
        ("[swarm]\nlisten = ['not-a-maddr']\n", {}, "swarm.listen"),
        ("[node]\nfavourite_colour = 'blue'\n", {}, "unknown key node.favourite_colour"),
        ("this is = = not toml", {}, "not valid TOML"),
        ("", {"P2PC_LISTEN": "garbage"}, "P2PC_LISTEN"),
        ("", {"P2PC_BOOTSTRAP": "/ip4/127.0.0.1/tcp/1"}, "/p2p/"),
    ],
)
def test_bad_config_is_named(tmp_path, config_text, env, expected):
    data_dir = tmp_path / "n"
    data_dir.mkdir()
    (data_dir / "config.toml").write_text(config_text)
    proc = run_p2pc("node", "start", "--data-dir", str(data_dir), timeout=60, env={**os.environ, **env})
    assert proc.returncode == ConfigError.exit_code, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_bootstrap_fails_cleanly(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nobody = Identity.generate().peer_id_b58
    started = time.monotonic()
    proc = run_p2pc("node", "start", "--data-dir", str(tmp_path / "n"), "--listen", LOOPBACK,
                    "--bootstrap", f"/ip4/127.0.0.1/tcp/{port}/p2p/{nobody}", timeout=90)
    assert proc.returncode == 5
    assert "none of the bootstrap peers answered" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60


def test_status_without_running_node(tmp_path):
    proc = run_p2pc("node", "status", "--data-dir", str(tmp_path))
    assert proc.returncode == 4 and "no node is running" in proc.stderr


def test_demo_runs_and_cleans_up():
    proc = run_p2pc("demo", "--nodes", "2", "--epochs", "8", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "see each other" in proc.stdout
    assert "loss went down" in proc.stdout
    assert "every node's replica holds the same balances: True" in proc.stdout
    assert "all demo processes stopped" in proc.stdout
