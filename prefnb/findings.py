"""The paper's answers: one row per question and comparison, its verdict read from its interval.

Every row is a paired difference in ``test_quality`` with the 95 % t-interval over seeds
(:func:`prefnb.tables.paired_t`). A *best* cell is chosen on the selection split and compared on the
report split against the study's default (DPO at its default β with the SFT model as reference; DPO
among the objectives; the NLL at the profile's learning rate among the SFT objectives), or, where the
best cell is that default, against the runner-up.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from prefnb import objectives
from prefnb.experiments import FULL_GRIDS, SCENARIOS, Question, largest_train_size, matching, preference_runs, runs_of
from prefnb.metrics import TASK_METRIC
from prefnb.tables import (EFFECTS, HEADERS, _effect_rows, _metric_spec, cell, fmt, grid_table, is_missing,
                           markdown_table, not_drawn, paired_t, table_or_note)

log = logging.getLogger(__name__)
NONE = (float("nan"),) * 3 + (0, 0)
COLUMNS = ["question", "comparison", "task", "difference", "95% t-interval", "seeds", "verdict"]


def verdict(stats: tuple, spec: str) -> str:
    """What the interval says: resolved above or below zero, or not resolved at this many seeds."""
    m, lo, hi, pairs, seeds = stats
    if not pairs:
        return "no paired runs in these outputs"
    if seeds < 2:
        return f"{fmt(m, spec, True)} at 1 seed: no interval, no verdict"
    if lo > 0:
        return f"positive, resolved at {seeds} seeds (interval above zero)"
    if hi < 0:
        return f"negative, resolved at {seeds} seeds (interval below zero)"
    return f"no difference resolved at {seeds} seeds"


def _contrast(treat: pd.DataFrame, ctrl: pd.DataFrame, on: list[str]) -> tuple:
    """Paired difference treat − ctrl: runs matched on ``on`` (control runs of one key averaged)."""
    if treat.empty or ctrl.empty:
        return NONE
    c = ctrl.groupby(on, dropna=False)["test_quality"].mean().rename("control").reset_index()
    pairs = treat.merge(c, on=on)
    return paired_t(pairs["test_quality"] - pairs["control"], pairs["seed"])


def _label(key: tuple) -> str:
    return ", ".join(map(str, key))


def _best_against(rows: pd.DataFrame, by: list[str], default: tuple | None, on: list[str]) -> tuple[str, tuple]:
    """(comparison, stats): the best cell of ``by`` on the selection split minus ``default``
    (or minus the runner-up, when the best cell is the default) on the report split."""
    means = rows.groupby(by, dropna=False)["eval_quality"].mean().dropna() if len(rows) else pd.Series(dtype=float)
    if len(means) < 2:
        return "fewer than two cells ran", NONE
    keys = [k if isinstance(k, tuple) else (k,) for k in means.sort_values(ascending=False, kind="stable").index]
    best = keys[0]
    other = default if default in keys and default != best else keys[1]
    role = "default" if other == default else "runner-up"
    return (f"best ({_label(best)}) − {role} ({_label(other)})",
            _contrast(matching(rows, **dict(zip(by, best))), matching(rows, **dict(zip(by, other))), on))


def _default_beta(rows: pd.DataFrame) -> float | None:
    """The swept β closest to DPO's default (prefnb.objectives) on a log scale."""
    betas = sorted(rows["beta"].dropna().unique()) if "beta" in rows else []
    target = objectives.default("dpo", "beta")
    return min(betas, key=lambda b: abs(np.log(b / target))) if betas else None


