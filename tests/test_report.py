"""The report layer on synthetic run directories: table, tables, numbers, figures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from prefnb.config import RunParams
from prefnb.rundir import mark_finished


def _write_run(root: Path, seed_rng: random.Random, *, finished: bool = True, labels: dict | None = None,
               **overrides) -> Path:
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
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "manifest.json").write_text(json.dumps({"device": "cpu:x86_64 (2 threads)", "code_version": "0.1.0"}))
    if labels:
        (run_dir / "labels.json").write_text(json.dumps(labels))
    if finished:
        mark_finished(run_dir)
    return run_dir


def make_fake_outputs(root: Path, seeds=(0, 1)) -> Path:
    """A small but complete synthetic study: every experiment, both tasks, two seeds."""
    rng = random.Random(0)
    sft = {}
    for seed in seeds:
        for task in ("paraphrase", "sonnets"):
            for lora_r in (0, 16):
                sft[task, lora_r, seed] = _write_run(root, rng, experiment="01_sft", task=task, lora_r=lora_r,
                                                     seed=seed)
                _write_run(root, rng, experiment="02_dpo", task=task, lora_r=lora_r, seed=seed, objective="dpo")
                _write_run(root, rng, experiment="03_staged", task=task, lora_r=lora_r, seed=seed, objective="dpo",
                           init_from=str(sft[task, lora_r, seed]))
            start = str(sft[task, 0, seed])
            for beta in (0.01, 1.0):
                for ref in ("policy", "none", "prior", "gpt2-stronger"):
                    _write_run(root, rng, experiment="04_reference_strength", task=task, seed=seed, objective="dpo",
                               beta=beta, reference=ref, init_from=start)
            for lora_r in (0, 4, 64):
                for steps in (50, 100):
                    _write_run(root, rng, experiment="05_lora_vs_fft", task=task, seed=seed, lora_r=lora_r,
                               max_steps=steps)
            for objective in ("dpo", "simpo"):
                for scenario, extra in (("after_sft", {"init_from": start}), ("no_sft", {}),
                                        ("instruct", {"model": "tiny-instruct"})):
                    for size in (0.25, 1.0):
                        _write_run(root, rng, experiment="06_dpo_variants", task=task, seed=seed, objective=objective,
                                   train_size=size, labels={"scenario": scenario}, **extra)
            for loss in ("kl", "chi2"):
                for lr in (5e-5, 1.25e-5):
                    parent = _write_run(root, rng, experiment="07_sft_objectives", task=task, seed=seed,
                                        sft_loss=loss, learning_rate=lr)
                    _write_run(root, rng, experiment="07_sft_objectives", task=task, seed=seed, objective="dpo",
                               init_from=str(parent))
    # an unfinished run (no COMPLETE marker) must not appear anywhere
    _write_run(root, rng, finished=False, experiment="01_sft", task="paraphrase", seed=99)
    return root


@pytest.fixture(scope="module")
def fake_outputs(tmp_path_factory) -> Path:
    import prefnb.figures

    prefnb.figures.N_BOOT = 100  # fewer bootstrap resamples: same figures, faster test
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
    assert df["quality"].notna().all()


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
    assert "95% CI" in nums["effects"]["staged_vs_sft"]["paraphrase"]["text"]  # 2 seeds
    assert yaml.safe_load((report / "_variables.yml").read_text()) == nums
    effects = (report / "tables" / "effects.md").read_text()
    assert "staged (SFT→DPO) − SFT" in effects and "LoRA − FFT" in effects
    assert "±" in (report / "tables" / "01_sft-paraphrase.md").read_text()
    assert "{#fig-methods}" in (report / "sections" / "03_staged.md").read_text()


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
