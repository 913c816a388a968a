"""The node's watchdog: a small process, started before anything else, that outlives the node's main process and
stops every process the node started (DHT process, p2pd, averagers, torch_shm_manager) when the main process dies,
however it dies (SIGKILL, the OOM killer, a crash).

    python -m p2pcompute.node.watchdog MAIN_PID    (run by `Watchdog.start()`; stdin is a pipe from MAIN_PID)

While the main process lives, the watchdog reads its descendants from /proc every SCAN_PERIOD and keeps each as
(PID, start time), also after it moves away from the main process (a process whose parent exits is moved to
init). When its parent changes, the main process is gone: the watchdog sends SIGTERM to every kept process that
still runs, and to children the main process started after the last scan (in its process group, moved where
the watchdog was moved), waits TERM_GRACE, sends SIGKILL to what is left and exits. Signals go by PID and start
time (through a pidfd), never by name, never to a process that merely reuses a PID. A line on the pipe stands it
down: the node stopped cleanly and its processes are gone.

Why not PR_SET_PDEATHSIG: we start none of these processes ourselves (hivemind forks the DHT process and the
averagers, the DHT process starts p2pd, torch starts torch_shm_manager, which leaves our session), the signal
is tied to the thread that forked rather than to the process (averagers fork from the training thread), and it
does not reach grandchildren such as p2pd. Linux only (/proc); elsewhere `Watchdog.start()` does nothing.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2pcompute.node import proctree

logger = logging.getLogger("p2pcompute.node.watchdog")  # by name: it also runs as __main__

SCAN_PERIOD = 0.5  # seconds between looks at the main process and reads of its descendants (a /proc walk, ~2 ms)
TERM_GRACE = 3.0  # seconds between SIGTERM and SIGKILL: p2pd closes its connections, torch_shm_manager its segments
EXIT_POLL = 0.05  # seconds between looks for processes that exited during the grace
STOP_TIMEOUT = 5.0  # seconds for the watchdog to exit once the node stands it down
STAND_DOWN = b"stand down\n"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the watchdog runs the same p2pcompute as the node


class Watchdog:
    """The watchdog of the calling process: `start()` before the process starts any other, `shutdown()` after
    it stopped them all (the watchdog then exits without touching anything). Also a context manager."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Watchdog":
        if not proctree.supported():
            logger.info("no watchdog: it reads /proc (Linux only); a killed node may leave processes behind")
            return self
        self.proc = subprocess.Popen([sys.executable, "-m", "p2pcompute.node.watchdog", str(os.getpid())],
                                     stdin=subprocess.PIPE, cwd=PACKAGE_ROOT)
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def shutdown(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(STAND_DOWN)
            self.proc.stdin.close()
        except OSError as e:  # it is gone already: nothing to stand down
            logger.warning("watchdog %d: %s", self.proc.pid, e)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("watchdog %d did not stand down within %.0f s; killing it", self.proc.pid, STOP_TIMEOUT)
            self.proc.kill()  # our own unreaped child: its PID cannot have been reused
            self.proc.wait(STOP_TIMEOUT)
        self.proc = None

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def watch(main_pid: int, control_fd: int) -> None:
    """The watchdog's loop: returns when stood down (a line on `control_fd`, or the pipe closed while the main
    process lives), or after stopping everything the main process left when it died."""
    me = os.getpid()
    main = proctree.read(main_pid)
    kept: dict[tuple[int, int], proctree.ProcessRecord] = {}
    since = proctree.clock_ticks_now()
    while os.getppid() == main_pid:
        since = proctree.clock_ticks_now()  # before the walk: a process born after it is caught below by age
        processes = proctree.table()
        kept = {key: r for key, r in kept.items() if proctree.is_running(r, processes)}
        kept.update((r.key, r) for r in proctree.descendants(main_pid, processes) if r.pid != me)
        readable, _, _ = select.select([control_fd], [], [], SCAN_PERIOD)
        if readable and (os.read(control_fd, len(STAND_DOWN)) or os.getppid() == main_pid):
            return
    left = left_behind(main, list(kept.values()), since - os.sysconf("SC_CLK_TCK") // 10, me)
    logger.warning("node process %d died; stopping the %d processes it left: %s", main_pid, len(left),
                   ", ".join(f"{r.pid} {r.name}" for r in left) or "none")
    stop(left, TERM_GRACE)


def left_behind(main: proctree.ProcessRecord | None, kept: list[proctree.ProcessRecord], since: int,
                me: int) -> list[proctree.ProcessRecord]:
    """What still runs of the dead main process's processes: the `kept` ones, the children it started at or
    after clock tick `since` (moved, like the watchdog, to the nearest reaper, and in its process group), and
    every descendant of those."""
    processes = proctree.table()
    found = {r.key: r for r in kept if proctree.is_running(r, processes)}
    if main is not None:
        reaper = os.getppid()
        found.update((r.key, r) for r in processes.values()
                     if r.ppid == reaper and r.pgid == main.pgid and r.start >= since and r.state != "Z")
    for record in list(found.values()):
        found.update((r.key, r) for r in proctree.descendants(record.pid, processes) if r.state != "Z")
    return [r for r in found.values() if r.pid != me]


def stop(records: list[proctree.ProcessRecord], grace: float) -> None:
    """SIGTERM every process of `records`, SIGKILL those (and any child they started meanwhile) still running
    after `grace` seconds."""
    for record in records:
        _signal(record, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(proctree.is_running(r) for r in records):
        time.sleep(EXIT_POLL)
    processes = proctree.table()
    late = [d for r in records if proctree.is_running(r, processes) for d in proctree.descendants(r.pid, processes)]
    for record in records + late:
        _signal(record, signal.SIGKILL)


def _signal(record: proctree.ProcessRecord, signum: int) -> None:
    try:
        proctree.send_signal(record, signum)
    except PermissionError:
        logger.warning("not allowed to signal %d %s", record.pid, record.name)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m p2pcompute.node.watchdog MAIN_PID", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGHUP):  # Ctrl-C and a closed terminal are the node's to handle
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    watch(int(args[0]), sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
