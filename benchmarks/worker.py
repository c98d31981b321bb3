"""One measurement in a fresh process: prefnb or a TRL baseline on one piece of work.

A fresh process per measurement, so that start-up (interpreter and imports included) and
peak memory belong to that measurement alone. The parent passes the wall-clock time at
which it spawned us; time to first step counts from there.

    python -m benchmarks.worker FRAMEWORK WORK_JSON OUT_JSON --spawned-at T [--beta B ...] [--cache-dir D]

prefnb takes several ``--beta`` values as one in-process sweep; a TRL baseline takes one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

FRAMEWORKS = ("prefnb", "trl-default", "trl-tuned", "floor")


def run_prefnb(work, *, betas: list[float], cache_dir: Path, spawned_at: float, scratch: Path) -> dict:
    """One run per β, in this process, as ``prefnb train --sweep beta=[…]`` runs them: runs
    after the first pay no imports and find the reference log-probs in the cache. The
    measurements are the first run's; ``run_seconds`` has every run's wall-clock."""
    from benchmarks.work import prefnb_params
    from prefnb.train import train

    results, run_seconds = [], []
    for i, beta in enumerate(betas):
        run_dir = scratch / f"run{i}"
        params = prefnb_params(work, output_dir=run_dir, cache_dir=cache_dir, beta=beta)
        entered = time.time()
        metrics = train(params, progress=False)
        run_seconds.append(time.time() - (spawned_at if i == 0 else entered))
        history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        results.append({
            "first_step_seconds": entered - spawned_at + metrics["train/first_step_seconds"],
            "steady_steps_per_second": metrics["train/steady_steps_per_second"],
            "peak_memory_bytes": metrics["train/peak_memory_bytes"],
            "losses": {row["step"]: row["loss"] for row in history if "loss" in row},
            "reference_seconds": metrics["reference/seconds"],
        })
    return {**results[0], "run_seconds": run_seconds,
            "reference_seconds_per_run": [r["reference_seconds"] for r in results]}


def run_trl(work, *, tuned: bool, beta: float, spawned_at: float, scratch: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from benchmarks.work import stream_rows
    from prefnb.timing import StepClock, peak_memory_bytes

    # The clock counts from the spawn, expressed on this process's perf_counter.
    clock = StepClock("cuda" if torch.cuda.is_available() else "cpu", work.steps,
                      started=time.perf_counter() - (time.time() - spawned_at))

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            clock.finish(state.global_step)

    model, tokenizer = load_model(work)
    dataset = Dataset.from_list(stream_rows(work))
    common = dict(
        output_dir=str(scratch / "trl"), per_device_train_batch_size=work.batch_size, max_steps=work.steps,
        learning_rate=work.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=work.log_every, save_strategy="no", report_to="none", disable_tqdm=True,
        train_sampling_strategy="sequential",  # the rows are already in prefnb's order
        bf16=work.precision == "bf16", use_cpu=not torch.cuda.is_available(), seed=0, max_length=work.max_length)
    if tuned:
        common["gradient_checkpointing"] = False
        common["use_liger_kernel"] = liger_available()
    if work.kind == "dpo":
        config = DPOConfig(beta=beta, precompute_ref_log_probs=tuned, **common)
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Clock()])
    else:
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    timing = clock.summary()
    return {
        "first_step_seconds": timing["first_step_seconds"],
        "steady_steps_per_second": timing["steady_steps"] / timing["steady_seconds"] if timing["steady_seconds"] else None,
        "peak_memory_bytes": peak_memory_bytes(clock.device),
        "losses": {row["step"]: row["loss"] for row in trainer.state.log_history if "loss" in row},
        "liger": bool(common.get("use_liger_kernel")),
    }


def run_floor(work, *, spawned_at: float) -> dict:
    """The least any transformers-based trainer does before its first step: the imports, the
    model and tokenizer, the rows, and one plain forward + backward + AdamW step on the first
    batch (no trainer, no reference). Time to first step below this is out of reach."""
    import torch

    from benchmarks.work import stream_rows

    model, tokenizer = load_model(work)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    rows = stream_rows(work)[: work.batch_size]
    texts = [r["prompt"] + r.get("chosen", r.get("completion", "")) for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=work.learning_rate)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"first_step_seconds": time.time() - spawned_at}


def load_model(work):
    """The work's model (fp32 weights) and tokenizer, as the baselines load them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.work import model_dir

    path = model_dir(work.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


def liger_available() -> bool:
    """Liger's Triton kernels need CUDA and the `liger-kernel` package."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def main(argv=None) -> int:
    from benchmarks.work import Work

    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("framework", choices=FRAMEWORKS)
    parser.add_argument("work", help="a Work as JSON")
    parser.add_argument("out", type=Path)
    parser.add_argument("--spawned-at", type=float, required=True)
    parser.add_argument("--beta", type=float, nargs="+", default=[0.1])
    parser.add_argument("--cache-dir", type=Path, default=None, help="prefnb's reference cache (default: a fresh one)")
    args = parser.parse_args(argv)
    work = Work.from_json(args.work)
    scratch = Path(tempfile.mkdtemp(prefix="prefnb-bench-"))
    try:
        if args.framework == "floor":
            result = run_floor(work, spawned_at=args.spawned_at)
        elif args.framework == "prefnb":
            result = run_prefnb(work, betas=args.beta, cache_dir=args.cache_dir or scratch / "cache",
                                spawned_at=args.spawned_at, scratch=scratch)
        elif len(args.beta) == 1:
            result = run_trl(work, tuned=args.framework == "trl-tuned", beta=args.beta[0], spawned_at=args.spawned_at,
                             scratch=scratch)
        else:
            parser.error(f"{args.framework} takes one --beta (a TRL run is one process)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["seconds"] = time.time() - args.spawned_at
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
