"""The report layer on synthetic run directories: table, tables, numbers, figures."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml

from prefnb.config import RunParams
from prefnb.rundir import mark_finished


def _write_run(root: Path, seed_rng: random.Random, *, finished: bool = True, labels: dict | None = None,
               group: str | None = None, **overrides) -> Path:
    """A finished run directory; with ``group``, the study's record of it (its grid group and labels)."""
    params = RunParams(**overrides)
    run_dir = root / params.experiment / params.run_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    bonus = {"sft": 0.0, "dpo": 0.02}.get(params.objective, 0.01) + (0.03 if params.init_from else 0.0)
    bonus -= 0.02 if params.lora_r else 0.0
    metrics = {"best_step": 10, "train/loss": seed_rng.uniform(0.5, 1.0),
               "train/seconds": seed_rng.uniform(5, 10) * (0.9 if params.lora_r else 1.0) * params.max_steps / 100,
               "train/tokens_per_second": seed_rng.uniform(900, 1100),
               "train/peak_memory_bytes": int(seed_rng.uniform(300, 320) * 2**20 * (0.8 if params.lora_r else 1)),
               "reference/seconds": 0.5}
    if params.task == "paraphrase":
        metrics.update({"eval/accuracy": 0.6 + bonus + seed_rng.uniform(-0.02, 0.02),
                        "eval/f1": 0.55 + bonus + seed_rng.uniform(-0.02, 0.02)})
    else:
        metrics.update({"eval/chrf": 20 + 100 * bonus + seed_rng.uniform(-1, 1),
                        "eval/chrf_full": 30 + 100 * bonus + seed_rng.uniform(-1, 1)})
    metrics["eval/implicit_reward_accuracy"] = 0.5 + bonus + seed_rng.uniform(-0.05, 0.05)
    # the report split: the same runs scored on other examples (a little worse, other noise)
    for name in [k for k in metrics if k.startswith("eval/")]:
        scale = 100 if "chrf" in name else 1
        metrics["test/" + name[5:]] = metrics[name] - scale * (0.01 + seed_rng.uniform(-0.02, 0.02))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "manifest.json").write_text(json.dumps({"device": "cpu:x86_64 (2 threads)", "code_version": "0.1.0"}))
    if group:
        (run_dir / "study.json").write_text(json.dumps({"group": f"{params.experiment}/{group}",
                                                        "labels": labels or {}}))
    elif labels:
        (run_dir / "labels.json").write_text(json.dumps(labels))
    if finished:
        mark_finished(run_dir)
    return run_dir


def make_fake_outputs(root: Path, seeds=(0, 1)) -> Path:
    """A small but complete synthetic study: every experiment, both tasks, two seeds, each run
    with the grid group and labels the study would record."""
    rng = random.Random(0)
    sft = {}
    rewards = {"policy": "dpo", "none": "probability", "prior": "likelihood", "gpt2-stronger": "stronger_reference"}
    for seed in seeds:
        for task in ("paraphrase", "sonnets"):
            for lora_r in (0, 16):
                sft[task, lora_r, seed] = _write_run(root, rng, experiment="01_sft", task=task, lora_r=lora_r,
                                                     seed=seed, group="sft")
                _write_run(root, rng, experiment="02_dpo", task=task, lora_r=lora_r, seed=seed, objective="dpo",
                           group="dpo")
                _write_run(root, rng, experiment="03_staged", task=task, lora_r=lora_r, seed=seed, objective="dpo",
                           init_from=str(sft[task, lora_r, seed]), group="staged")
            start = str(sft[task, 0, seed])
            for beta in (0.01, 1.0):
                for ref in ("policy", "none", "prior", "gpt2-stronger"):
                    _write_run(root, rng, experiment="04_reference_strength", task=task, seed=seed, objective="dpo",
                               beta=beta, reference=ref, init_from=start, group="sweep",
                               labels={"reward": rewards[ref]})
            for lora_r in (0, 4, 64):
                for steps in (50, 100):
                    _write_run(root, rng, experiment="05_lora_vs_fft", task=task, seed=seed, lora_r=lora_r,
                               max_steps=steps, group="depth")
            for objective in ("dpo", "simpo"):
                for scenario, extra in (("after_sft", {"init_from": start}), ("no_sft", {}),
                                        ("instruct", {"model": "tiny-instruct"})):
                    for size in (0.25, 1.0):
                        _write_run(root, rng, experiment="06_dpo_variants", task=task, seed=seed, objective=objective,
                                   train_size=size, group="variants", labels={"scenario": scenario}, **extra)
            for loss in ("kl", "chi2"):
                for lr, scale in ((5e-5, 1.0), (1.25e-5, 0.25)):
                    parent = _write_run(root, rng, experiment="07_sft_objectives", task=task, seed=seed,
                                        sft_loss=loss, learning_rate=lr, group="sft",
                                        labels={"sft_loss": loss, "learning_rate_scale": scale})
                    _write_run(root, rng, experiment="07_sft_objectives", task=task, seed=seed, objective="dpo",
                               init_from=str(parent), group="dpo",
                               labels={"init_from.sft_loss": loss, "init_from.learning_rate_scale": scale})
    # an unfinished run (no COMPLETE marker) must not appear anywhere
    _write_run(root, rng, finished=False, experiment="01_sft", task="paraphrase", seed=99, group="sft")
    return root


