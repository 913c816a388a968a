"""Shared fixtures: real `p2pc` subprocesses on 127.0.0.1, polled with deadlines, killed by PID group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """`p2pcompute.retry.poll_until`, failing the test (AssertionError) at the deadline."""
    try:
        return poll_until(predicate, timeout, interval=interval, what=what)
    except Timeout as e:
        raise AssertionError(str(e)) from None


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

    def start_node(self, name: str, *extra: str, wait: bool = True) -> NodeProcess:
        args = ["--listen", LOOPBACK, "--bootstrap", self.bootstrap.loopback_maddr(), "--record-ttl", TEST_RECORD_TTL,
                "--name", name, *extra]
        return self._spawn(["node", "start"], name, args, wait=wait)

    def _spawn(self, command, name, args, wait: bool = True) -> NodeProcess:
        proc = NodeProcess(command, self.root / name, args)
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


def train_tokenizer(texts: list[str], path: Path, vocab_size: int) -> str:
    """A byte-level BPE tokenizer.json trained here on `texts` (nothing downloaded); returns its sha256 hex."""
    import hashlib

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()
