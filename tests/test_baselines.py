"""00_baselines: the starting model evaluated untrained, and the majority class."""

from collections import Counter

from prefnb import baselines
from prefnb.config import resolve_params
from prefnb.data import load_task


def test_zero_shot_writes_both_splits_and_the_majority_class(tmp_path, real_data_dir):
    params = resolve_params([("test", {"model": "tiny", "task": "paraphrase", "max_eval_examples": 16,
                                       "max_test_examples": 16, "output_dir": str(tmp_path / "run"),
                                       "experiment": "00_baselines"})])
    metrics = baselines.zero_shot(params)
    task = load_task(params)
    majority = Counter(r["label"] for r in task.eval_rows)
    expected = max(majority.values()) / len(task.eval_rows)  # the training majority ("no") is dev's too
    assert metrics["eval/majority_accuracy"] == expected and metrics["eval/majority_f1"] == 0.0
    assert {"eval/accuracy", "eval/f1", "test/accuracy", "test/f1", "test/majority_accuracy"} <= set(metrics)
    assert "eval/implicit_reward_accuracy" not in metrics  # the model would be its own reference
    assert metrics["train/steps"] == 0
    for name in ("params.yaml", "metrics.json", "manifest.json", "history.jsonl"):
        assert (tmp_path / "run" / name).is_file()


def test_sonnets_have_no_majority_class(tmp_path):
    params = resolve_params([("test", {"model": "tiny", "task": "sonnets", "max_eval_examples": 2,
                                       "max_test_examples": 2, "max_new_tokens": 4, "output_dir": str(tmp_path / "r")})])
    metrics = baselines.zero_shot(params)
    assert {"eval/chrf", "eval/chrf_full", "test/chrf", "test/chrf_full"} <= set(metrics)
    assert not any("majority" in k for k in metrics)
