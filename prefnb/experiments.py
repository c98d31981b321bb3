"""The study's experiments as the report reads them: one declaration per experiment, in :data:`EXPERIMENTS`
(README, "Adding an experiment": its notebook and its grid are the other two files).

A group's labels are a function of the run: its parameters and, over them, the labels of its grid axes as the
study recorded them (``init_from.sft_loss``: an axis of the run it starts from); a run the study did not make
(no record) gets the labels of its objective only. The comparisons between experiments are in
:mod:`prefnb.findings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import numpy as np
import pandas as pd

from prefnb.objectives import REFERENCE_FREE

IRW = "test/implicit_reward_accuracy"             # against the run's own reference
IRW_TOTAL = "test/implicit_reward_accuracy_total"  # against the base model the chain started from
FULL_GRID_PROFILES = ("smollm2", "gpt2")  # the profiles that run every experiment (on a GPU)
FULL_GRIDS = " or ".join(f"`--profile {p}`" for p in FULL_GRID_PROFILES)  # as the paper and README name them
Q1_EXPERIMENTS = ("01_sft", "02_dpo", "03_staged")  # question 1: SFT, DPO alone, staged
SCENARIOS = {"after_sft": "after SFT", "no_sft": "no SFT", "instruct": "instruction-tuned start"}
_CI = "test split, mean ± 95% t-interval across seeds"
_TASK_EXTRAS = ("test/f1", "test/chrf_full", "test/chrf_sampled", "test/chrf_full_sampled")
Labels = Callable[[dict[str, Any]], dict[str, str]]
Rows = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass(frozen=True)
class Question:
    """The table the paper's main text shows for an experiment."""
    name: str                     # its table is tbl-q-<name>
    experiments: tuple[str, ...]  # whose runs it shows
    rows: Rows | None
    cells: tuple[str, ...]
    metrics: tuple[str, ...]
    caption: str


@dataclass(frozen=True)
class Experiment:
    groups: dict[str, Labels]  # per group of its grid: the report labels of its runs (method, stage, reward, …)
    cells: tuple[str, ...]     # the columns that identify a cell of its grid (seeds are its replicates)
    metrics: tuple[str, ...]   # what its per-task tables show (``test_quality``: the task's key metric)
    caption: str               # of those tables (the paper's appendix)
    rows: Rows | None = None   # picks the runs that are cells
    question: Question | None = None
    figures: tuple[str, ...] = field(default=())  # the names of its figures in prefnb.figures
    # the numbers the paper's text quotes from it ({{< var <task>.<name> >}}):
    # (its runs of one task, the task metric's format) → {name: text}
    numbers: Callable[[pd.DataFrame, str], dict[str, Any]] | None = None


def runs_of(df: pd.DataFrame, *experiments: str) -> pd.DataFrame:
    """The runs of these experiments (an empty table, which may lack every column, as it is)."""
    return df[df["experiment"].isin(experiments)] if len(df) else df


def matching(rows: pd.DataFrame, **values: Any) -> pd.DataFrame:
    """The rows whose columns hold these values (an empty table as it is)."""
    return rows[np.logical_and.reduce([rows[col] == v for col, v in values.items()])] if len(rows) else rows


def preference_runs(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["method"] != "SFT"] if len(rows) else rows  # 04: the stronger reference's SFT runs; 06: none


def largest_train_size(rows: pd.DataFrame) -> pd.DataFrame:
    """The preference runs at each task's largest training fraction."""
    rows = preference_runs(rows)
    return rows if not len(rows) else rows[rows["train_size"] == rows.groupby("task")["train_size"].transform("max")]


def _scale(value: Any) -> str:
    """A learning-rate scale as the tables write it: 1 → "1×", 0.0625 → "1/16×"; "" if not recorded."""
    if value is None or value == "":
        return ""
    f = Fraction(float(value)).limit_denominator(256)
    return f"{f.numerator}×" if f.denominator == 1 else f"{f.numerator}/{f.denominator}×"


