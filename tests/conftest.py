"""Shared fixtures: real `p2pc` subprocesses on 127.0.0.1, polled with deadlines, killed by PID group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pcompute.devtools.corpora import train_tokenizer  # noqa: F401 (tests import it from here)
from p2pcompute.node.launcher import NodeProcess
from p2pcompute.retry import Timeout, poll_until

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
TEST_RECORD_TTL = "6"  # seconds: short so that a killed node vanishes quickly in tests


def run_p2pc(*args: str, timeout: float = 60, env: dict | None = None, check: bool = False
             ) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess; returns the completed process (stdout/stderr as text)."""
    proc = subprocess.run([sys.executable, "-m", "p2pcompute.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"p2pc {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def p2pc_json(*args: str, timeout: float = 60):
    proc = run_p2pc(*args, "--json", timeout=timeout, check=True)
    return json.loads(proc.stdout)


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition", explain=None):
    """`p2pcompute.retry.poll_until`, failing the test (AssertionError) at the deadline; `explain()`, if given, adds
    what the test knows at that moment (e.g. the nodes' own account of it, `credit_story`) to the message."""
    try:
        return poll_until(predicate, timeout, interval=interval, what=what)
    except Timeout as e:
        raise AssertionError(f"{e}\n{explain()}" if explain is not None else str(e)) from None


# what a node logs about its rounds and its claims' way to a payout (services/credits.py, services/audits.py,
# training/observed.py): enough to tell an unpaid epoch's story from a failed test's message alone
CREDIT_LOG_NEEDLES = ("round done", "round failed", "state download", "skipping", "claiming epoch", "payout for epoch",
                      "paid for epoch", "giving up", "audit of epoch", "not witnessing", "last witness", "no start state",
                      "cannot audit", "recording the audit", "banning")


def credit_story(logs, lines_per_log: int = 80) -> str:
    """The last `lines_per_log` credit-related lines of each log in `logs` (name -> path), for failure messages."""
    parts = []
    for name, path in logs.items():
        try:
            text = Path(path).read_text(errors="replace")
        except OSError as e:
            parts.append(f"--- {name}: unreadable ({e})")
            continue
        hits = [line for line in text.splitlines() if any(n in line for n in CREDIT_LOG_NEEDLES)]
        parts.append(f"--- {name} ({len(hits)} credit lines, last {min(len(hits), lines_per_log)}):")
        parts.extend(hits[-lines_per_log:])
    return "\n".join(parts)


def wait_for_evals(run_id: str, data_dir: Path, epochs: int, timeout: float) -> dict:
    """`p2pc run status --json` once both peers evaluated the last epoch (each does as it reaches max_epochs); the
    last status seen is printed either way. Progress records live 30 s: call it while the run still trains."""
    seen = {}

    def evaluated_by_both():
        seen["status"] = status = p2pc_json("run", "status", run_id, "--data-dir", str(data_dir))
        return len(status["evals"]) > epochs and status["evals"][-1]["peers"] == 2

    try:
        wait_until(evaluated_by_both, timeout, interval=2, what="both peers to evaluate the last epoch")
    finally:
        print("last run status:", seen.get("status"))
    return seen["status"]


def peer_ids_seen_by(data_dir: Path) -> set[str]:
    return {p["peer_id"] for p in p2pc_json("peers", "--data-dir", str(data_dir))}


class Swarm:
    """A bootstrap peer and nodes, all real subprocesses; stop() kills every one of them."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[NodeProcess] = []
        self.bootstrap: NodeProcess | None = None

    def start_bootstrap(self) -> NodeProcess:
        self.bootstrap = self._spawn(["bootstrap"], "bootstrap", ["--listen", LOOPBACK])
        return self.bootstrap

    def start_node(self, name: str, *extra: str, wait: bool = True, module: str = "p2pcompute.cli.main"
                   ) -> NodeProcess:
        """`module`: the CLI to run; a test-only variant lives in tests/ (e.g. cheat_node), which is then put on the
        node's PYTHONPATH."""
        args = ["--listen", LOOPBACK, "--bootstrap", self.bootstrap.loopback_maddr(), "--record-ttl", TEST_RECORD_TTL,
                "--name", name, *extra]
        return self._spawn(["node", "start"], name, args, wait=wait, module=module)

    def _spawn(self, command, name, args, wait: bool = True, module: str = "p2pcompute.cli.main") -> NodeProcess:
        env = None
        if not module.startswith("p2pcompute."):
            path = [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        proc = NodeProcess(command, self.root / name, args, module=module, env=env)
        self.procs.append(proc)
        return proc.start(wait=wait)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)


@pytest.fixture(scope="session")
def swarm(tmp_path_factory):
    """One bootstrap and three nodes shared by every test that only reads from the swarm."""
    s = Swarm(tmp_path_factory.mktemp("swarm"))
    try:
        s.start_bootstrap()
        s.nodes = [s.start_node(f"node{i}", "--no-train") for i in range(3)]
        yield s
    finally:
        s.stop()


@pytest.fixture
def own_swarm(tmp_path):
    """A swarm for tests that break things (kill nodes, inject bad records)."""
    s = Swarm(tmp_path)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True, scope="session")
def _quiet_p2pd():
    os.environ.setdefault("GOLOG_LOG_LEVEL", "fatal")
    yield
