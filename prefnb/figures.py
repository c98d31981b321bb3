"""The study's figures, drawn with seaborn from the runs table of :mod:`prefnb.report`, on the report split.

Error bars are the tables' 95 % t-intervals over seeds (:func:`prefnb.tables.t_interval` as seaborn's
``errorbar``; seaborn's default would be a bootstrap CI): runs of one cell and seed are averaged first
(:func:`_seed_means`), and a cell with one seed has no bar.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from prefnb.experiments import (IRW, Q1_EXPERIMENTS, SCENARIOS, largest_train_size, matching, preference_runs,
                                runs_of)
from prefnb.metrics import TASK_METRIC, spec
from prefnb.objectives import PREFERENCE_OBJECTIVES, SFT_LOSSES
from prefnb.tables import t_interval

log = logging.getLogger(__name__)

METHODS = ["SFT", "DPO", "staged"]
SFT_OBJECTIVES = list(SFT_LOSSES)
SCENARIO_ORDER = list(SCENARIOS.values())
AXIS = {"test/accuracy": "test accuracy (fraction correct)", "test/f1": "test F1", "test/chrf": "test chrF (0–100)",
        "test/chrf_full": "test chrF, whole sonnet (0–100)",
        IRW: "test implicit-reward acc. (fraction)"}
TASK_METRICS = {task: [metric] for task, metric in TASK_METRIC.items()}


@dataclass
class Figure:
    """``select`` picks its rows from the runs table (empty: the figure is skipped), ``draw`` draws them."""
    name: str
    experiments: tuple[str, ...]
    caption: str
    select: Callable[[pd.DataFrame], pd.DataFrame]
    draw: Callable[[pd.DataFrame], matplotlib.figure.Figure]
    alt: str  # the figure's fig-alt text: what is plotted against what, for a reader who cannot see it


def _order(values, preferred) -> list:
    """Present values in the preferred order, then any others sorted."""
    present = set(values)
    return [v for v in preferred if v in present] + sorted(present - set(preferred), key=str)


def _ci(data: pd.DataFrame) -> dict:
    return {"errorbar": t_interval if data["seed"].nunique() >= 2 else None}


def _seed_means(data: pd.DataFrame, keys: list[str], value: str = "value") -> pd.DataFrame:
    """One row per (cell, seed): runs of one cell that share a seed are not replicates, so
    they are averaged before the interval over seeds (as :func:`prefnb.tables.paired_t` does)."""
    return data.groupby([*keys, "seed"], as_index=False, dropna=False, observed=True, sort=False)[value].mean()


def _long(data: pd.DataFrame, per_task: dict[str, list[str]]) -> pd.DataFrame:
    """One row per (run, measure): the metrics listed for the run's task."""
    parts = []
    for task, metrics in per_task.items():
        sub = data[data["task"] == task]
        for m in metrics:
            if m in sub and sub[m].notna().any():
                part = sub.assign(measure=f"{task}: {AXIS.get(m, spec(m).label)}", value=sub[m])
                parts.append(part[part["value"].notna()])
    return pd.concat(parts, ignore_index=True) if parts else data.iloc[0:0].assign(measure=[], value=[])


def _finish(g, title: str, data: pd.DataFrame, xlabel: str, bars: bool = False, titles: str = "{col_name}"):
    g.set_titles(titles).set_axis_labels(xlabel, "score")
    if bars:  # scores are ≥ 0: bars start at 0, and an all-zero panel still shows a sane axis
        for ax in g.axes.flat:
            top = ax.get_ylim()[1]
            ax.set_ylim(0, top if top > 1e-9 else 1)
    seeds = data["seed"].nunique()
    ci = "error bars: 95% t-interval over seeds" if seeds >= 2 else "one seed: no error bars"
    g.figure.suptitle(f"{title}\n({seeds} seed{'s' if seeds != 1 else ''}; {ci})", y=1.0, va="bottom")
    return g.figure


# --- (a) SFT / DPO / staged × FFT / LoRA --------------------------------------------------
def _methods(df):
    return _long(runs_of(df, *Q1_EXPERIMENTS),
                 {"paraphrase": ["test/accuracy", "test/f1"], "sonnets": ["test/chrf", "test/chrf_full"]})


def draw_methods(data):
    data = _seed_means(data, ["method", "tuning", "measure"])
    g = sns.catplot(data=data, kind="bar", x="method", y="value", hue="tuning", col="measure", col_wrap=2,
                    order=[m for m in METHODS if m in set(data["method"])], **_ci(data),
                    sharey=False, height=3.2, aspect=1.3, capsize=0.1)
    return _finish(g, "SFT, DPO alone and staged SFT→DPO, by fine-tuning", data, "training", bars=True)


