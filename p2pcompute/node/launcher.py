"""Start `p2pc` nodes as subprocesses (own session), wait for their ready file, stop them by PID: demo and tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from p2pcompute.errors import NodeProcessError

READY_TIMEOUT = 60.0  # seconds for a node to come up on a loaded 2-core machine (normally ~2 s)
STOP_TIMEOUT = 15.0  # seconds for a clean shutdown before the process group is killed


class NodeProcess:
    """One `p2pc <command> --data-dir D ... --ready-file F` subprocess in a session of its own.

    The session makes the node, its watchdog, its DHT process and p2pd one process group, so `kill()` removes
    them all by the group id of the PID we started (never by name); torch_shm_manager leaves the group and
    exits by itself once its clients are gone. A SIGKILL of `pid` alone is left to the node's watchdog."""

    def __init__(self, command: Sequence[str], data_dir: Path, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None):
        self.command = list(command)
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)
        self.env = dict(os.environ if env is None else env)
        self.ready_file = self.data_dir.parent / f"{self.data_dir.name}.ready"
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen | None = None
        self.maddrs: list[str] = []

    def start(self, wait: bool = True, timeout: float = READY_TIMEOUT) -> "NodeProcess":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()
        args = [sys.executable, "-m", "p2pcompute.cli.main", *self.command, "--data-dir", str(self.data_dir),
                "--ready-file", str(self.ready_file), *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                text = self.ready_file.read_text()
                if text.endswith("\n"):
                    self.maddrs = [line for line in text.splitlines() if line]
                    return self.maddrs
            if self.proc.poll() is not None:
                raise NodeProcessError(f"{' '.join(self.command)} exited with {self.proc.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        self.kill()
        raise NodeProcessError(f"{' '.join(self.command)} was not ready within {timeout:.0f} s: {self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def peer_id(self) -> str:
        return self.maddrs[0].rsplit("/p2p/", 1)[1]

    def loopback_maddr(self) -> str:
        return next((a for a in self.maddrs if a.startswith("/ip4/127.")), self.maddrs[0])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (clean shutdown, p2pd included), then SIGKILL the group if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, as far as the swarm can tell)."""
        if self.proc is not None:
            self._kill_group()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
