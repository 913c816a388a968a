"""Bounded waiting: poll a condition until a deadline, retry an attempt with backoff until a deadline.

The one place these loops are written (tests, scripts, the trainer's state downloads): every wait has a
deadline, and a retry that fails fast still sleeps between attempts instead of spinning until its deadline.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple, Type, TypeVar

T = TypeVar("T")

INITIAL_DELAY = 0.1  # seconds before the second attempt; doubles up to MAX_DELAY
MAX_DELAY = 1.0  # a retry never waits longer than this between attempts (a deadline is usually a few seconds)


class Timeout(Exception):
    """A bounded wait ran out; the message says what was awaited and the last value seen."""


def poll_until(predicate: Callable[[], T], timeout: float, *, interval: float = 0.5, what: str = "condition",
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `predicate` until it returns a truthy value (returned) or `timeout` seconds pass (`Timeout`)."""
    deadline = clock() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        remaining = deadline - clock()
        if remaining <= 0:
            raise Timeout(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")
        sleep(min(interval, remaining))


def retry_until(attempt: Callable[[float], Optional[T]], timeout: float, *,
                retry_on: Tuple[Type[BaseException], ...] = (Exception,),
                on_failure: Callable[[BaseException], None] = lambda e: None,
                initial_delay: float = INITIAL_DELAY, max_delay: float = MAX_DELAY,
                clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
                ) -> Optional[T]:
    """Call `attempt(remaining_seconds)` until it returns a value that is not None, or the deadline passes.

    An exception in `retry_on` (reported to `on_failure`) or a None result means "try again", after a delay
    that starts at `initial_delay` and doubles up to `max_delay`, never past the deadline. Returns None when
    the deadline passed without a result; other exceptions propagate."""
    deadline = clock() + timeout
    delay = initial_delay
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        try:
            result = attempt(remaining)
        except retry_on as e:
            on_failure(e)
            result = None
        if result is not None:
            return result
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        sleep(min(delay, remaining))
        delay = min(max_delay, delay * 2)
