"""Bounded waits: deadlines hold, failures back off instead of spinning."""

import pytest

from p2pcompute.retry import Timeout, poll_until, retry_until


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_poll_until_returns_the_first_truthy_value():
    clock = FakeClock()
    values = iter([0, None, 7])
    assert poll_until(lambda: next(values), 10, interval=1, clock=clock, sleep=clock.sleep) == 7
    assert clock.sleeps == [1, 1]


def test_poll_until_times_out_with_the_last_value():
    clock = FakeClock()
    with pytest.raises(Timeout, match="waiting for the answer; last value: 0"):
        poll_until(lambda: 0, 2.5, interval=1, what="the answer", clock=clock, sleep=clock.sleep)
    assert clock.now == 2.5  # never sleeps past the deadline


def test_retry_until_backs_off_on_fast_failures_instead_of_spinning():
    clock = FakeClock()
    calls = []

    def attempt(remaining):
        calls.append(remaining)
        raise ConnectionError("refused at once")

    failures = []
    assert retry_until(attempt, 5, on_failure=failures.append, clock=clock, sleep=clock.sleep) is None
    assert len(calls) == len(failures) <= 8  # 0.1 + 0.2 + 0.4 + 0.8 + 1 + 1 + 1 + 0.5: eight tries in 5 s
    assert clock.sleeps[:4] == [0.1, 0.2, 0.4, 0.8] and max(clock.sleeps) == 1.0
    assert clock.now == 5


def test_retry_until_returns_a_result_and_lets_other_errors_through():
    clock = FakeClock()
    results = iter([None, "state"])
    assert retry_until(lambda r: next(results), 5, clock=clock, sleep=clock.sleep) == "state"
    with pytest.raises(KeyError):
        retry_until(lambda r: {}["x"], 5, retry_on=(ConnectionError,), clock=clock, sleep=clock.sleep)