@pytest.fixture(scope="module")
def fake_outputs(tmp_path_factory) -> Path:
    return make_fake_outputs(tmp_path_factory.mktemp("study") / "outputs")


def test_collect_runs_excludes_unfinished_and_derives_labels(fake_outputs):
    from prefnb.report import collect_runs

    df = collect_runs(fake_outputs)
    assert 99 not in set(df["seed"])
    assert (fake_outputs / "report" / "runs.csv").is_file() and (fake_outputs / "report" / "runs.parquet").is_file()
    by_exp = df.groupby("experiment")["method"].agg(set)
    assert by_exp["01_sft"] == {"SFT"} and by_exp["02_dpo"] == {"DPO"} and by_exp["03_staged"] == {"staged"}
    assert set(df["tuning"]) >= {"FFT", "LoRA r=16", "LoRA r=4", "LoRA r=64"}
    v = df[df["experiment"] == "06_dpo_variants"]
    assert set(v["scenario"]) == {"after SFT", "no SFT", "instruction-tuned start"}
    r = df[df["experiment"] == "04_reference_strength"]
    assert set(r["reward"]) == {"dpo", "probability", "likelihood"}
    assert {"SFT model", "stronger model"} <= set(r["reference_kind"])
    o = df[(df["experiment"] == "07_sft_objectives") & (df["stage"] == "after DPO")]
    assert set(o["sft_objective"]) == {"kl", "chi2"} and set(o["sft_lr_scale"]) == {"1×", "1/4×"}
    assert df["test_quality"].notna().all() and df["eval_quality"].notna().all()
    para = df[df["task"] == "paraphrase"]
    assert (para["test_quality"] == para["test/accuracy"]).all() and (para["eval_quality"] == para["eval/accuracy"]).all()


def test_build_report_writes_figures_tables_numbers(fake_outputs):
    from prefnb.figures import FIGURES
    from prefnb.report import build_report

    paths = build_report(fake_outputs)
    report = fake_outputs / "report"
    for f in FIGURES:
        for ext in ("png", "svg"):
            p = report / "figures" / f"{f.name}.{ext}"
            assert p in paths and p.stat().st_size > 1000, p
    nums = json.loads((report / "numbers.json").read_text())
    assert nums["profile"] == "smoke" and nums["is_smoke"] and nums["seeds"]["n"] == 2
    assert nums["runs"]["total"] == len(list(fake_outputs.glob("*/*/COMPLETE")))
    assert "95% t-interval over seeds" in nums["effects"]["staged_vs_sft"]["paraphrase"]["text"]  # 2 seeds
    assert yaml.safe_load((report / "_variables.yml").read_text()) == nums
    effects = (report / "tables" / "effects.md").read_text()
    assert "staged (SFT→DPO) − SFT" in effects and "LoRA − FFT" in effects
    table = (report / "tables" / "01_sft-paraphrase.md").read_text()
    assert "±" in table and "accuracy (test)" in table and "(selection)" not in table
    assert re.search(r'\{#fig-methods fig-alt="[^"]{40,}"\}', (report / "sections" / "03_staged.md").read_text())
    points = (report / "tables" / "operating_points.md").read_text()
    assert "| simpo |" in points and "{#tbl-operating-points}" in points and "| sft |" not in points


