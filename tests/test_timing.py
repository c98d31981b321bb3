"""The loop clock: marks only at step 1, the warm-up step and the end."""

import pytest

from prefnb.timing import StepClock, timing_warmup_steps


def test_warmup_is_a_fifth_of_the_run_between_1_and_10():
    assert [timing_warmup_steps(n) for n in (1, 4, 5, 16, 50, 1000)] == [1, 1, 1, 3, 10, 10]


def test_clock_reports_first_step_and_steady_throughput(monkeypatch):
    now = iter([10.0, 12.0, 20.0]).__next__  # step 1 at 10 s, warm-up (step 2) at 12 s, end at 20 s
    monkeypatch.setattr("prefnb.timing.time.perf_counter", lambda: now())
    clock = StepClock("cpu", max_steps=10, started=4.0)
    assert clock.warmup_steps == 2 and [s for s in range(1, 11) if clock.wants_mark(s)] == [1, 2]
    for step in range(1, 11):
        clock.step_done(step, units=100 * step)  # 100 tokens a step; read only at marks
    clock.finish(10, units=1000)
    assert clock.summary() == pytest.approx({"first_step_seconds": 6.0, "steady_steps": 8, "steady_seconds": 8.0,
                                             "steady_units": 800.0})


def test_a_run_without_a_steady_part_reports_none():
    clock = StepClock("cpu", max_steps=1)
    clock.step_done(1, units=5)
    clock.finish(1, units=5)
    summary = clock.summary()
    assert summary["first_step_seconds"] > 0 and summary["steady_seconds"] is None
