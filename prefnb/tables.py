"""Statistics and tables of the runs table: mean ± 95 % t-interval across seeds, paired effects.

Every table, figure and number shows the report split (``test/…``; the selection split ``eval/…`` only
where it says what was selected: README, "The paper"). One seed gives no interval, anywhere (figures
included: :func:`t_interval` is their error bar).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from prefnb.experiments import EXPERIMENTS, IRW, Q1_EXPERIMENTS, matching, runs_of
from prefnb.metrics import TASK_METRIC, key_metric, report_twin, spec

# t_{0.975, df} for df = 1..30 (no scipy dependency); 1.96 beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % t-interval, n); half-width NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(v[0]), float("nan"), 1
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(n)), n


def t_interval(values) -> tuple[float, float]:
    """(low, high) of the 95 % t-interval of the mean; NaN (no interval) for fewer than 2 values.
    The error bar of every figure (seaborn's ``errorbar=`` callable), so figures and tables agree."""
    m, h, _ = mean_ci(values)
    return m - h, m + h


def paired_t(diffs, seeds) -> tuple[float, float, float, int, int]:
    """(mean, low, high, pairs, seeds) of paired differences, with the 95 % t-interval over seeds.
    Pairs that share a seed are averaged within the seed first (they are not independent replicates)."""
    d = pd.DataFrame({"diff": np.asarray(diffs, dtype=float), "seed": np.asarray(seeds)}).dropna()
    per_seed = d.groupby("seed")["diff"].mean()
    m, h, n = mean_ci(per_seed)
    return m, m - h, m + h, len(d), n


def fmt(x: float, spec: str = ".3f", signed: bool = False) -> str:
    if is_missing(x):
        return "n/a"
    return format(x, ("+" if signed else "") + spec)


def cell(values, spec: str) -> str:
    m, h, n = mean_ci(values)
    if n == 0:
        return ""
    return f"{fmt(m, spec)} ± {fmt(h, spec)}" if n > 1 else f"{fmt(m, spec)} (1 seed)"


def best_cell(df: pd.DataFrame, by: list[str], fmt_spec: str) -> dict[str, str]:
    """The best cell of a grid, chosen on the SELECTION split and quoted on the REPORT split.

    {"cell": its label, "value": mean ± 95 % t-interval over seeds of ``test_quality`` (what the
    paper quotes), "selection": mean ``eval_quality`` (what chose it)}; "n/a" where nothing is
    there. Choosing on the split that is reported would inflate the quoted number."""
    if df.empty or df["eval_quality"].isna().all():
        return {"cell": "n/a", "value": "n/a", "selection": "n/a"}
    sign = 1 if spec(df["selection_metric"].iloc[0]).higher_is_better else -1  # -1: e.g. held-out NLL
    means = sign * df.groupby(by, dropna=False)["eval_quality"].mean().dropna()
    key = means.idxmax()
    key = key if isinstance(key, tuple) else (key,)
    label = ", ".join(str(k) for k in key)
    ties = int((means == means.max()).sum()) - 1  # an argmax among equals names one of them: say so
    if ties:
        label += f", tied on the selection split with {ties} other cell{'s' if ties > 1 else ''}"
    return {"cell": label, "value": cell(matching(df, **dict(zip(by, key)))["test_quality"], fmt_spec) or "n/a",
            "selection": fmt(sign * float(means.max()), fmt_spec)}


def ratio(a: pd.Series, b: pd.Series) -> str:
    """mean(a) / mean(b) as "1.23×", or "n/a"."""
    a, b = a.dropna(), b.dropna()
    return fmt(a.mean() / b.mean(), ".2f") + "×" if len(a) and len(b) and b.mean() else "n/a"


def cell_of(rows: pd.DataFrame, metric: str) -> str:
    """Mean ± 95 % t-interval over seeds of one metric, or "n/a"."""
    return (cell(rows[metric].astype(float), ".3f") or "n/a") if metric in rows and len(rows) else "n/a"


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    # pandoc sizes the columns of a wide pipe table by the dashes of this line: each column gets at least
    # its longest unbreakable word (a narrower cell overflows into the next in the PDF), long text at most 24
    def width(values: list[str]) -> int:
        longest_word = max(len(w) for v in values for w in (v.split() or [""]))
        return max(3, longest_word + 2, min(24, max(len(v) for v in values)))
    widths = [width([c] + [str(v) for v in df[col]]) for c, col in zip(cols, df.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("-" * w for w in widths) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def not_drawn(ref: str, caption: str, why: str) -> str:
    """Stands in for a figure or table these outputs cannot give (a partial study), so that the
    paper's ``@ref`` resolves to a numbered note instead of Quarto's "?@ref": a cross-reference
    div, which Quarto numbers as a figure or table whatever it holds, its last paragraph the
    caption (quarto.org/docs/authoring/cross-references-divs.html)."""
    return f":::: {{#{ref}}}\n::: {{.callout-note}}\n{why}\n:::\n\n{caption} — not drawn from these outputs.\n::::\n"


def table_or_note(table: pd.DataFrame, ref: str, caption: str, detail: str, why: str) -> str:
    """``table`` under its caption (``caption`` then ``detail``), or, without rows, :func:`not_drawn`'s note."""
    if not len(table):
        return not_drawn(ref, caption, why)
    return markdown_table(table) + f"\n: {caption}{detail} {{#{ref}}}\n"


def _metric_spec(metric: str, task: str) -> tuple[str, str]:
    """(column name, format) of a metric; `test_quality` / `eval_quality`: the task's key metric on that split
    (a JSONL task's: its preference runs')."""
    if metric in ("test_quality", "eval_quality"):
        selection = key_metric(task, preference=True)
        metric = report_twin(selection) if metric == "test_quality" else selection
    row = spec(metric)
    return row.label, row.format


HEADERS = {"reference_kind": "reference", "sft_objective": "SFT objective", "sft_lr_scale": "SFT learning rate",
           "train_size": "train fraction", "max_steps": "steps", "beta": "β", "tuning": "fine-tuning",
           "starting_model": "starting model", "prompt_format": "prompt format"}


def summary_table(df: pd.DataFrame, experiment: str, task: str) -> pd.DataFrame:
    """Mean ± 95 % t-interval across seeds of each cell of one experiment's grid, for one task,
    on the report split."""
    declared = EXPERIMENTS.get(experiment)
    sub = matching(df, experiment=experiment, task=task)
    if declared is None:
        return grid_table(sub, ["method", "tuning"], ["test_quality", IRW], task)
    sub = declared.rows(sub) if declared.rows is not None and len(sub) else sub
    return grid_table(sub, list(declared.cells), list(declared.metrics), task)


def grid_table(sub: pd.DataFrame, keys: list[str], metrics: list[str], task: str) -> pd.DataFrame:
    """One row per cell of ``keys`` (seeds are its replicates): each metric's mean ± 95 %
    t-interval, and the number of seeds. Keys that no run sets are left out."""
    keys = [k for k in keys if k != "task" and k in sub and sub[k].astype(str).ne("").any()]
    rows = []
    for values, g in sub.groupby(keys, sort=True, dropna=False):  # a list of keys: values is a tuple
        row = dict(zip(keys, values))
        for m in metrics:
            if m in g and g[m].notna().any():
                name, spec = _metric_spec(m, task)
                row[name] = cell(g[m].astype(float), spec)
        row["seeds"] = int(g["seed"].nunique())
        rows.append(row)
    table = pd.DataFrame(rows)
    cols = keys + [c for c in table.columns if c not in keys and c != "seeds"] + ["seeds"]
    return table[cols].fillna("").rename(columns=HEADERS) if len(table) else table


EFFECTS = {  # name: (description, treatment rows, control rows, keys to pair on)
    "staged_vs_sft": ("staged (SFT→DPO) − SFT", ("03_staged", None), ("01_sft", None), ["task", "lora_r", "seed"]),
    "dpo_vs_sft": ("DPO alone − SFT", ("02_dpo", None), ("01_sft", None), ["task", "lora_r", "seed"]),
    "lora_vs_fft": ("LoRA − FFT (SFT, DPO and staged runs)", (Q1_EXPERIMENTS, "lora"),
                    (Q1_EXPERIMENTS, "fft"), ["experiment", "task", "seed"]),
}


def _effect_rows(df: pd.DataFrame, treat, ctrl, keys) -> pd.DataFrame:
    """The pairs of treatment and control runs that share ``keys``; ``diff``: their difference."""
    def pick(experiments, tuning):
        sub = runs_of(df, *((experiments,) if isinstance(experiments, str) else experiments))
        if tuning is None:
            return sub
        return sub[sub["lora_r"] > 0] if tuning == "lora" else sub[sub["lora_r"] == 0]
    t, c = (pick(*treat), pick(*ctrl)) if len(df) else (df, df)
    if t.empty or c.empty:
        return pd.DataFrame(columns=["task", "seed", "diff"])
    pairs = t.merge(c, on=keys, suffixes=("", "_ctrl"))
    pairs["diff"] = pairs["test_quality"] - pairs["test_quality_ctrl"]
    return pairs


def effect_text(m: float, lo: float, hi: float, pairs: int, seeds: int, spec: str) -> str:
    """How the paper's text quotes an effect: the mean paired difference and its t-interval."""
    count = f"{pairs} pair{'s' if pairs != 1 else ''}, {seeds} seed{'s' if seeds != 1 else ''}"
    if pairs == 0:
        return "n/a (no paired runs)"
    if seeds < 2:
        return f"{fmt(m, spec, True)} ({count}: no interval, it needs ≥ 2 seeds)"
    return f"{fmt(m, spec, True)} (95% t-interval over seeds {fmt(lo, spec, True)} to {fmt(hi, spec, True)}; {count})"


def effects(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Paired effects (mean difference in the task's report metric) with t-intervals over seeds."""
    rows, numbers = [], {}
    for name, (desc, treat, ctrl, keys) in EFFECTS.items():
        pairs = _effect_rows(df, treat, ctrl, keys)
        numbers[name] = {}
        for task in sorted(TASK_METRIC):
            sub = pairs[pairs["task"] == task].dropna(subset=["diff"])
            by = "method" if name == "lora_vs_fft" else "tuning"
            strata = [("all", sub), *(sub.groupby(by, sort=True) if len(sub) else ())]
            metric, spec = _metric_spec("test_quality", task)
            for label, g in strata:
                m, lo, hi, n, seeds = paired_t(g["diff"], g["seed"])
                if label == "all":
                    numbers[name][task] = {"mean": fmt(m, spec, True), "low": fmt(lo, spec, True),
                                           "high": fmt(hi, spec, True), "n": n, "seeds": seeds,
                                           "text": effect_text(m, lo, hi, n, seeds, spec)}
                if n:
                    ci = f"[{fmt(lo, spec, True)}, {fmt(hi, spec, True)}]" if seeds > 1 else "n/a (1 seed)"
                    rows.append({"comparison": desc, "task": task, "metric": metric,
                                 "runs": "pooled" if label == "all" else label, "difference": fmt(m, spec, True),
                                 "95% t-interval": ci, "pairs": n, "seeds": seeds})
    columns = ["comparison", "task", "metric", "runs", "difference", "95% t-interval", "pairs", "seeds"]
    return pd.DataFrame(rows, columns=columns), numbers


SETTINGS = [("model", "model"), ("max_steps", "steps"), ("batch_size", "batch"), ("learning_rate", "learning rate"),
            ("lora_r", "LoRA r"), ("lora_alpha", "LoRA α"), ("beta", "β"), ("train_size", "train fraction"),
            ("max_train_examples", "max train examples"), ("max_eval_examples", "max selection examples"),
            ("max_test_examples", "max test examples"), ("seed", "seeds")]


def values_text(series: pd.Series) -> str:
    vals = sorted(series.dropna().unique(), key=lambda v: (isinstance(v, str), v))
    return ", ".join(format(v, "g") if isinstance(v, (int, float, np.number)) else str(v) for v in vals)


def settings_table(df: pd.DataFrame) -> pd.DataFrame:
    """The distinct values of the main settings in each experiment's finished runs."""
    return pd.DataFrame([{"experiment": exp, "runs": len(g), "objectives": values_text(g["objective"]),
                          **{label: values_text(g[key]) for key, label in SETTINGS if key in g}}
                         for exp, g in df.groupby("experiment", sort=True)])


OPTION_LABELS = {"label_smoothing": "ε", "simpo_gamma": "γ", "cpo_alpha": "α", "desirable_weight": "λ_D",
                 "undesirable_weight": "λ_U"}


def operating_points(df: pd.DataFrame) -> pd.DataFrame:
    """Each preference objective's β and options as its runs used them (from params.yaml), outside
    the β sweep of 04 (which varies β on purpose). Defaults and their sources: prefnb/objectives.py."""
    from prefnb.config import PREFERENCE_OBJECTIVES
    from prefnb.objectives import option_names

    runs = df[(df["objective"] != "sft") & (df["experiment"] != "04_reference_strength")] if len(df) else df
    rows = []
    for objective in [o for o in PREFERENCE_OBJECTIVES if len(runs) and o in set(runs["objective"])]:
        g = runs[runs["objective"] == objective]
        options = [f"{OPTION_LABELS.get(name, name)} = {values_text(g[name])}" for name in option_names(objective)
                   if name in g and g[name].notna().any()]
        rows.append({"objective": objective, "β": values_text(g["beta"]), "options": "; ".join(options) or "none",
                     "runs": len(g)})
    return pd.DataFrame(rows, columns=["objective", "β", "options", "runs"])

