"""A node dies whole: SIGKILL of its main process alone (what the OOM killer does) stops every process it started
within seconds, and a fresh start on its data dir then works; a second start on a running node's data dir (node
or bootstrap peer) is refused in one line while the ledger stays readable."""

from __future__ import annotations

import os
import signal
import time

from conftest import LOOPBACK, p2pc_json, run_p2pc, wait_until
from p2pcompute.cli.demo import demo_spec
from p2pcompute.errors import NodeAlreadyRunning
from p2pcompute.node import proctree

DEATH_TIMEOUT = 15.0  # seconds: the watchdog looks every 0.5 s and grants 3 s after SIGTERM; slack for 2 busy cores
TRAIN_TIMEOUT = 180.0  # seconds for a lone node to pick the run up and finish an epoch on a loaded machine


def trainer_epoch(node) -> int:
    trainer = (p2pc_json("node", "status", "--data-dir", str(node.data_dir))["training"] or {}).get("trainer")
    return (trainer or {}).get("epoch", 0)


def test_sigkill_of_the_main_process_leaves_nothing_and_the_node_starts_again(own_swarm, tmp_path):
    own_swarm.start_bootstrap()
    node = own_swarm.start_node("victim", "--min-peers", "1")
    spec = tmp_path / "run.toml"
    spec.write_text(demo_spec(epochs=0))  # no end: the node still has its averager processes when it is killed
    # --force: the demo's fixed 3072-sample epoch, short for a one-node run (the demo itself sizes it at publish)
    p2pc_json("run", "publish", str(spec), "--force", "--data-dir", str(node.data_dir))
    wait_until(lambda: trainer_epoch(node) >= 1, timeout=TRAIN_TIMEOUT, interval=1, what="the node to train")
    first_id = node.peer_id
    family = proctree.descendants(node.pid)  # watchdog, DHT process, p2pd, averagers, torch_shm_manager
    try:
        names = sorted(r.name for r in family)
        # p2pd, and besides the watchdog and the DHT process at least one averager (all three: forked pythons)
        assert "p2pd" in names and sum(n.startswith("python") for n in names) >= 3, names
        os.kill(node.pid, signal.SIGKILL)  # the main process only, not its group
        node.proc.wait(DEATH_TIMEOUT)
        killed_at = time.monotonic()
        wait_until(lambda: not [r for r in family if proctree.is_running(r)], timeout=DEATH_TIMEOUT, interval=0.1,
                   what=f"every process of the killed node to exit ({names})")
        assert time.monotonic() - killed_at < DEATH_TIMEOUT
    finally:
        for record in family:  # whatever the watchdog left, by PID and start time
            proctree.send_signal(record, signal.SIGKILL)
    node.start()  # the data dir is free again, the identity the same
    assert node.peer_id == first_id
    assert p2pc_json("node", "status", "--data-dir", str(node.data_dir))["peer_id"] == first_id


def test_a_second_start_on_a_running_data_dir_is_refused_in_one_line(own_swarm):
    boot = own_swarm.start_bootstrap()
    node = own_swarm.start_node("first", "--no-train")
    attempts = {
        "node": ("node", "start", "--data-dir", str(node.data_dir), "--listen", LOOPBACK, "--no-train",
                 "--bootstrap", boot.loopback_maddr()),
        "bootstrap": ("bootstrap", "--data-dir", str(boot.data_dir), "--listen", LOOPBACK),
    }
    for what, args in attempts.items():
        second = run_p2pc(*args, timeout=60)
        assert second.returncode == NodeAlreadyRunning.exit_code, (what, second.returncode, second.stderr)
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, (what, second.stderr)
        running = node if what == "node" else boot
        assert f"pid {running.pid}" in lines[0] and "already runs" in lines[0], lines[0]
    # the first instances are untouched: they answer, keep their multiaddrs file, and the ledger reads
    assert p2pc_json("node", "status", "--data-dir", str(node.data_dir))["peer_id"] == node.peer_id
    assert (node.data_dir / "multiaddrs").exists() and (boot.data_dir / "multiaddrs").exists()
    assert p2pc_json("ledger", "verify", "--data-dir", str(node.data_dir))["ok"]
