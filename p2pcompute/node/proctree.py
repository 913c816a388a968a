"""The Linux process table under /proc: a process's descendants as (pid, start time) records, and signals that
cannot reach a process the kernel started later under a reused PID.

Linux only: elsewhere `supported()` is False and the table is empty."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal

PROC = "/proc"  # plain strings and open(): a watchdog walks the whole table twice a second, pathlib doubles its cost


@dataclasses.dataclass(frozen=True)
class ProcessRecord:
    """One process as /proc/<pid>/stat shows it. `pid` and `start` together name it: a PID can be reused, a
    (PID, start time) pair cannot (start is in clock ticks since boot, field 22 of stat)."""

    pid: int
    start: int
    ppid: int
    pgid: int
    name: str  # the kernel's comm: the executable's name cut to 15 characters
    state: str  # R, S, D, ... ; Z for a zombie (exited, not yet reaped: no longer running)

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start


def supported() -> bool:
    return os.path.exists(f"{PROC}/self/stat")


def read(pid: int) -> ProcessRecord | None:
    """The process `pid` now, or None if there is none (or /proc cannot be read)."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")"
    name = raw[raw.index(b"(") + 1:raw.rindex(b")")].decode(errors="replace")
    fields = raw[raw.rindex(b")") + 2:].split()
    return ProcessRecord(pid=pid, start=int(fields[19]), ppid=int(fields[1]), pgid=int(fields[2]), name=name,
                         state=fields[0].decode())


def table() -> dict[int, ProcessRecord]:
    """Every process now, by PID (processes that exit while the table is read are left out)."""
    if not supported():
        return {}
    records = (read(int(name)) for name in os.listdir(PROC) if name.isdigit())
    return {r.pid: r for r in records if r is not None}


def descendants(pid: int, processes: dict[int, ProcessRecord] | None = None) -> list[ProcessRecord]:
    """Every process below `pid` (children, their children, ...) in `processes` (default: the table now)."""
    processes = table() if processes is None else processes
    children: dict[int, list[ProcessRecord]] = {}
    for record in processes.values():
        children.setdefault(record.ppid, []).append(record)
    found, frontier = [], [pid]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += [r.pid for r in below]
    return found


def is_running(record: ProcessRecord, processes: dict[int, ProcessRecord] | None = None) -> bool:
    """Whether the very process `record` names still runs (a zombie does not; a reused PID is another process)."""
    now = read(record.pid) if processes is None else processes.get(record.pid)
    return now is not None and now.start == record.start and now.state != "Z"


def clock_ticks_now() -> int:
    """Clock ticks since boot, the unit of `ProcessRecord.start` (0 where /proc/uptime cannot be read)."""
    try:
        with open(f"{PROC}/uptime") as uptime_file:
            uptime = float(uptime_file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return int(uptime * os.sysconf("SC_CLK_TCK"))


def send_signal(record: ProcessRecord, signum: int) -> bool:
    """Send `signum` to the process `record` names, never to a later process under the same PID.

    Through a pidfd (Linux 5.3+): it is opened first, then the start time checked, so the fd is known to name
    our process when the signal goes. Without pidfds, a plain kill right after the check. False if it is gone."""
    try:
        pidfd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfd_open here: check, then kill by PID
        pidfd = None
    try:
        if not is_running(record):
            return False
        if pidfd is None:
            os.kill(record.pid, signum)
        else:
            signal.pidfd_send_signal(pidfd, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        if pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(pidfd)