def floor(df: pd.DataFrame, data_majority=None) -> dict[str, pd.DataFrame]:
    """Per task, the floor rows (columns: baseline, test_quality, seed): the zero-shot starting
    model(s) of 00_baselines, and the majority class (00's, else ``data_majority(task_rows)``)."""
    out, columns = {}, ["baseline", "task", "test_quality", "seed"]
    for task in TASK_METRIC:
        parts, runs = [], matching(df, task=task)
        b = matching(runs, experiment="00_baselines")
        if len(b):
            start = b["starting_model"].replace("", "base")
            parts.append(b.assign(baseline="zero-shot " + start + " model (" + b["model"].astype(str) + ")"))
            if "test/majority_accuracy" in b and b["test/majority_accuracy"].notna().any():
                m = b.dropna(subset=["test/majority_accuracy"]).iloc[:1]
                parts.append(m.assign(baseline="majority class", test_quality=m["test/majority_accuracy"]))
        elif task == "paraphrase" and len(runs):
            value = (data_majority or majority_from_data)(runs)
            if value is not None:
                parts.append(pd.DataFrame({"baseline": ["majority class"], "test_quality": [value], "seed": [0],
                                           "task": [task]}))
        out[task] = pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)
    return out


def majority_from_data(rows: pd.DataFrame) -> float | None:
    """Test-split accuracy of the training split's majority label, for the data of these runs
    (their first run's data keys; the whole training split, as 00_baselines uses it)."""
    from prefnb import data as data_lib
    from prefnb.baselines import majority_metrics
    from prefnb.config import RunParams

    row = rows.sort_values("run_id").iloc[0].to_dict()
    fields = {k: row[k] for k in RunParams.__dataclass_fields__ if k in row and not is_missing(row[k])}
    try:
        params = RunParams(**{**fields, "train_size": 1.0, "max_train_examples": 0})
        return majority_metrics(data_lib.load_task(params)).get("test/majority_accuracy")
    except Exception as err:  # noqa: BLE001 - the floor row says n/a, the log says why
        log.warning("majority class not computed from the data: %s", err)
        return None


def findings(df: pd.DataFrame, floors: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict]:
    """(the findings table, its numbers for the text: findings.<key>.<task>.{text, verdict, …},
    and ``not_made``: [[question, comparison, task]] of the comparisons without paired runs, which
    :func:`findings_markdown` names under the table); ``floors``: :func:`floor`'s."""
    rows, numbers = [], {"not_made": []}

    def add(question: str, key: str, name: str, task: str, stats: tuple, detail: str = "") -> None:
        """``name``: what is compared; ``detail``: which cells (the best one against its default)."""
        comparison = f"{name}: {detail}" if detail else name
        spec = _metric_spec("test_quality", task)[1]
        m, lo, hi, pairs, seeds = stats
        difference, said = fmt(m, spec, True), verdict(stats, spec)
        interval = f"[{fmt(lo, spec, True)}, {fmt(hi, spec, True)}]" if seeds > 1 else "n/a"
        numbers.setdefault(key, {})[task] = {
            "comparison": comparison, "difference": difference, "interval": interval, "seeds": seeds,
            "verdict": said, "text": f"{comparison}: {difference}, 95% t-interval {interval}; {said}"
            if pairs else f"{comparison}: {said}"}
        if pairs:
            rows.append(dict(zip(COLUMNS, [question, comparison, task, difference, interval, seeds, said])))
        else:  # a profile that leaves an experiment out (the laptop's) says so under the table
            numbers["not_made"].append([question, name, task])

    for task in TASK_METRIC:
        t_sft, f = matching(df, experiment="01_sft", task=task), floors[task]
        for key, name, prefix in (("sft_vs_majority", "majority class", "majority class"),
                                  ("sft_vs_zero_shot", "zero-shot base model", "zero-shot base "))[
                                      task != "paraphrase":]:  # a majority class exists for the classification task
            ctrl = f[f["baseline"].str.startswith(prefix)].drop(columns="seed")
            add("floor", key, f"SFT − {name}", task, _contrast(t_sft, ctrl, ["task"]))
        for key, (desc, treat, ctrl, keys) in EFFECTS.items():
            pairs = matching(_effect_rows(df, treat, ctrl, keys), task=task).dropna(subset=["diff"])
            add("Q1", key, desc, task, paired_t(pairs["diff"], pairs["seed"]))
        sweep = matching(preference_runs(runs_of(df, "04_reference_strength")), task=task)
        comparison, stats = _best_against(sweep, ["reward", "reference_kind", "beta"],
                                          ("dpo", "SFT model", _default_beta(sweep)), ["task", "seed"])
        add("Q2", "best_beta", "(reward, reference, β)", task, stats, comparison)
        variants = matching(largest_train_size(runs_of(df, "06_dpo_variants")), task=task)
        for scenario, label in SCENARIOS.items():
            comparison, stats = _best_against(matching(variants, scenario=label), ["objective"], ("dpo",),
                                              ["task", "seed"])
            add("Q3", f"best_objective_{scenario}", f"objective, {label}", task, stats, comparison)
        after = matching(runs_of(df, "07_sft_objectives"), stage="after DPO", task=task)
        comparison, stats = _best_against(after, ["sft_objective", "sft_lr_scale"], ("kl", "1×"), ["task", "seed"])
        add("Q4", "best_sft_objective", "(SFT objective, learning rate) → DPO", task, stats, comparison)
    return pd.DataFrame(rows, columns=COLUMNS), numbers