# --- (b) β sweep ------------------------------------------------------------------------
def _beta(df):
    return _long(preference_runs(runs_of(df, "04_reference_strength")), {t: [m, IRW] for t, m in TASK_METRIC.items()})


def draw_beta(data):
    data = data.assign(variant=data["reward"] + np.where(data["reference_kind"].isin(["", "none"]), "",
                                                          " · ref: " + data["reference_kind"]))
    data = _seed_means(data, ["beta", "variant", "measure"])
    g = sns.relplot(data=data, kind="line", x="beta", y="value", hue="variant", style="variant", col="measure",
                    col_wrap=2, markers=True, dashes=False, **_ci(data),
                    facet_kws={"sharey": False}, height=3.2, aspect=1.3)
    g.set(xscale="log")
    return _finish(g, "DPO sensitivity to β, reward kind and reference model", data, "β (log scale)")


# --- (c) variants × scenario, (d) train size -------------------------------------------
def _variants(df):
    return _long(largest_train_size(runs_of(df, "06_dpo_variants")), TASK_METRICS)


def draw_variants(data):
    data = _seed_means(data, ["objective", "scenario", "measure"])
    g = sns.catplot(data=data, kind="bar", x="objective", y="value", hue="scenario", col="measure",
                    order=_order(data["objective"], PREFERENCE_OBJECTIVES),
                    hue_order=_order(data["scenario"], SCENARIO_ORDER),
                    **_ci(data), sharey=False, height=3.4, aspect=1.5, capsize=0.1)
    return _finish(g, "Preference objectives by starting point (largest training set)", data, "preference objective",
                   bars=True)


def _train_size(df):
    return _long(preference_runs(runs_of(df, "06_dpo_variants")), TASK_METRICS).assign(
        train_pct=lambda d: 100 * d["train_size"].astype(float))


def draw_train_size(data):
    data = _seed_means(data, ["train_pct", "objective", "scenario", "measure"])
    objectives = _order(data["objective"], PREFERENCE_OBJECTIVES)
    g = sns.relplot(data=data, kind="line", x="train_pct", y="value", hue="objective", style="objective",
                    hue_order=objectives, style_order=objectives, col="scenario",
                    col_order=_order(data["scenario"], SCENARIO_ORDER), row="measure", markers=True, dashes=False,
                    **_ci(data), facet_kws={"sharey": "row"}, height=3.0, aspect=1.2)
    return _finish(g, "Preference objectives against training-set size", data,
                   "training pairs used (% of train split)", titles="{row_name}\n{col_name}")


# --- (e) LoRA vs FFT: quality against cost ---------------------------------------------
def _cost(df):
    data = runs_of(df, "05_lora_vs_fft")
    need = ["test_quality", "train/seconds", "peak_memory_mib"]
    return data.dropna(subset=need) if len(data) and all(c in data for c in need) else data.iloc[0:0]


