"""Start Python subprocesses (`p2pc` nodes, workers) in a session of their own, wait for their ready file, stop by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from p2pcompute.errors import NodeProcessError
from p2pcompute.retry import Timeout, poll_until

READY_TIMEOUT = 60.0  # seconds for a node to come up on a loaded 2-core machine (normally ~2 s)
STOP_TIMEOUT = 15.0  # seconds for a clean shutdown before the process group is killed
READY_POLL = 0.05  # seconds between looks at the ready file
REAP_TIMEOUT = 5.0  # seconds to reap a process after its group was sent SIGKILL
LOG_TAIL_LINES = 30  # of the log, in error messages: enough to hold a Python traceback


class SessionProcess:
    """`[*prefix, python, *args]` in a session of its own, its output in `log_path`.

    The session makes the process and its children (a node's watchdog, DHT process, p2pd) one process group, so
    `kill()` removes them all by the group id of the PID we started (never by name); torch_shm_manager leaves the
    group and exits by itself once its clients are gone. A SIGKILL of `pid` alone is left to a node's watchdog.
    A process given a `ready_file` writes its multiaddrs there, one per line, once it is up (`wait_ready`)."""

    def __init__(self, args: Sequence[str], log_path: Path, *, ready_file: Path | None = None,
                 env: Mapping[str, str] | None = None, prefix: Sequence[str] = ()):
        self.args = list(args)
        self.log_path = Path(log_path)
        self.ready_file = ready_file
        self.env = dict(os.environ if env is None else env)
        self.prefix = list(prefix)  # before the interpreter, e.g. `ip netns exec NS`
        self.proc: subprocess.Popen | None = None
        self.maddrs: list[str] = []

    def __str__(self) -> str:
        return " ".join(self.args)

    def start(self) -> "SessionProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.prefix, sys.executable, *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> list[str]:
        """The multiaddrs in the ready file once it is complete (ends with a newline); a process that exits
        first, or is not ready in time (it is killed then), raises NodeProcessError."""
        def ready() -> list[str] | None:
            if self.ready_file.exists():
                text = self.ready_file.read_text()
                if text.endswith("\n"):
                    return [line for line in text.splitlines() if line]
            if self.proc.poll() is not None:
                raise NodeProcessError(f"{self} exited with {self.proc.returncode}: {self.log_tail()}")
            return None

        try:
            self.maddrs = poll_until(ready, timeout, interval=READY_POLL, what=f"{self.ready_file}")
        except Timeout:
            self.kill()
            raise NodeProcessError(f"{self} was not ready within {timeout:.0f} s: {self.log_tail()}") from None
        return self.maddrs

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the process still runs after `timeout` seconds (or never started)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal_group(self, signum: int) -> None:
        """Send `signum` to the whole process group (SIGSTOP/SIGCONT freeze and thaw the peer, p2pd included)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def terminate(self) -> None:
        """SIGTERM to the process itself: it shuts its children down cleanly (p2pd included)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (clean shutdown, p2pd included), then SIGKILL the group if it lingers."""
        if self.proc is None:
            return None
        self.terminate()
        self.wait(timeout)
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, as far as the swarm can tell)."""
        if self.proc is not None:
            self.signal_group(signal.SIGKILL)
            self.wait(REAP_TIMEOUT)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "SessionProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NodeProcess(SessionProcess):
    """`python -m MODULE <command> --data-dir D --ready-file F ...` (MODULE: the `p2pc` CLI unless given);
    its ready file and log lie beside the data dir (D.ready, D.log)."""

    def __init__(self, command: Sequence[str], data_dir: Path, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, module: str = "p2pcompute.cli.main",
                 prefix: Sequence[str] = ()):
        self.command = list(command)
        self.data_dir = Path(data_dir)
        ready_file = self.data_dir.parent / f"{self.data_dir.name}.ready"
        super().__init__(["-m", module, *self.command, "--data-dir", str(self.data_dir), "--ready-file",
                          str(ready_file), *extra_args], self.data_dir.parent / f"{self.data_dir.name}.log",
                         ready_file=ready_file, env=env, prefix=prefix)

    def __str__(self) -> str:
        return " ".join(self.command) or self.args[1]

    def start(self, wait: bool = True, timeout: float = READY_TIMEOUT) -> "NodeProcess":
        super().start()
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def peer_id(self) -> str:
        return self.maddrs[0].rsplit("/p2p/", 1)[1]

    def loopback_maddr(self) -> str:
        return next((a for a in self.maddrs if a.startswith("/ip4/127.")), self.maddrs[0])
