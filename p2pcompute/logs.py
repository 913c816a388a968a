"""Logs a volunteer can read: one format for ours, hivemind's and asyncio's records, and expected conditions
inside hivemind (a round that found no group, a peer that left mid-round, asyncio's teardown noise) told in one
line, or only with --debug, instead of as tracebacks. Tracebacks stay for what is not expected: real bugs."""

from __future__ import annotations

import logging
import os
from typing import Optional

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (logger name prefix, text in the message or the exception, or several texts that must all be there) -> the one line
# a volunteer reads (None: DEBUG only).
# Each is a normal event of a swarm on the internet, not a bug; the original record stays visible with --debug.
EXPECTED = (
    ("hivemind", "could not find a group", None),  # our round observer logs each round's outcome once
    ("hivemind", "MatchmakingException", "averaging round failed: matchmaking was interrupted"),
    ("hivemind", "did not finish", "averaging round did not finish with every group mate (a peer left or lagged)"),
    ("hivemind", "Failed to download state from", "state download from one peer failed; trying others"),
    ("hivemind", "Failed to load state from peers", "state download failed; retrying"),
    ("hivemind", "could not load state from peers", "no peer offers the run's state in the DHT"),
    ("hivemind", "did not send its state", "a peer offering the run's state sent none (it stopped sharing)"),
    ("hivemind", "Cancelled scheduled state averaging round", None),
    ("hivemind", "wait_for_trigger raised exception", None),
    ("hivemind", "Trigger is already set", None),  # hivemind triggering a round our stop cancelled (interrupt)
    ("hivemind", "caught ", None),  # "<Averager> caught AllreduceException(...), retrying": hivemind retries
    ("hivemind", "CancelledError", None),
    ("hivemind", "GeneratorExit", None),
    ("asyncio", "Task was destroyed but it is pending", None),
    ("asyncio", "aclose(): asynchronous generator is already running", None),
    ("asyncio", "GeneratorExit", None),
    # hivemind's averagers declare themselves in the DHT from tasks nobody awaits
    # (`create_task(wait_for(dht.store(...)))`); on a loaded machine or with a peer cut off, a store outlives its
    # expiration and asyncio reports the orphaned TimeoutError with a traceback
    ("asyncio", ("Task exception was never retrieved", "coro=<wait_for()", "exception=TimeoutError()"),
     "a background DHT store timed out (a peer did not answer in time)"),
)


def _text_of(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        text += f" {type(exc).__name__}: {exc}"
    return text


def _contains(text: str, needles: str | tuple[str, ...]) -> bool:
    return all(needle in text for needle in ((needles,) if isinstance(needles, str) else needles))


class ReadableLogs(logging.Filter):
    """Rewrites expected library conditions into one line at INFO (or drops them below the chosen level);
    with `debug`, lets every record through unchanged."""

    def __init__(self, level: int, debug: bool):
        super().__init__()
        self.level, self.debug = level, debug

    def filter(self, record: logging.LogRecord) -> bool:
        if self.debug:
            return True
        for prefix, needles, line in EXPECTED:
            if record.name.startswith(prefix) and _contains(_text_of(record), needles):
                if line is None or logging.INFO < self.level:
                    return False
                record.msg, record.args = line, ()
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.exc_info, record.exc_text, record.stack_info = None, None, None
                return True
        if record.name.startswith("hivemind") and record.levelno < logging.WARNING:
            return False  # the library's progress chatter: --debug shows it
        return record.levelno >= self.level


def configure(level: int = logging.WARNING, debug: bool = False, stream: Optional[object] = None) -> None:
    """Route hivemind's loggers through the root logger (not hivemind's own handler) and install one handler
    with our format and the ReadableLogs filter. Call once per process, before hivemind logs anything."""
    from hivemind.utils.logging import use_hivemind_log_handler

    os.environ.setdefault("HIVEMIND_LOGLEVEL", "DEBUG" if debug else "INFO")
    os.environ.setdefault("GOLOG_LOG_LEVEL", "debug" if debug else "fatal")
    use_hivemind_log_handler("nowhere")  # hivemind's records propagate to the root logger, as ours do
    effective = logging.DEBUG if debug else level
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(ReadableLogs(effective, debug))
    root.addHandler(handler)
    # hivemind's rewritten lines are INFO: let its records reach the filter, which decides
    root.setLevel(min(effective, logging.INFO))
    logging.getLogger("hivemind").setLevel(logging.DEBUG if debug else logging.INFO)


def set_level(level: int) -> None:
    """Change the level of the handler `configure` installed (e.g. INFO for a running node); --debug wins."""
    for handler in logging.getLogger().handlers:
        for flt in handler.filters:
            if isinstance(flt, ReadableLogs) and not flt.debug:
                flt.level = level
    root = logging.getLogger()
    root.setLevel(min(root.level, level))
