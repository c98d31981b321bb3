"""Wall-clock marks of a training loop: time to first step and steady-state throughput.

A GPU runs ahead of the host, so an honest time needs a device sync. The clock syncs
only at its marks (the end of step 1, the end of the warm-up steps, the end of the
loop): three syncs per run, none per step. The same clock times prefnb's loop and, in
`benchmarks/`, TRL's, so the two are measured the same way.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


def timing_warmup_steps(max_steps: int) -> int:
    """Steps left out of steady-state throughput (allocator, autotuning, compilation):
    a fifth of the run, at least 1 and at most 10."""
    return max(1, min(10, max_steps // 5))


def synchronize(device) -> None:
    """Wait for queued device work, so that the host clock covers it (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _Mark(NamedTuple):
    at: float        # time.perf_counter(), after a device sync
    step: int
    units: float     # tokens or examples seen so far
    excluded: float  # StepClock's excluded seconds so far


@dataclass
class StepClock:
    """Marks a loop's progress against the time it started.

    ``started`` is a ``time.perf_counter()`` value: when the run was asked for, so that
    ``first_step_seconds`` counts everything a user waits for before training begins.
    """

    device: object
    max_steps: int
    started: float = field(default_factory=time.perf_counter)
    first_step_seconds: float | None = None
    _excluded: float = 0.0  # seconds of work inside the loop that is not training
    _warm: _Mark | None = None
    _end: _Mark | None = None

    @property
    def warmup_steps(self) -> int:
        return timing_warmup_steps(self.max_steps)

    def wants_mark(self, step: int) -> bool:
        """Whether `step_done(step, ...)` syncs the device (step 1, and the end of the warm-up)."""
        return step == 1 or step == self.warmup_steps

    def step_done(self, step: int, units=None) -> None:
        """Call after optimiser step ``step`` (1-based). ``units`` (tokens or examples seen so
        far, a number or a device scalar) is read only at marks."""
        if not self.wants_mark(step):
            return
        mark = self._mark(step, units if step == self.warmup_steps else None)  # units are read at warm-up only
        if step == 1:
            self.first_step_seconds = mark.at - self.started
        if step == self.warmup_steps:
            self._warm = mark

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of in-loop work that is not training (an evaluation, a checkpoint
        write) out of the steady-state time. The caller syncs the device before timing it."""
        self._excluded += seconds

    def finish(self, step: int, units=None) -> None:
        """Call once after the last optimiser step."""
        self._end = self._mark(step, units)

    def _mark(self, step: int, units) -> _Mark:
        synchronize(self.device)
        return _Mark(time.perf_counter(), step, 0.0 if units is None else float(units), self._excluded)

    def summary(self) -> dict[str, float | int | None]:
        """first_step_seconds; steady_steps/seconds/units after the warm-up (None if the run
        was too short to have a steady part, or resumed past the warm-up)."""
        warm, end = self._warm, self._end
        steady = warm is not None and end is not None and end.step > warm.step
        return {
            "first_step_seconds": self.first_step_seconds,
            "steady_steps": end.step - warm.step if steady else None,
            "steady_seconds": end.at - warm.at - (end.excluded - warm.excluded) if steady else None,
            "steady_units": end.units - warm.units if steady else None,
        }


def reset_peak_memory(device) -> None:
    """Start a run's peak-memory count. Only CUDA's can be reset: a process's peak resident set
    size (CPU) counts from the process's start, whatever ran in it before."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def process_peak_rss_bytes() -> int:
    """Peak resident set size of the whole process since it started (interpreter and imports
    included; Linux reports kibibytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_memory_bytes(device, *, first_in_process: bool = True) -> int | None:
    """GPU: peak memory allocated by torch since :func:`reset_peak_memory`. CPU: the process's
    peak RSS when the process ran nothing else before (compare it between processes doing the
    same work), else None: a second run in one process (a sweep) would report the larger of its
    own peak and every earlier run's, so no number is better than a wrong one."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return process_peak_rss_bytes() if first_in_process else None