def test_report_is_deterministic_and_skips_missing_experiments(tmp_path, caplog):
    from prefnb.report import build_report, build_text_artifacts, collect_runs

    root = tmp_path / "outputs"
    rng = random.Random(1)
    _write_run(root, rng, experiment="01_sft", task="paraphrase", seed=0)
    with caplog.at_level("INFO"):
        paths = build_report(root)
    assert "figure beta skipped" in caplog.text
    assert (root / "report" / "figures" / "methods.png") in paths
    assert not (root / "report" / "figures" / "beta.png").exists()
    assert "No finished runs of `04_reference_strength`" in (root / "report" / "sections" /
                                                              "04_reference_strength.md").read_text()
    assert build_text_artifacts(collect_runs(root, save=False)) == build_text_artifacts(collect_runs(root, save=False))


def test_empty_outputs(tmp_path):
    from prefnb.report import build_report

    paths = build_report(tmp_path / "outputs")
    assert (tmp_path / "outputs" / "report" / "numbers.json") in paths
    assert json.loads((tmp_path / "outputs" / "report" / "numbers.json").read_text())["runs"]["total"] == 0


# ---------------------------------------------------------------------------------------
# selection split vs report split; intervals
# ---------------------------------------------------------------------------------------
def _table(rows):
    import pandas as pd

    from prefnb.report import derive_labels

    return derive_labels(pd.DataFrame(rows))


def test_best_cell_is_chosen_on_selection_split_and_quoted_on_report_split():
    """Cell A wins on eval/ (selection) but loses on test/: the paper must name A and quote
    A's test/ mean; an argmax on the reported split would pick B and inflate the number."""
    from prefnb.tables import best_cell

    rows = []
    for seed in (0, 1, 2):
        rows.append({"experiment": "04_reference_strength", "run_id": f"a{seed}", "task": "paraphrase", "seed": seed,
                     "objective": "dpo", "beta": 0.1, "eval/accuracy": 0.80, "test/accuracy": 0.60 + 0.01 * seed})
        rows.append({"experiment": "04_reference_strength", "run_id": f"b{seed}", "task": "paraphrase", "seed": seed,
                     "objective": "dpo", "beta": 1.0, "eval/accuracy": 0.70, "test/accuracy": 0.90})
    best = best_cell(_table(rows), ["beta"], ".3f")
    assert best["cell"] == "0.1" and best["selection"] == "0.800"
    # mean 0.61, t_{0.975,2} = 4.303, sd = 0.01 → half-width 4.303 * 0.01 / sqrt(3)
    assert best["value"] == f"0.610 ± {4.303 * 0.01 / 3 ** 0.5:.3f}"
    tie = [dict(r, **{"eval/accuracy": 0.8}) for r in rows]  # equal on selection: the text must say so
    assert best_cell(_table(tie), ["beta"], ".3f")["cell"] == "0.1, tied on the selection split with 1 other cell"


