"""Adding an objective by the steps the README documents ("Adding an objective"), and only those."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.nn.functional as F

from prefnb import losses, objectives, train as train_mod
from prefnb.config import resolve_params


def toy(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
        chosen_lengths=None, rejected_lengths=None):
    """A squared hinge on the DPO log-ratio difference h: (1 − βh)₊², [B] each."""
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    per_pair = F.relu(1.0 - beta * (chosen - rejected)) ** 2
    return per_pair, beta * chosen.detach(), beta * rejected.detach()


def test_a_toy_preference_objective_added_by_the_documented_steps_trains(tmp_path, monkeypatch):
    # 1. its pure loss in prefnb/losses.py, named as the objective (importing losses.py then
    #    enters it in PREFERENCE_LOSSES, as it does for every objective of the table)
    monkeypatch.setattr(losses, "toy", toy, raising=False)
    monkeypatch.setitem(losses.PREFERENCE_LOSSES, "toy", toy)
    # 2. its row in prefnb/objectives.py: its default β (with the source, in a comment there)
    monkeypatch.setitem(objectives.OBJECTIVES, "toy", objectives.Objective(defaults={"beta": 0.5}))
    params = resolve_params([("test", {"model": "tiny", "objective": "toy", "max_train_examples": 8,
                                       "max_eval_examples": 4, "max_test_examples": 4, "batch_size": 4,
                                       "max_steps": 2, "log_every": 1, "max_length": 96, "eval_batch_size": 8,
                                       "output_dir": str(tmp_path / "toy"), "cache_dir": str(tmp_path / "cache")})])
    assert params.beta == 0.5 and params.is_preference and params.run_id().startswith("paraphrase-toy-")
    metrics = train_mod.train(params, progress=False)
    rows = [json.loads(line) for line in (Path(params.output_dir) / "history.jsonl").read_text().splitlines()]
    # At step 1 the policy is its reference: h = 0, so the loss is 1 exactly.
    assert rows[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and "eval/implicit_reward_accuracy" in metrics
