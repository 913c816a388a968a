"""One node per data dir: an exclusive lock on `<data-dir>/node.lock`, which names the process holding it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from p2pcompute.errors import NodeAlreadyRunning
from p2pcompute.node import proctree

try:
    import fcntl
except ImportError:  # not POSIX: no lock, two instances are the owner's to avoid
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILENAME = "node.lock"
MAX_LOCK_FILE = 64  # bytes: "<pid> <start time>\n"


class InstanceLock:
    """`acquire()` takes the data dir's lock or raises `NodeAlreadyRunning` naming the holder; `release()`.

    A `flock` lock belongs to the open file, which the node's forked processes (the DHT process, averagers)
    share: while any of them runs, even after the main process died, the data dir stays locked. The file
    holds "<pid> <start time>" of the process that took the lock, so a refusal can say whether it runs."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILENAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "InstanceLock":
        if fcntl is None:
            logger.info("no instance lock on this platform: nothing stops a second node on %s", self.data_dir)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, MAX_LOCK_FILE, 0)
            os.close(fd)
            raise NodeAlreadyRunning(self._refusal(holder)) from None
        me = proctree.read(os.getpid())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {me.start if me else 0}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)  # unlocks the shared open file, whoever else still holds it
        os.close(self._fd)
        self._fd = None

    def _refusal(self, holder: bytes) -> str:
        try:
            pid, start = map(int, holder.split())
        except ValueError:  # written by nobody yet, or not by us
            return f"another node holds {self.path}; stop it before starting this one"
        if not proctree.supported():  # cannot tell whether it runs
            return f"another node holds {self.path} (pid {pid}); stop it before starting this one"
        running = proctree.read(pid)
        if running is not None and running.state != "Z" and start in (running.start, 0):
            return (f"this node already runs on {self.data_dir} (pid {pid}); stop it first "
                    f"(p2pc node stop --data-dir {self.data_dir})")
        return (f"{self.data_dir} is still locked by processes that node pid {pid} left when it died; "
                f"they should exit within seconds (list them with: fuser -v {self.path})")

    def __enter__(self) -> "InstanceLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
