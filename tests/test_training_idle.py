"""Idle policy: pure decisions over synthetic GPU readings and schedule windows; the watcher drives a trainer."""

from __future__ import annotations

import pytest

from p2pcompute.errors import ConfigError
from p2pcompute.training.idle import Decision, GpuReading, IdlePolicy, IdleState, Window, advance, assess, \
    parse_schedule, pick_reading
from p2pcompute.training.nvml import IdleWatcher, read_gpus

GIB = 2**30


def minute(hhmm: str) -> int:
    h, m = map(int, hhmm.split(":"))
    return h * 60 + m


def test_parse_schedule():
    assert parse_schedule("") == ()
    assert parse_schedule("22:00-07:00, 12:30-13:00") == (Window(1320, 420), Window(750, 780))
    for bad in ("22-07", "25:00-01:00", "10:00-10:00", "10:00"):
        with pytest.raises(ConfigError, match="schedule"):
            parse_schedule(bad)


@pytest.mark.parametrize("now, inside", [("22:00", True), ("23:59", True), ("03:00", True), ("06:59", True),
                                         ("07:00", False), ("12:00", False), ("21:59", False)])
def test_window_wraps_midnight(now, inside):
    assert Window(minute("22:00"), minute("07:00")).contains(minute(now)) is inside


def test_schedule_pauses_outside_windows():
    policy = IdlePolicy(schedule=parse_schedule("22:00-07:00"))
    decision = assess(policy, None, minute("12:00"), training=True)
    assert not decision.train and "schedule" in decision.reason
    assert assess(policy, None, minute("23:00"), training=True).train


def test_cpu_only_trains_any_time_without_a_schedule():
    assert assess(IdlePolicy(), None, minute("12:00"), training=True) == Decision(True, "no GPU to watch: schedule only")


def test_owner_using_the_gpu_pauses():
    policy = IdlePolicy(max_other_utilization=10)
    busy = GpuReading(0, utilization=55, memory_total=8 * GIB, memory_used=GIB)
    decision = assess(policy, busy, 0, training=False)
    assert not decision.train and "55% used by other processes" in decision.reason
    idle = GpuReading(0, utilization=3, memory_total=8 * GIB, memory_used=GIB // 4)
    assert assess(policy, idle, 0, training=False).train


def test_our_own_load_is_not_mistaken_for_the_owners():
    policy = IdlePolicy(max_other_utilization=10)
    ours = GpuReading(0, utilization=97, memory_total=8 * GIB, memory_used=5 * GIB, memory_ours=5 * GIB)
    assert assess(policy, ours, 0, training=True).train  # no per-process numbers: memory decides
    with_samples = GpuReading(0, 97, 8 * GIB, 5 * GIB, 5 * GIB, utilization_ours=60)
    decision = assess(policy, with_samples, 0, training=True)
    assert not decision.train and "37%" in decision.reason


def test_memory_held_by_others_beyond_our_cap_pauses():
    policy = IdlePolicy(max_memory_fraction=0.75)  # others may hold up to 2 GiB of 8
    game = GpuReading(0, utilization=0, memory_total=8 * GIB, memory_used=7 * GIB, memory_ours=4 * GIB)
    decision = assess(policy, game, 0, training=True)
    assert not decision.train and "3072 MiB" in decision.reason
    desktop = GpuReading(0, utilization=0, memory_total=8 * GIB, memory_used=5 * GIB, memory_ours=4 * GIB)
    assert assess(policy, desktop, 0, training=True).train


def test_hysteresis_pauses_at_once_and_resumes_after_idle_period():
    policy = IdlePolicy(resume_after=60)
    busy, idle = Decision(False, "busy"), Decision(True, "idle")
    state, decision = advance(policy, IdleState(training=True), busy, now=0)
    assert not state.training and decision == busy
    state, decision = advance(policy, state, idle, now=10)
    assert not decision.train and "0 s so far" in decision.reason
    state, decision = advance(policy, state, idle, now=50)
    assert not decision.train and "40 s so far" in decision.reason
    state, _ = advance(policy, state, busy, now=55)  # the owner is back: the idle clock restarts
    state, _ = advance(policy, state, idle, now=60)
    state, decision = advance(policy, state, idle, now=100)
    assert not decision.train
    state, decision = advance(policy, state, idle, now=120)
    assert state.training and decision.train and "idle for 60 s" in decision.reason


def test_pick_reading():
    readings = [GpuReading(0, 1, 1, 0), GpuReading(1, 2, 1, 0)]
    assert pick_reading(readings, 1).utilization == 2
    assert pick_reading(None, 0) is None and pick_reading(readings, 5) is None


def test_read_gpus_without_nvml_or_gpu_is_none():
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert read_gpus({1}) is None
        return
    readings = read_gpus({1})
    assert readings is None or all(r.memory_total > 0 for r in readings)


class RecordingTrainer:
    """Records the calls the watcher makes (the real Trainer's pause/resume are covered in test_training_trainer)."""

    def __init__(self):
        self.calls = []

    def pause(self, reason):
        self.calls.append(("pause", reason))

    def resume(self):
        self.calls.append(("resume",))


def test_watcher_pauses_and_resumes_the_trainer_from_readings():
    readings = {"now": [GpuReading(0, 80, 8 * GIB, GIB // 8, utilization_ours=0)]}
    clock = {"t": 0.0}
    trainer = RecordingTrainer()
    watcher = IdleWatcher(trainer, IdlePolicy(resume_after=30), gpu_index=0, read=lambda: readings["now"],
                          clock=lambda: clock["t"], minute_of_day=lambda: 0)
    assert not watcher.check().train and trainer.calls == [("pause", "GPU 0 busy: 80% used by other processes "
                                                                     "(limit 10%)")]
    readings["now"] = [GpuReading(0, 2, 8 * GIB, GIB // 8)]
    clock["t"] = 10
    watcher.check()
    clock["t"] = 41
    assert watcher.check().train and trainer.calls[-1] == ("resume",)
    assert len(trainer.calls) == 2