def findings_markdown(table: pd.DataFrame, not_made: list[list[str]] = ()) -> str:
    """The findings table with its caption; ``not_made`` (:func:`findings`') is named in the caption,
    so a reduced profile's table says which questions it leaves to the full grids."""
    missing = ""
    if not_made:
        by_comparison: dict[tuple[str, str], list[str]] = {}
        for question, comparison, task in not_made:
            by_comparison.setdefault((question, comparison), []).append(task)
        missing = (". Not made from these runs (no paired runs: their experiments did not run on that task, or failed; the "
                   f"full grids on a GPU, {FULL_GRIDS}, run every experiment): "
                   + "; ".join(f"{q} {c} ({', '.join(tasks)})" for (q, c), tasks in by_comparison.items()))
    return table_or_note(table, "tbl-findings", "Findings", ": each question's comparisons as paired differences in "
                         "the task's test metric (accuracy for paraphrase, chrF for sonnets), 95% t-interval over "
                         f"seeds; best cells chosen on the selection split{missing}",
                         f"No comparison could be made from these outputs{missing}.")


# --- one table per question (the main text; every cell of every grid is in the appendix)
def _floor_rows(f: pd.DataFrame, columns: list[str], task: str) -> list[dict]:
    name, spec = _metric_spec("test_quality", task)
    out = []
    for baseline, g in f.groupby("baseline", sort=False):
        value = fmt(g["test_quality"].mean(), spec) if baseline == "majority class" else cell(g["test_quality"], spec)
        seeds = "—" if baseline == "majority class" else g["seed"].nunique()  # the majority class has no seed
        out.append({columns[0]: baseline, columns[1]: "untrained", name: value, "seeds": seeds})
    return out


def question_table(df: pd.DataFrame, question: Question, floors: dict[str, pd.DataFrame]) -> str:
    """The markdown of one question's table (test split, mean ± 95 % t-interval over seeds)."""
    name, caption = question.name, question.caption
    sub = runs_of(df, *question.experiments)
    sub = question.rows(sub) if question.rows is not None and len(sub) else sub
    tasks = sorted(sub["task"].unique()) if len(sub) else []
    parts = []
    for task in tasks:
        table = grid_table(sub[sub["task"] == task], list(question.cells), list(question.metrics), task)
        if name == "methods" and len(floors.get(task, ())):
            table = pd.concat([pd.DataFrame(_floor_rows(floors[task], list(table.columns), task)), table])
        parts.append(table.fillna("").assign(task=task))
    if not parts:
        runs = ", ".join(f"`{e}`" for e in question.experiments)
        return not_drawn(f"tbl-q-{name}", caption, f"No finished runs of {runs} in these outputs.")
    table = pd.concat(parts, ignore_index=True).fillna("")
    cells = [HEADERS.get(k, k) for k in question.cells if HEADERS.get(k, k) in table]
    first = [_metric_spec("test_quality", t)[0] for t in tasks]  # the task metrics lead
    table = table[["task", *cells, *first] + [c for c in table.columns if c not in ("task", "seeds", *cells, *first)]
                  + ["seeds"]]
    return markdown_table(table) + f"\n: {caption}; test split, mean ± 95% t-interval across seeds {{#tbl-q-{name}}}\n"
