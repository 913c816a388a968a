"""Peer processes for tests and benchmarks: groups of subprocesses killed by PID, file rendezvous with deadlines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

from p2pcompute.node.launcher import NodeProcess, SessionProcess
from p2pcompute.retry import poll_until

FILE_TIMEOUT = 90.0  # a file another peer writes (a bootstrap address, a barrier) on a loaded 2-core box
FILE_POLL = 0.05  # seconds between looks for such a file
STOP_GRACE = 10.0  # seconds a group's processes get to exit after SIGTERM before their groups are killed
LOOPBACK_HOST = "127.0.0.1"
WORKER_MODULE = "p2pcompute.training.worker"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` so that a reader sees the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for_file(path: Path, timeout: float = FILE_TIMEOUT) -> str:
    """The text of `path` once it exists (written with write_atomic); `p2pcompute.retry.Timeout` at the deadline."""
    poll_until(path.exists, timeout, interval=FILE_POLL, what=str(path))
    return path.read_text()


def barrier(directory: Path, name: str, rank: int, peers: int, timeout: float = FILE_TIMEOUT) -> None:
    """Every one of `peers` processes reaches `name` before any goes on (a file per peer in `directory`);
    `timeout` bounds the wait for each other peer."""
    write_atomic(directory / f"barrier-{name}-{rank}", "")
    for other in range(peers):
        wait_for_file(directory / f"barrier-{name}-{other}", timeout)


def join_dht(directory: Path, rank: int, host: str = LOOPBACK_HOST, timeout: float = FILE_TIMEOUT):
    """A hivemind DHT on `host` without relays or NAT traversal: peer 0 writes its multiaddrs to DIR/boot,
    the others wait for that file and bootstrap from it. `timeout` bounds both the wait and the DHT's start."""
    import hivemind

    boot = directory / "boot"
    initial = [] if rank == 0 else wait_for_file(boot, timeout).split()
    dht = hivemind.DHT(start=True, initial_peers=initial or None, host_maddrs=[f"/ip4/{host}/tcp/0"],
                       use_relay=False, use_auto_relay=False, auto_nat=False, nat_port_map=False,
                       startup_timeout=timeout)
    if rank == 0:
        write_atomic(boot, "\n".join(map(str, dht.get_visible_maddrs())))
    return dht


class TrainerWorker(NodeProcess):
    """`python -m p2pcompute.training.worker`: one peer training the run of `spec`, its data dir ROOT/NAME,
    its ready file, log and JSON status file beside it (NAME.ready, NAME.log, NAME.json)."""

    def __init__(self, root: Path, name: str, spec: Path, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, prefix: Sequence[str] = ()):
        self.name = name
        self.status_file = root / f"{name}.json"
        super().__init__([], root / name, ["--manifest", str(spec), "--status-file", str(self.status_file), *args],
                         env=env, module=WORKER_MODULE, prefix=prefix)

    def status(self) -> dict:
        """The worker's last status (rewritten every second), {} before its first."""
        try:
            return json.loads(self.status_file.read_text())
        except FileNotFoundError:
            return {}

    def epoch(self) -> int:
        return self.status().get("epoch", -1)


class PeerGroup:
    """The peer processes of one test or measurement, their logs in one directory; leaving the `with` block
    (or `stop()`) stops every one of them and kills each one's process group."""

    def __init__(self, directory: Path, grace: float = STOP_GRACE):
        self.directory = Path(directory)
        self.grace = grace
        self.procs: list[SessionProcess] = []

    def start(self, args: Sequence[str], *, log: str, ready_file: Path | None = None, prefix: Sequence[str] = (),
              env: Mapping[str, str] | None = None) -> SessionProcess:
        """Start `[*prefix, python, *args]` (env: added to this process's), its output in the file DIR/LOG."""
        return self.add(SessionProcess(args, self.directory / log, ready_file=ready_file, prefix=prefix,
                                       env={**os.environ, **(env or {})}).start())

    def add(self, proc: SessionProcess) -> SessionProcess:
        """Stop `proc` with the others (it is started by the caller)."""
        self.procs.append(proc)
        return proc

    def finish(self, timeout: float) -> list[int | None]:
        """Each process's exit status once all have exited; None for one still running at the deadline."""
        deadline = time.monotonic() + timeout
        return [proc.wait(max(0.1, deadline - time.monotonic())) for proc in self.procs]

    def stop(self) -> None:
        """SIGTERM every process still running, give them `grace` seconds together, then kill every group
        (a group outlives its leader when a child, p2pd or an averager, lingers)."""
        for proc in self.procs:
            proc.terminate()
        deadline = time.monotonic() + self.grace
        for proc in self.procs:
            proc.wait(max(0.0, deadline - time.monotonic()))
            proc.kill()

    def __enter__(self) -> "PeerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
