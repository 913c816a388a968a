"""Logs a volunteer can read (issue 14): hivemind's expected conditions come out as one line at INFO (or not at
all), asyncio's teardown noise is hidden, real errors keep their tracebacks, and --debug shows everything."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A process of its own per case: logging is configured once per process, as in `p2pc`.
SCRIPT = textwrap.dedent('''
    import asyncio, io, logging, sys
    from p2pcompute import logs
    logs.configure(logging.WARNING, debug=sys.argv[1] == "debug")
    logs.set_level(getattr(logging, sys.argv[2]))
    from hivemind.averaging.averager import logger as averager_logger
    from hivemind.averaging.allreduce import AllreduceException
    try:
        raise AllreduceException("Averaging step failed: could not find a group")
    except AllreduceException as e:
        averager_logger.exception(e)  # what hivemind's averager does when a round finds no group
    averager_logger.warning("DecentralizedAverager caught AllreduceException('x'), retrying")
    averager_logger.info("Starting a new averaging round")
    logging.getLogger("asyncio").error("Task was destroyed but it is pending!\\ntask: <Task pending>")
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("p2pcompute.node").exception("a real bug")
    logging.getLogger("p2pcompute.node").info("joined a group of 3")
    from p2pcompute.training.observed import AveragingRound, log_round
    log_round(AveragingRound("gradients", False, (), {}, "AllreduceException('Averaging step failed: could not "
                                                          "find a group')"))
    log_round(AveragingRound("outer", True, (b"a", b"b", b"c"), {}))
    async def orphaned_store():  # hivemind's averager: create_task(wait_for(dht.store(...))), never awaited
        task = asyncio.get_running_loop().create_task(asyncio.wait_for(asyncio.sleep(1), 0.01))
        await asyncio.sleep(0.1)
        assert task.done()
    asyncio.run(orphaned_store())
    import gc; gc.collect()  # the task's exception is reported when it is collected
    averager_logger.info("Averager could not load state from peers: peer dict empty or corrupted {}")
''')


def logged(mode: str, level: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode, level], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_expected_conditions_are_one_line_and_bugs_keep_tracebacks():
    out = logged("plain", "INFO")
    # one line per round, from our observer; hivemind's own record of the failure is hidden
    assert out.count("could not find a group") == 1 and "gradients round failed: could not find a group in time" in out
    assert "outer round done in a group of 3" in out
    assert "AllreduceException" not in out and "retrying" not in out  # no traceback, no retry chatter
    assert "Task was destroyed" not in out and "Starting a new averaging round" not in out
    assert "joined a group of 3" in out
    assert "a real bug" in out and "ZeroDivisionError" in out and "Traceback" in out  # only the real bug's
    assert out.count("Traceback") == 1
    assert "a background DHT store timed out" in out and "never retrieved" not in out
    assert "no peer offers the run's state in the DHT" in out  # hivemind's INFO chatter, except what matters


def test_warning_level_hides_info_lines_and_debug_shows_everything():
    quiet = logged("plain", "WARNING")
    assert "could not find a group" not in quiet and "joined a group" not in quiet and "a real bug" in quiet
    loud = logged("debug", "WARNING")
    # the bug's, the group's, and the orphaned store's two (a TimeoutError raised from a CancelledError)
    assert loud.count("Traceback") == 4 and "never retrieved" in loud and "Task was destroyed" in loud and "Starting a new averaging round" in loud
