"""The benchmark harness: FLOP counts, targets, the results page, and that prefnb and TRL
really do the same work (same batches, same losses) when run side by side."""

import json

import pytest
import torch

from benchmarks import markdown, targets
from benchmarks.work import Work, matmul_parameters, training_flops


@pytest.mark.parametrize("size", [dict(n_layer=2, n_head=4, n_embd=64, vocab_size=384), {}])  # tiny, GPT-2 124M
def test_matmul_parameters_are_the_model_minus_position_embeddings(size):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**size)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    total = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert matmul_parameters(config.to_dict()) == total - model.transformer.wpe.weight.numel()


def test_matmul_parameters_of_smollm2_are_the_model_with_its_tied_head_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.work import SMOLLM2_135M

    config = LlamaConfig(**SMOLLM2_135M)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # the tied head counted once; RoPE has no parameters
    assert matmul_parameters(config.to_dict()) == total and 134e6 < total < 135e6


def test_training_flops_add_6n_per_token_and_quadratic_attention():
    config = dict(n_layer=2, n_embd=8, vocab_size=10, n_positions=16)
    n = matmul_parameters(config)
    assert training_flops(config, [3, 5]) == 6 * n * 8 + 12 * 2 * 8 * (9 + 25)


def fake_report(kind, speed=None, memory=None, startup=None, mfu=None):
    """Measurements where prefnb has the given ratios to both TRL baselines."""
    rows = []
    for task in targets.TASKS:
        for objective in ("dpo", "sft"):
            for framework, factor in (("prefnb", 1.0), ("trl-default", None), ("trl-tuned", None)):
                rows.append({"task": task, "kind": objective, "framework": framework,
                             "steady_steps_per_second": 1.0 if factor else 1 / speed,
                             "pairs_per_second": 8.0 if factor else 8 / speed,
                             "tokens_per_second": 100.0 if factor else 100 / speed,
                             "peak_memory_bytes": 1.0 if factor else 1 / memory,
                             "first_step_seconds": 1.0 if factor else 1 / startup,
                             "mfu": mfu if factor else None})
    sweep = {"task": "paraphrase", "betas": [0.1] * 6, "concurrency": 1, "prefnb_seconds": 10.0,
             "trl_default_seconds": 10.0 * speed}
    return {"device": {"kind": kind}, "measurements": rows, "sweep": sweep}


def test_cpu_targets_are_met_or_missed_by_the_ratios():
    met = targets.evaluate(fake_report("cpu", speed=3.5, memory=0.5, startup=0.25))
    assert {t["status"] for t in met} == {"met"} and len(met) == 6
    missed = targets.evaluate(fake_report("cpu", speed=2.0, memory=0.5, startup=0.5))
    assert {t["status"] for t in missed} == {"missed"}


def test_targets_table_keeps_a_near_miss_visible_and_names_the_start_up_floor():
    report = fake_report("cpu", speed=2.999, memory=0.5, startup=0.5)
    report["floors"] = [{"task": task, "kind": kind, "first_step_seconds": 0.8}
                        for task in targets.TASKS for kind in ("dpo", "sft")]
    evaluated = targets.evaluate(report)
    table = markdown.targets_table(evaluated)
    assert "| 2.999 | ≥ 3.00 | missed |" in table  # not "3.00 … missed"
    startup = [t for t in evaluated if "first step" in t["target"]]
    assert startup and all(t["floor"] == pytest.approx(0.4) for t in startup)  # 0.8 s ÷ TRL's 2 s
    assert table.count("the start-up floor alone is 0.40: out of reach") == len(startup)


def test_gpu_targets_cover_throughput_memory_mfu_and_the_sweep():
    result = targets.evaluate(fake_report("gpu", speed=7.0, memory=0.5, startup=0.2, mfu=0.4))
    assert len(result) == 2 * 9 + 1 and {t["status"] for t in result} == {"met"}
    low_mfu = targets.evaluate(fake_report("gpu", speed=7.0, memory=0.5, startup=0.2, mfu=0.2))
    assert {t["target"] for t in low_mfu if t["status"] == "missed"} == {
        "DPO MFU (prefnb) (paraphrase)", "DPO MFU (prefnb) (sonnets)", "SFT MFU (prefnb) (paraphrase)",
        "SFT MFU (prefnb) (sonnets)"}