def test_effects_are_paired_t_intervals_over_seeds_averaged_within_seed():
    """Two pairs per seed (FFT and LoRA) pooled: average within the seed, t-interval over seeds."""
    from prefnb.tables import effects

    diffs = {(0, 0): 0.10, (0, 8): 0.30, (1, 0): 0.00, (1, 8): 0.20, (2, 0): 0.05, (2, 8): 0.15}
    rows = []
    for (seed, r), d in diffs.items():
        base = {"task": "paraphrase", "seed": seed, "lora_r": r, "eval/accuracy": 0.5}
        rows.append({**base, "experiment": "01_sft", "run_id": f"s{seed}{r}", "objective": "sft", "test/accuracy": 0.5})
        rows.append({**base, "experiment": "02_dpo", "run_id": f"d{seed}{r}", "objective": "dpo",
                     "test/accuracy": 0.5 + d})
    table, nums = effects(_table(rows))
    per_seed = [0.20, 0.10, 0.10]
    mean = sum(per_seed) / 3
    sd = (sum((x - mean) ** 2 for x in per_seed) / 2) ** 0.5
    half = 4.303 * sd / 3 ** 0.5
    got = nums["dpo_vs_sft"]["paraphrase"]
    assert got["n"] == 6 and got["seeds"] == 3
    assert (got["mean"], got["low"], got["high"]) == (f"{mean:+.3f}", f"{mean - half:+.3f}", f"{mean + half:+.3f}")
    assert "t-interval over seeds" in got["text"]
    # one seed: a mean, never an interval
    _, one = effects(_table([r for r in rows if r["seed"] == 0]))
    assert one["dpo_vs_sft"]["paraphrase"]["low"] == "n/a" and "no interval" in one["dpo_vs_sft"]["paraphrase"]["text"]
    assert "n/a (1 seed)" in effects(_table([r for r in rows if r["seed"] == 0]))[0]["95% t-interval"].tolist()


def test_figure_error_bars_are_the_tables_t_intervals(tmp_path):
    """A bar's error bar spans exactly mean ± t·s/√n over seeds (seaborn's default would be a
    bootstrap CI), after averaging runs that share a seed."""
    import matplotlib.pyplot as plt
    import numpy as np

    from prefnb.figures import FIGURES
    from prefnb.tables import mean_ci

    values = {0: 0.50, 1: 0.60, 2: 0.80}
    rows = [{"experiment": "01_sft", "run_id": f"r{seed}{k}", "task": "paraphrase", "seed": seed, "objective": "sft",
             "lora_r": 0, "max_steps": 10 + k, "eval/accuracy": 0.5, "test/accuracy": v + (0.05 if k else -0.05),
             "test/f1": 0.5} for seed, v in values.items() for k in (0, 1)]  # two runs per seed: mean = v
    df = _table(rows)
    fig_spec = next(f for f in FIGURES if f.name == "methods")
    fig = fig_spec.draw(fig_spec.select(df))
    m, h, _ = mean_ci(list(values.values()))
    # an error bar with caps is one line: cap, NaN, vertical bar, NaN, cap
    spans = [(np.nanmin(line.get_ydata()), np.nanmax(line.get_ydata())) for ax in fig.axes for line in ax.lines]
    assert any(np.allclose(span, (m - h, m + h)) for span in spans), spans
    plt.close(fig)


def test_findings_verdicts_are_read_from_the_interval():
    from prefnb.findings import verdict

    assert verdict((0.05, 0.01, 0.09, 6, 3), ".3f") == "positive, resolved at 3 seeds (interval above zero)"
    assert verdict((-0.05, -0.09, -0.01, 6, 3), ".3f") == "negative, resolved at 3 seeds (interval below zero)"
    assert verdict((0.01, -0.02, 0.04, 6, 3), ".3f") == "no difference resolved at 3 seeds"
    assert verdict((0.01, float("nan"), float("nan"), 2, 1), ".3f") == "+0.010 at 1 seed: no interval, no verdict"
    assert verdict((float("nan"),) * 3 + (0, 0), ".3f") == "no paired runs in these outputs"