def draw_cost(data):
    tasks = sorted(data["task"].unique())
    fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.4 * len(tasks)), squeeze=False)
    order = sorted(data["tuning"].unique(), key=lambda t: (t != "FFT", len(t), t))
    palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
    for i, task in enumerate(tasks):
        d = data[data["task"] == task]
        ylabel = f"{task}: {AXIS.get(TASK_METRIC.get(task, ''), 'score')}"
        for j, (x, xlabel) in enumerate([("train/seconds", "training wall-clock (s)"),
                                         ("peak_memory_mib", "peak memory (MiB)")]):
            sns.scatterplot(data=d, x=x, y="test_quality", hue="tuning", style="tuning", size="max_steps",
                            hue_order=order, style_order=order, palette=palette, ax=axes[i, j], s=60)
            axes[i, j].set(xlabel=xlabel, ylabel=ylabel)
        throughput = _seed_means(d, ["tuning"], "train/tokens_per_second")  # several depths per seed
        sns.barplot(data=throughput, x="tuning", y="train/tokens_per_second", hue="tuning", order=order,
                    palette=palette, **_ci(throughput), ax=axes[i, 2], capsize=0.1, legend=False)
        axes[i, 2].set(xlabel="fine-tuning", ylabel="training throughput (tokens/s)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat:
        if ax.get_legend():
            ax.get_legend().remove()
    labels = ["training steps" if lab == "max_steps" else lab for lab in labels]
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    seeds = data["seed"].nunique()
    fig.suptitle(f"LoRA vs full fine-tuning: quality against wall-clock and memory\n({seeds} seed"
                 f"{'s' if seeds != 1 else ''}, one marker per run; marker size = training steps)", y=1.0, va="bottom")
    return fig


# --- (f) SFT objectives and learning rate → DPO ----------------------------------------
def _sft_objectives(df):
    data, parts = runs_of(df, "07_sft_objectives"), []
    for task, metric in TASK_METRIC.items():
        after, sft = matching(data, task=task, stage="after DPO"), matching(data, task=task, stage="SFT model")
        for sub, m, label in [(after, metric, f"{task}: after DPO, {AXIS[metric]}"),
                              (sft, IRW, f"{task}: SFT model, test implicit-reward acc."),
                              (after, IRW, f"{task}: after DPO, test implicit-reward acc.")]:
            if m in sub and sub[m].notna().any():
                parts.append(sub.assign(measure=label.replace(": ", "\n", 1), value=sub[m]).dropna(subset=["value"]))
    return pd.concat(parts, ignore_index=True) if parts else data.iloc[0:0]


def draw_sft_objectives(data):
    data = _seed_means(data, ["sft_objective", "sft_lr_scale", "measure"])
    scales = sorted(data["sft_lr_scale"].unique(), key=lambda s: -Fraction(s.rstrip("×")) if s else 0)
    g = sns.catplot(data=data, kind="bar", x="sft_objective", y="value", hue="sft_lr_scale", hue_order=scales,
                    col="measure", col_wrap=3, order=[o for o in SFT_OBJECTIVES if o in set(data["sft_objective"])],
                    **_ci(data), sharey=False, height=3.0, aspect=1.2, capsize=0.1)
    if g.legend:
        g.legend.set_title("SFT learning rate")
    return _finish(g, "SFT objective and SFT learning rate → DPO result and implicit reward", data,
                   "SFT objective (f-divergence)", bars=True)


FIGURES = [
    Figure("methods", Q1_EXPERIMENTS,
           "Test-split task metrics of SFT, DPO alone (reference = base model) and staged SFT→DPO (reference = the "
           "SFT model), one bar per fine-tuning method that ran (full fine-tuning, FFT; LoRA).", _methods, draw_methods,
           "Bar charts, one panel per task metric: the test score of SFT, DPO alone and staged SFT→DPO, one bar per "
           "fine-tuning method, with 95% t-interval error bars over seeds."),
    Figure("beta", ("04_reference_strength",),
           "β sweep: test-split task metric and implicit-reward accuracy against β for each reward kind (dpo with a "
           "reference model, probability = no reference, likelihood = prior p(y) as reference) and reference "
           "model.", _beta, draw_beta,
           "Line charts, one panel per task metric and implicit-reward accuracy: the test score against β on a log "
           "scale, one line per reward kind and reference model."),
    Figure("variants", ("06_dpo_variants",),
           "Preference objectives by scenario (after SFT, no SFT, instruction-tuned start) at the largest "
           "training set: test-split task metric.", _variants, draw_variants,
           "Bar chart per task: the test score of each preference objective, one bar per starting point."),
    Figure("train_size", ("06_dpo_variants",),
           "Test-split task metric against the fraction of training pairs used, per objective and scenario.",
           _train_size, draw_train_size,
           "Line charts, one panel per starting point: the test score against the percentage of training pairs "
           "used, one line per preference objective."),
    Figure("cost", ("05_lora_vs_fft",),
           "LoRA ranks vs full fine-tuning: test-split task metric against training wall-clock and peak memory "
           "(training only; marker size: training steps), and training throughput.", _cost, draw_cost,
           "Per task, two scatter plots of the test score against training wall-clock and against peak memory, one "
           "marker per run coloured by fine-tuning method, and a bar chart of training throughput per method."),
    Figure("sft_objectives", ("07_sft_objectives",),
           "SFT objective (f-divergence) and SFT learning rate against the test-split metric after DPO and the "
           "test-split implicit-reward accuracy of the SFT model and of the DPO model.", _sft_objectives,
           draw_sft_objectives,
           "Bar charts, one panel per measure: for each SFT objective, one bar per SFT learning rate, of the test "
           "score after DPO and the implicit-reward accuracy of the SFT model and of the DPO model."),
]


def drawable(df: pd.DataFrame) -> list[Figure]:
    return [f for f in FIGURES if len(df) and len(f.select(df))]


def draw_all(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Draw every figure that has data; save PNG + SVG; log the skipped ones."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    ready = {f.name for f in drawable(df)}
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    with plt.rc_context({"svg.hashsalt": "prefnb", "figure.dpi": 100}):
        for f in FIGURES:
            if f.name not in ready:
                log.info("figure %s skipped: no finished runs of %s", f.name, ", ".join(f.experiments))
                continue
            fig = f.draw(f.select(df))
            for ext in ("png", "svg"):
                path = out_dir / f"{f.name}.{ext}"
                fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
                paths.append(path)
            plt.close(fig)
            log.info("figure %s → %s", f.name, out_dir / f"{f.name}.png")
    return paths