def test_results_page_marks_a_device_never_measured_as_owed(tmp_path):
    report = fake_report("cpu", speed=3.5, memory=0.5, startup=0.25)
    report.update(date="2026-01-01T00:00:00+00:00", versions={"torch": "x"}, work=[],
                  settings={"model": "tiny", "steps": 30, "batch_size": 8, "precision": "fp32", "betas": []},
                  targets=targets.evaluate(report))
    report["device"].update(name="test cpu", cores=2, threads=2, peak_flops=1e10, peak_flops_source="measured")
    (tmp_path / "cpu.json").write_text(json.dumps(report))
    page = markdown.results_page(tmp_path)
    gpu, cpu = page.split("## GPU", 1)[1].split("## CPU")
    owed = [line for line in gpu.splitlines() if line.rstrip(" |").endswith("| not measured")]
    # both GPU models owed: GPT-2 124M and SmolLM2-135M, 2 tasks x 9 targets + the sweep each
    assert "Not yet measured" in gpu and len(owed) == 2 * (2 * 9 + 1) and "| met |" not in gpu
    assert "`gpt2-124m`" in gpu and "`smollm2-135m`" in gpu
    assert "test cpu" in cpu and cpu.count("| met |") == 6 and "3.50×" in cpu


def test_prefnb_and_trl_see_the_same_batches_and_reach_the_same_losses():
    """Sonnets DPO on the tiny model in fp32, 10 steps logged one by one. Each step's loss
    depends on that step's batch and on every update before it, so per-step agreement between
    prefnb and TRL (while the losses themselves vary from step to step far more than the
    tolerance) holds only if the batches, reference, optimiser and schedule are the same.
    The remaining ~1e-3 differences come from Adam's first steps amplifying rounding."""
    from benchmarks.harness import measure

    work = Work(model="tiny", task="sonnets", kind="dpo", batch_size=2, steps=10, learning_rate=1e-4, log_every=1)
    ours, theirs = measure("prefnb", work), measure("trl-default", work)
    steps = [str(s) for s in range(1, 11)]
    assert sorted(ours["losses"], key=int) == sorted(theirs["losses"], key=int) == steps
    assert ours["losses"]["1"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference: log 2
    for step in steps:
        assert ours["losses"][step] == pytest.approx(theirs["losses"][step], rel=1e-2), step
    assert max(ours["losses"].values()) - min(ours["losses"].values()) > 0.05  # ≫ the 1e-2 relative tolerance
    assert ours["first_step_seconds"] > 0 and theirs["steady_steps_per_second"] > 0


def test_repeated_rounds_report_medians_and_each_rounds_ratio():
    from benchmarks.harness import median_result

    def rounds(*speeds):
        return median_result([{"steady_steps_per_second": s, "first_step_seconds": 2.0, "peak_memory_bytes": 10,
                               "losses": {"10": 0.69}} for s in speeds])

    ours, theirs = rounds(3.0, 4.0, 5.0), rounds(1.5, 1.0, 2.0)
    assert ours["steady_steps_per_second"] == 4.0 and ours["samples"]["steady_steps_per_second"] == [3.0, 4.0, 5.0]
    # 4 ÷ 1.5 of the medians; rounds: 3 ÷ 1.5, 4 ÷ 1, 5 ÷ 2
    assert markdown._ratio(ours, theirs, "steady_steps_per_second") == "2.67× (2.00–4.00)"
    assert markdown._ratio(rounds(3.0), rounds(1.5), "steady_steps_per_second") == "2.00×"  # one round: no range


def test_prefnb_side_evaluates_a_few_examples_of_each_held_out_split(tmp_path):
    """The benchmark times training: prefnb's end-of-run evaluation must stay a few examples on
    the selection AND the report split (uncapped, the Quora test split alone is 1,721 pairs)."""
    from benchmarks.work import prefnb_params

    work = Work(model="tiny", task="paraphrase", kind="sft", batch_size=2, steps=3)
    params = prefnb_params(work, output_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    assert 0 < params.max_eval_examples <= 8 and 0 < params.max_test_examples <= 8