def _method(name: str) -> Labels:
    return lambda run: {"method": name}


# 04's reward axis → (reward, reference) as the tables name them
REWARDS = {"dpo": ("dpo", "SFT model"), "probability": ("probability", "none"),
           "likelihood": ("likelihood", "prior p(y)"), "stronger_reference": ("dpo", "stronger model")}


def _variant(run: dict[str, Any]) -> dict[str, str]:
    """06: the scenario is the start (after SFT = staged; no SFT and instruction-tuned = DPO alone)."""
    return {"method": "staged" if run["scenario"] == "after_sft" else "DPO", "scenario": SCENARIOS[run["scenario"]],
            "reward": "reference-free" if run["objective"] in REFERENCE_FREE else "dpo"}


def _best_beta(rows: pd.DataFrame) -> pd.DataFrame:
    """Each (reward, reference) of the β sweep at its best β, chosen on the selection split."""
    rows = preference_runs(rows)
    means = rows.groupby(["task", "reward", "reference_kind", "beta"])["eval_quality"].mean().dropna()
    best = means.groupby(level=[0, 1, 2]).idxmax()
    return rows.set_index(["task", "reward", "reference_kind", "beta"]).loc[list(best)].reset_index()


def _best_numbers(name: str, select: Rows, by: list[str]) -> Callable[[pd.DataFrame, str], dict[str, Any]]:
    """The numbers of an experiment that quotes its best cell of ``by`` among the runs ``select`` picks."""
    def numbers(rows: pd.DataFrame, fmt: str) -> dict[str, Any]:
        from prefnb.tables import best_cell
        return {name: best_cell(select(rows), by, fmt)}
    return numbers


def _cost_numbers(rows: pd.DataFrame, fmt: str) -> dict[str, Any]:
    """LoRA's training wall-clock and peak memory as a multiple of FFT's (all ranks and depths)."""
    from prefnb.tables import ratio
    lora, fft = (rows[rows["lora_r"] > 0], rows[rows["lora_r"] == 0]) if len(rows) else (rows, rows)
    none = pd.Series(dtype=float)
    return {f"lora_{name}_ratio": ratio(lora.get(col, none), fft.get(col, none))
            for name, col in (("time", "train/seconds"), ("memory", "peak_memory_mib"))}


def _sft_objective_numbers(rows: pd.DataFrame, fmt: str) -> dict[str, Any]:
    from prefnb.tables import best_cell, cell_of
    after, sft = matching(rows, stage="after DPO"), matching(rows, stage="SFT model")
    return {"best_sft_objective": best_cell(after, ["sft_objective", "sft_lr_scale"], fmt),
            "irw_sft": cell_of(sft, IRW), "irw_after_dpo": cell_of(after, IRW),
            "irw_after_dpo_total": cell_of(after, IRW_TOTAL)}


