"""Statistics and tables of the runs table: mean ± 95 % CI across seeds, paired effect sizes.

A cell's CI is the t-interval of the mean over seeds (the seeds are the replicates); an
effect is the mean of paired differences (same task, tuning and seed) with a 95 %
percentile-bootstrap CI over the pairs (2,000 resamples, fixed seed: reproducible).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

TASK_METRIC = {"paraphrase": "eval/accuracy", "sonnets": "eval/chrf"}
METRIC_LABELS = {
    "eval/accuracy": "accuracy", "eval/f1": "F1", "eval/chrf": "chrF", "eval/chrf_full": "chrF (whole sonnet)",
    "eval/implicit_reward_accuracy": "implicit-reward acc.", "eval/loss": "held-out NLL",
    "train/seconds": "train time (s)", "train/tokens_per_second": "tokens/s", "peak_memory_mib": "peak memory (MiB)",
}
METRIC_FORMAT = {"eval/chrf": ".1f", "eval/chrf_full": ".1f", "train/seconds": ".1f",
                 "train/tokens_per_second": ".0f", "peak_memory_mib": ".0f"}
SCENARIOS = {"after_sft": "after SFT", "no_sft": "no SFT", "instruct": "instruction-tuned start"}
# Per experiment: the columns that identify a cell (seeds are its replicates) and the metrics shown.
QUALITY = ["quality", "eval/implicit_reward_accuracy"]
SUMMARY = {
    "01_sft": (["task", "tuning"], ["quality", "eval/f1", "eval/chrf_full"]),
    "02_dpo": (["task", "tuning"], ["quality", "eval/f1", "eval/chrf_full", "eval/implicit_reward_accuracy"]),
    "03_staged": (["task", "tuning"], ["quality", "eval/f1", "eval/chrf_full", "eval/implicit_reward_accuracy"]),
    "04_reference_strength": (["task", "reward", "reference_kind", "beta"], QUALITY),
    "05_lora_vs_fft": (["task", "tuning", "max_steps"],
                       ["quality", "train/seconds", "train/tokens_per_second", "peak_memory_mib"]),
    "06_dpo_variants": (["task", "scenario", "objective", "train_size"], QUALITY),
    "07_sft_objectives": (["task", "stage", "sft_objective", "sft_lr_scale"], QUALITY),
}
DEFAULT_SUMMARY = (["task", "method", "tuning"], QUALITY)
# t_{0.975, df} for df = 1..30 (no scipy dependency); 1.96 beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------
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


def bootstrap_ci(diffs, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of paired differences; percentile bootstrap, 95 %."""
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if len(d) == 1:
        return float(d[0]), float("nan"), float("nan"), 1
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi), len(d)


def fmt(x: float, spec: str = ".3f", signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, ("+" if signed else "") + spec)


def cell(values, spec: str) -> str:
    m, h, n = mean_ci(values)
    if n == 0:
        return ""
    return f"{fmt(m, spec)} ± {fmt(h, spec)}" if n > 1 else f"{fmt(m, spec)} (1 seed)"


# ---------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------
def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def _metric_spec(metric: str, task: str) -> tuple[str, str]:
    """(column name, format) of a metric; `quality` is the task's key metric."""
    name = TASK_METRIC.get(task, "eval/implicit_reward_accuracy") if metric == "quality" else metric
    return METRIC_LABELS.get(name, name), METRIC_FORMAT.get(name, ".3f")


HEADERS = {"reference_kind": "reference", "sft_objective": "SFT objective", "sft_lr_scale": "SFT learning rate",
           "train_size": "train fraction", "max_steps": "steps", "beta": "β", "tuning": "fine-tuning"}


def summary_table(df: pd.DataFrame, experiment: str, task: str) -> pd.DataFrame:
    """Mean ± 95 % CI across seeds of each cell of one experiment's grid, for one task."""
    keys, metrics = SUMMARY.get(experiment, DEFAULT_SUMMARY)
    sub = df[(df["experiment"] == experiment) & (df["task"] == task)]
    if experiment == "04_reference_strength":  # its SFT runs are the stronger reference, not sweep cells
        sub = sub[sub["method"] != "SFT"]
    keys = [k for k in keys if k != "task" and k in sub and sub[k].astype(str).ne("").any()]
    rows = []
    for values, g in sub.groupby(keys, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
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
    "lora_vs_fft": ("LoRA − FFT (SFT, DPO and staged runs)", (("01_sft", "02_dpo", "03_staged"), "lora"),
                    (("01_sft", "02_dpo", "03_staged"), "fft"), ["experiment", "task", "seed"]),
}