def test_floor_is_00_baselines_where_it_ran_else_the_majority_class_of_the_data(tmp_path):
    from prefnb.findings import findings, floor
    from prefnb.report import collect_runs

    rng = random.Random(1)
    for seed in (0, 1):
        _write_run(tmp_path, rng, experiment="01_sft", task="paraphrase", seed=seed)
    df = collect_runs(tmp_path, save=False)
    calls = []
    from_data = floor(df, lambda rows: calls.append(len(rows)) or 0.5)["paraphrase"]
    assert calls == [2] and list(from_data["baseline"]) == ["majority class"]
    table, numbers = findings(df, {"paraphrase": from_data, "sonnets": from_data.iloc[0:0]})
    sft = df["test_quality"]
    assert numbers["sft_vs_majority"]["paraphrase"]["difference"] == f"{sft.mean() - 0.5:+.3f}"
    assert list(table["comparison"]) == ["SFT − majority class"]
    # what these runs cannot compare is named under the table, not silently dropped
    assert ["Q1", "staged (SFT→DPO) − SFT", "paraphrase"] in numbers["not_made"]
    assert ["Q2", "(reward, reference, β)", "sonnets"] in numbers["not_made"]
    from prefnb.findings import findings_markdown

    caption = findings_markdown(table, numbers["not_made"]).rsplit("\n: ", 1)[1]
    assert "Not made from these runs" in caption and "Q1 staged (SFT→DPO) − SFT (paraphrase, sonnets)" in caption
    assert "`--profile gpt2`" in caption and caption.rstrip().endswith("{#tbl-findings}")
    zero = _write_run(tmp_path, rng, experiment="00_baselines", task="paraphrase", seed=0, group="zero_shot",
                      labels={"starting_model": "base"})
    metrics = json.loads((zero / "metrics.json").read_text())
    (zero / "metrics.json").write_text(json.dumps({**metrics, "test/majority_accuracy": 0.6}))
    df = collect_runs(tmp_path, save=False)
    rows = floor(df, lambda rows: pytest.fail("00_baselines ran: the data is not read"))["paraphrase"]
    assert sorted(rows["baseline"]) == ["majority class", "zero-shot base model (tiny)"]
    assert rows.set_index("baseline").loc["majority class", "test_quality"] == 0.6


def test_a_real_model_paper_names_its_profile_model_and_which_weights():
    from prefnb.report import _profile_block

    block = _profile_block({"profile": "smollm2", "runs": {"total": 12}, "seeds": {"n": 3, "list": "0, 1, 2"},
                            "models": "smollm2-135m-instruct", "devices": "cuda", "is_smoke": False})
    assert "**smollm2** profile" in block and "`smollm2-135m-instruct`" in block
    assert "4-bit (Q4_1) GGUF quantisation of `HuggingFaceTB/SmolLM2-135M-Instruct`" in block
    assert "dequantised to float32" in block and "pipeline" not in block


def test_one_metrics_table_a_jsonl_sft_run_is_selected_and_summed_up_on_its_nll(tmp_path):
    """config.KEY_METRICS said eval/loss for a JSONL SFT run, tables.TASK_METRIC implicit-reward accuracy."""
    from prefnb.metrics import is_better, key_metric, spec
    from prefnb.report import collect_runs
    from prefnb.tables import best_cell

    run = _write_run(tmp_path, random.Random(2), experiment="08_mine", task="jsonl", data_path="x.jsonl")
    (run / "metrics.json").write_text(json.dumps({"eval/loss": 1.5, "test/loss": 1.7,
                                                  "eval/implicit_reward_accuracy": 0.9}))
    other = _write_run(tmp_path, random.Random(3), experiment="08_mine", task="jsonl", data_path="x.jsonl",
                       learning_rate=1e-4)
    (other / "metrics.json").write_text(json.dumps({"eval/loss": 1.2, "test/loss": 1.4}))
    df = collect_runs(tmp_path, save=False)
    assert set(df["selection_metric"]) == {"eval/loss"} and key_metric("jsonl", False) == "eval/loss"
    assert sorted(df["test_quality"]) == [1.4, 1.7]
    assert best_cell(df, ["learning_rate"], ".2f")["selection"] == "1.20"  # the lower NLL wins
    assert is_better("eval/loss", 1.0, 2.0) and not is_better("eval/accuracy", 0.5, 0.6)
    assert is_better("train/seconds", 1.0, 2.0) and spec("test/chrf").format == ".1f"


def test_every_experiment_ran_even_where_question_1_is_lora_only_on_one_task():
    """`ran_every_experiment` (the paper's "runs every experiment" text) is about the experiments;
    which tasks or fine-tuning methods question 1 covered are conditions of their own."""
    import pandas as pd

    from prefnb.experiments import EXPERIMENTS
    from prefnb.report import conditions

    df = pd.DataFrame([{"experiment": exp, "task": "sonnets", "lora_r": 16} for exp in EXPERIMENTS])
    meta = conditions(df)
    assert meta["ran_every_experiment"] and not meta["ran_lora_and_fft"] and not meta["ran_q1_paraphrase"]