EXPERIMENTS: dict[str, Experiment] = {
    "00_baselines": Experiment(
        {"zero_shot": lambda run: {"method": "zero-shot", "starting_model": run["starting_model"]}},
        ("starting_model", "prompt_format"),
        ("test_quality", "test/f1", "test/chrf_full", "test/majority_accuracy", "test/majority_f1"),
        "Zero-shot baselines: each starting model untrained, and the majority class (test split)"),
    "01_sft": Experiment({"sft": _method("SFT")}, ("tuning",), ("test_quality", *_TASK_EXTRAS), f"SFT: {_CI}"),
    "02_dpo": Experiment({"dpo": _method("DPO")}, ("tuning",), ("test_quality", *_TASK_EXTRAS, IRW),
                         f"DPO alone: {_CI}"),
    "03_staged": Experiment(
        {"staged": _method("staged")}, ("tuning",), ("test_quality", *_TASK_EXTRAS, IRW, IRW_TOTAL),
        f"Staged SFT→DPO: {_CI}", figures=("methods",),
        question=Question("methods", Q1_EXPERIMENTS, None, ("method", "tuning"), ("test_quality", IRW),
                          "Question 1: SFT, DPO alone and staged SFT→DPO, after the untrained floor (majority class, "
                          "zero-shot starting model)")),
    "04_reference_strength": Experiment(
        {"strong_reference": _method("SFT"),
         "sweep": lambda run: dict(zip(("method", "reward", "reference_kind"), ("staged", *REWARDS[run["reward"]])))},
        ("reward", "reference_kind", "beta"), ("test_quality", IRW),
        f"β sweep by reward kind and reference: {_CI}", rows=preference_runs, figures=("beta",),
        numbers=_best_numbers("best_beta", preference_runs, ["reward", "reference_kind", "beta"]),
        question=Question("reference", ("04_reference_strength",), _best_beta, ("reward", "reference_kind", "beta"),
                          ("test_quality", IRW),
                          "Question 2: each reward and reference at its best β (chosen on the selection split)")),
    "05_lora_vs_fft": Experiment(
        {"depth": _method("SFT")}, ("tuning", "max_steps"),
        ("test_quality", "train/seconds", "train/tokens_per_second", "peak_memory_mib"),
        f"LoRA vs FFT: quality and cost (training only), {_CI}", figures=("cost",), numbers=_cost_numbers),
    "06_dpo_variants": Experiment(
        {"variants": _variant, "scenarios": _variant}, ("scenario", "objective", "train_size"), ("test_quality", IRW),
        f"Preference objectives × scenario × training-set fraction: {_CI}", figures=("variants", "train_size"),
        numbers=_best_numbers("best_variant", largest_train_size, ["objective", "scenario"]),
        question=Question("variants", ("06_dpo_variants",), largest_train_size, ("scenario", "objective"),
                          ("test_quality", IRW), "Question 3: each preference objective from each starting point, at "
                          "the largest training set")),
    "07_sft_objectives": Experiment(
        {**dict.fromkeys(("sft", "sft_lr"), lambda run: {
            "method": "SFT", "stage": "SFT model", "sft_objective": run["sft_loss"],
            "sft_lr_scale": _scale(run.get("learning_rate_scale", 1.0))}),
         **dict.fromkeys(("dpo", "dpo_lr"), lambda run: {
             "method": "staged", "stage": "after DPO", "sft_objective": run.get("init_from.sft_loss", "kl"),
             "sft_lr_scale": _scale(run.get("init_from.learning_rate_scale", 1.0))})},
        ("stage", "sft_objective", "sft_lr_scale"), ("test_quality", IRW, IRW_TOTAL),
        f"SFT objective × SFT learning rate: the SFT model and the model after DPO, {_CI}",
        figures=("sft_objectives",), numbers=_sft_objective_numbers,
        question=Question("sft-objectives", ("07_sft_objectives",), lambda rows: matching(rows, stage="after DPO"),
                          ("sft_objective", "sft_lr_scale"), ("test_quality", IRW, IRW_TOTAL),
                          "Question 4: DPO after each SFT objective and SFT learning rate")),
}
LABELS = ("method", "stage", "reward", "reference_kind", "scenario", "sft_objective", "sft_lr_scale", "starting_model")


def run_labels(experiment: str, group: str | None, run: dict[str, Any]) -> dict[str, str]:
    """The report labels of one run (``run``: its parameters, then its grid labels over them)."""
    declared = EXPERIMENTS.get(experiment)
    name = group.split("/", 1)[-1] if isinstance(group, str) else None  # NaN: no record
    labels = dict.fromkeys(LABELS, "")
    if declared and name in declared.groups:
        labels.update(declared.groups[name](run))
    else:
        labels["method"] = "SFT" if run.get("objective", "sft") == "sft" else "DPO"
    return labels
