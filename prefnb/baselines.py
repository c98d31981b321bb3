"""Zero-shot baselines (experiment 00): a starting model's metrics untrained, and the majority class.

The run directory is a training run's without training (same files, same metric names, empty
``history.jsonl``). Implicit-reward accuracy is not reported: the model is its own reference.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from prefnb import data as data_lib
from prefnb import evaluate, models
from prefnb.config import RunParams, save_params
from prefnb.manifest import write_manifest
from prefnb.precompute import ADD_EOS, Encoders
from prefnb.prompts import apply_prompt_format
from prefnb.rundir import atomic_write_json, now_iso


def majority_metrics(task: data_lib.TaskData) -> dict[str, float]:
    """Paraphrase: accuracy and F1 of always answering the training split's majority label,
    on the selection (``eval/…``) and report (``test/…``) splits."""
    if task.task != "paraphrase":
        return {}
    answers = Counter(r["completion"].strip() for r in task.train_sft)
    majority = int(answers.most_common(1)[0][0] == data_lib.ANSWERS[True].strip())
    metrics = {}
    for split, rows in (("eval", task.eval_rows), ("test", task.test_rows)):
        labels = [int(r["label"]) for r in rows]
        if labels:
            metrics[f"{split}/majority_accuracy"] = labels.count(majority) / len(labels)
            metrics[f"{split}/majority_f1"] = evaluate.binary_f1([majority] * len(labels), labels)
    return metrics


def zero_shot(params: RunParams) -> dict[str, float]:
    """Evaluate the starting model (``model`` or ``init_from``) as it is, on the selection and
    the report split; write the run directory (the completion marker is the caller's, as for
    :func:`prefnb.train.train`). Training keys are ignored."""
    started, started_at = time.perf_counter(), now_iso()
    out_dir = params.resolved_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_params(params, out_dir / "params.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = data_lib.load_task(params)
    model, tokenizer = models.load_starting_model(params.model, params.init_from, params.seed)
    model.to(device).eval()
    task = apply_prompt_format(task, tokenizer, params.prompt_format)
    encoders = Encoders.of(tokenizer, params.max_length, ADD_EOS[params.task])
    eval_started = time.perf_counter()
    metrics: dict[str, float] = {}
    no_reference = (torch.zeros(0), torch.zeros(0))
    for name, rows in (("eval", task.eval_rows), ("test", task.test_rows)):
        split = evaluate.HeldOut(name, rows, [], no_reference)  # no pairs: no reference to rank against
        metrics.update(evaluate.run_evaluation(model, tokenizer, split, params, encoders, device))
    metrics.update(majority_metrics(task))
    _, total = models.count_parameters(model)
    metrics.update({"eval/seconds": time.perf_counter() - eval_started, "train/steps": 0,
                    "train/total_parameters": total, "run/seconds": time.perf_counter() - started})
    (out_dir / "history.jsonl").write_text("")
    atomic_write_json(out_dir / "metrics.json", metrics)
    write_manifest(out_dir / "manifest.json", params=params, task=task, device=device, started_at=started_at)
    return metrics
