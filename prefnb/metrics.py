"""The metrics: one table of every metric's label, format and direction, and each task's key metric.

A metric's name says its split (DESIGN.md, Splits); the table is keyed by the name after the
split (``eval/…`` picks a run's best checkpoint and a grid's best cell); costs have no split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    label: str
    format: str = ".3f"
    higher_is_better: bool = True


QUALITY = {
    "accuracy": Metric("accuracy"),
    "f1": Metric("F1"),
    "chrf": Metric("chrF", ".1f"),
    "chrf_full": Metric("chrF (whole sonnet)", ".1f"),
    "chrf_sampled": Metric("chrF (sampled)", ".1f"),
    "chrf_full_sampled": Metric("chrF (whole sonnet, sampled)", ".1f"),
    "implicit_reward_accuracy": Metric("implicit-reward acc."),
    "implicit_reward_accuracy_total": Metric("implicit-reward acc. vs base model"),
    "loss": Metric("held-out NLL", higher_is_better=False),
    "majority_accuracy": Metric("majority-class accuracy"),
    "majority_f1": Metric("majority-class F1"),
}
SPLITS = {"eval": "selection", "test": "test"}
COSTS = {
    "train/seconds": Metric("train time (s)", ".1f", higher_is_better=False),
    "train/tokens_per_second": Metric("tokens/s", ".0f"),
    "peak_memory_mib": Metric("peak memory (MiB)", ".0f", higher_is_better=False),
}
# The metric that picks a run's best checkpoint (eval/) and sums the run up (test/), per study task.
TASK_KEY = {"paraphrase": "accuracy", "sonnets": "chrf"}
TASK_METRIC = {task: f"test/{name}" for task, name in TASK_KEY.items()}


def key_metric(task: str, preference: bool) -> str:
    """The selection-split metric of a run: its task's, else (a JSONL task) implicit-reward
    accuracy for a preference run and the held-out NLL for an SFT run."""
    return "eval/" + TASK_KEY.get(task, "implicit_reward_accuracy" if preference else "loss")


def report_twin(name: str) -> str:
    """The report-split twin of a selection-split metric: ``eval/x`` → ``test/x``."""
    return "test/" + name.split("/", 1)[1]


def spec(name: str) -> Metric:
    """A metric's row, its label naming the split (``accuracy (test)``); other names label themselves."""
    if name in COSTS:
        return COSTS[name]
    split, _, base = name.partition("/")
    row = QUALITY.get(base)
    if split in SPLITS and row:
        return Metric(f"{row.label} ({SPLITS[split]})", row.format, row.higher_is_better)
    return Metric(name)


def is_better(name: str, new: float, old: float | None) -> bool:
    """Whether ``new`` improves on ``old`` (None or NaN: anything does) in metric ``name``'s direction."""
    if old is None or math.isnan(old):
        return True
    return new > old if spec(name).higher_is_better else new < old