def _effect_rows(df: pd.DataFrame, treat, ctrl, keys) -> pd.DataFrame:
    def pick(spec):
        exps, tuning = spec
        exps = (exps,) if isinstance(exps, str) else exps
        sub = df[df["experiment"].isin(exps)]
        if tuning == "lora":
            sub = sub[sub["lora_r"] > 0]
        elif tuning == "fft":
            sub = sub[sub["lora_r"] == 0]
        return sub
    t, c = pick(treat), pick(ctrl)
    if t.empty or c.empty:
        return pd.DataFrame()
    pairs = t.merge(c, on=keys, suffixes=("", "_ctrl"))
    pairs["diff"] = pairs["quality"] - pairs["quality_ctrl"]
    return pairs


def effects(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Paired effect sizes (mean difference in the task metric) with bootstrap CIs."""
    rows, numbers = [], {}
    for name, (desc, treat, ctrl, keys) in EFFECTS.items():
        pairs = _effect_rows(df, treat, ctrl, keys)
        numbers[name] = {}
        for task in sorted(TASK_METRIC):
            sub = pairs[pairs["task"] == task] if len(pairs) else pairs
            strata = [("all", sub)]
            if len(sub):
                by = "method" if name == "lora_vs_fft" else "tuning"
                strata += [(lab, g) for lab, g in sub.groupby(by, sort=True)]
            for label, g in strata:
                m, lo, hi, n = bootstrap_ci(g["diff"] if len(g) else [])
                seeds = int(g["seed"].nunique()) if len(g) else 0
                if seeds < 2:  # pairs from one seed are not replicates: no interval
                    lo = hi = float("nan")
                _, spec = _metric_spec("quality", task)
                count = f"{n} pair{'s' if n != 1 else ''}, {seeds} seed{'s' if seeds != 1 else ''}"
                text = ("n/a (no paired runs)" if n == 0 else
                        f"{fmt(m, spec, True)} ({count}: no CI, it needs ≥ 2 seeds)" if seeds < 2 else
                        f"{fmt(m, spec, True)} (95% CI {fmt(lo, spec, True)} to {fmt(hi, spec, True)}; {count})")
                if label == "all":
                    numbers[name][task] = {"mean": fmt(m, spec, True), "low": fmt(lo, spec, True),
                                           "high": fmt(hi, spec, True), "n": n, "seeds": seeds, "text": text}
                if n:
                    ci = f"[{fmt(lo, spec, True)}, {fmt(hi, spec, True)}]" if seeds > 1 else "n/a (1 seed)"
                    rows.append({"comparison": desc, "task": task, "metric": _metric_spec("quality", task)[0],
                                 "runs": "pooled" if label == "all" else label, "difference": fmt(m, spec, True),
                                 "95% CI": ci, "pairs": n, "seeds": seeds})
    columns = ["comparison", "task", "metric", "runs", "difference", "95% CI", "pairs", "seeds"]
    return pd.DataFrame(rows, columns=columns), numbers


SETTINGS = [("model", "model"), ("max_steps", "steps"), ("batch_size", "batch"), ("learning_rate", "learning rate"),
            ("lora_r", "LoRA r"), ("lora_alpha", "LoRA α"), ("beta", "β"), ("train_size", "train fraction"),
            ("max_train_examples", "max train examples"), ("max_eval_examples", "max eval examples"),
            ("seed", "seeds")]


def _values(series: pd.Series) -> str:
    vals = sorted(series.dropna().unique(), key=lambda v: (isinstance(v, str), v))
    return ", ".join(format(v, "g") if isinstance(v, (int, float, np.number)) else str(v) for v in vals)


def settings_table(df: pd.DataFrame) -> pd.DataFrame:
    """The distinct values of the main settings in each experiment's finished runs."""
    rows = []
    for exp, g in df.groupby("experiment", sort=True):
        row = {"experiment": exp, "runs": len(g), "objectives": _values(g["objective"])}
        row.update({label: _values(g[key]) for key, label in SETTINGS if key in g})
        rows.append(row)
    return pd.DataFrame(rows)
