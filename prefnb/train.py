"""One training loop for every objective; the objective plugs in through `prefnb.plugins`.

Reads top to bottom: set up → prepare (reference log-probs, once) → loop → evaluate → write.
On accelerate: CPU, one GPU (bf16 autocast) or several (`accelerate launch`; each process takes
its slice of every global batch). The loop syncs with the host only every `log_every` steps
(and at the timing marks of `prefnb.timing`).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prefnb import data as data_lib
from prefnb import models, preflight
from prefnb.config import RunParams, save_params
from prefnb.evaluate import HeldOut, run_evaluation
from prefnb.manifest import write_manifest
from prefnb.plugins import plugin_for
from prefnb.precompute import ADD_EOS, Encoders, reference_logps
from prefnb.prompts import apply_prompt_format
from prefnb.metrics import is_better
from prefnb.rundir import atomic_write, atomic_write_json, now_iso
from prefnb.schedule import lr_scheduler, micro_batches
from prefnb.session import RunContext, Session
from prefnb.timing import StepClock, peak_memory_bytes, process_peak_rss_bytes, reset_peak_memory, synchronize

log = logging.getLogger(__name__)

STATE_DIR, CHECKPOINT_DIR = "state", "checkpoint"


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a missing dependency); the message says where."""


def train(params: RunParams, *, progress: bool = True, session: Session | None = None) -> dict[str, float]:
    """Train and evaluate one run into ``params.resolved_output_dir()``; return its metrics.

    ``session``: what the runs of one process share (none: a new one). The completion marker is
    not written here: the caller (CLI or study) writes it last.
    """
    started, started_at = time.perf_counter(), now_iso()  # before the imports: start-up counts them
    session = session or Session()
    run, task = _set_up(params, session)
    objective = plugin_for(run)
    n_train = objective.rows(task)
    # The micro-batches, fixed in advance: a pure function of (step, seed, rank).
    batches = micro_batches(range(params.max_steps * params.grad_accum_steps), n=n_train,
                            batch_size=params.batch_size, seed=params.seed, rank=run.accelerator.process_index,
                            world=run.accelerator.num_processes)
    # Reference log-probs: once, before training, so no reference forward runs in the loop.
    reference_started = time.perf_counter()
    objective.prepare(batches)
    selection, report = _held_out(run, task)
    reference_seconds = time.perf_counter() - reference_started

    state = RunState(run, selection)
    policy, optimizer, scheduler, (trainable, total) = _policy_and_optimizer(run, objective)
    state.resume(policy, optimizer, scheduler)
    clock = StepClock(run.device, params.max_steps, started=started)  # syncs at steps 1 and warm-up only
    loop_started, steps_at_start = time.perf_counter(), state.step
    _loop(state, objective, policy, optimizer, scheduler, batches, clock, n_train, progress)
    train_seconds = time.perf_counter() - loop_started - state.costs["eval"] - state.costs["checkpoint"]

    # Final evaluation; the report split, once, on the selected checkpoint: the final weights,
    # or the best checkpoint reloaded when an earlier evaluation won (what a later run's init_from gets).
    unwrapped = run.accelerator.unwrap_model(policy)
    final, _ = _evaluate_and_keep_best(state, unwrapped)
    reported = _report(state, unwrapped, report)
    tokens = int(run.accelerator.reduce(state.tokens_seen, "sum"))
    timing = clock.summary()
    result = {
        **state.best["metrics"],
        **reported,
        "best_step": state.best["step"],
        "final/" + params.key_metric: final.get(params.key_metric),
        "train/loss": _last_loss(state.history_path),
        "train/steps": state.step,
        "train/seconds": train_seconds,
        "train/tokens": tokens,
        "train/tokens_per_second": tokens / train_seconds if train_seconds > 0 and state.step > steps_at_start else 0.0,
        "train/first_step_seconds": timing["first_step_seconds"],
        "train/steady_steps_per_second": _rate(timing["steady_steps"], timing["steady_seconds"]),
        "train/steady_tokens_per_second": _rate(timing["steady_units"], timing["steady_seconds"]),
        "train/peak_memory_bytes": peak_memory_bytes(run.device, first_in_process=session.runs_started == 1),
        "train/process_peak_rss_bytes": process_peak_rss_bytes(),
        "eval/seconds": state.costs["eval"],
        "checkpoint/seconds": state.costs["checkpoint"],
        "train/trainable_parameters": trainable,
        "train/total_parameters": total,
        "reference/seconds": reference_seconds,
        "run/seconds": time.perf_counter() - started,
    }
    _write(run, task, result, started_at)
    return result


# --- set up → prepare
def _set_up(params: RunParams, session: Session) -> tuple[RunContext, data_lib.TaskData]:
    """Checks, accelerator, run directory, seeds, starting policy and tokeniser; the task data."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint-writing bars would drown the run's own progress
    out_dir = params.resolved_output_dir()
    cache_dir = Path(params.cache_dir) if params.cache_dir else out_dir.parent.parent / ".cache"
    # Values the data or machine cannot serve fail here, before anything is allocated; the
    # check loads the task data, which the run then uses.
    task = preflight.check(params, out_dir, cache_dir, session)
    bf16 = params.precision == "bf16" or (params.precision == "auto" and torch.cuda.is_available())
    try:
        accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no",
                                  gradient_accumulation_steps=params.grad_accum_steps)
    except ValueError as err:  # accelerate fixes mixed precision once per process
        raise TrainingError(f"precision '{params.precision}': this process already trained with another "
                            f"precision and accelerate cannot switch ({err}); restart the kernel or train in a "
                            "new process") from err
    session.runs_started += 1
    reset_peak_memory(accelerator.device)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_params(params, out_dir / "params.yaml")
    set_seed(params.seed)  # random, numpy and torch
    start_model, tokenizer = models.load_starting_model(params.model, params.init_from, params.seed, session)
    start_model.to(accelerator.device)
    task = apply_prompt_format(task, tokenizer, params.prompt_format)
    run = RunContext(params, session, accelerator, tokenizer, start_model,
                     start_identity=models.weights_identity(params.init_from or params.model, params.seed, session),
                     encoders=Encoders.of(tokenizer, params.max_length, ADD_EOS[params.task], session),
                     out_dir=out_dir, cache_dir=cache_dir)
    return run, task


def _held_out(run: RunContext, task: data_lib.TaskData) -> tuple[HeldOut, HeldOut]:
    """The selection and report splits with their pairs' reference log-probs (cached on disk)."""
    params = run.params
    with run.accelerator.main_process_first():
        selection, report = (HeldOut(name, rows, pairs, reference_logps(run, pairs, split=name))
                             for name, rows, pairs in (("eval", task.eval_rows, task.eval_pairs),
                                                       ("test", task.test_rows, task.test_pairs)))
        # A run started from an earlier one (SFT → DPO): also rank the report pairs against the
        # base model the chain started from (test/implicit_reward_accuracy_total).
        base = models.chain_base(params.init_from) if params.init_from else None
        if base and report.pairs and base[0] != params.reference:
            report.chain_base_reference = reference_logps(run, report.pairs, split="test", source=base)
    return selection, report


def _policy_and_optimizer(run: RunContext, objective):
    """The starting model, with fresh LoRA adapters when lora_r > 0, its AdamW and schedule,
    prepared by accelerate; and its (trainable, total) parameter counts."""
    params, policy = run.params, run.start_model
    if params.uses_lora:
        policy = models.add_lora(policy, r=params.lora_r, alpha=params.lora_alpha, dropout=params.lora_dropout,
                                 targets=params.lora_target_modules)
    if objective.drops_dropout:
        models.disable_dropout(policy)
    policy.train()
    counts = models.count_parameters(policy)
    log.info("policy: %s trainable of %s parameters", f"{counts[0]:,}", f"{counts[1]:,}")
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=params.learning_rate,
                                  weight_decay=params.weight_decay)
    # Stepped by hand once per optimiser step (accelerate would scale it by the number of processes).
    scheduler = lr_scheduler(optimizer, params.lr_schedule, warmup_steps=params.warmup_steps,
                             total_steps=params.max_steps)
    policy, optimizer = run.accelerator.prepare(policy, optimizer)
    return policy, optimizer, scheduler, counts


# --- the loop
@dataclass
class RunState:
    """What the loop carries from step to step, and a resumed run restores: the step, the best
    checkpoint so far, the running sums since the last history row, the costs kept out of
    train/seconds (evaluation and checkpoint writes, in seconds)."""

    # Saved with the state too, so that a resumed run logs the same history rows.
    LOOP_CARRY = ("sums", "n_since_log", "tokens_seen", "first_bad_step")

    run: RunContext
    selection: HeldOut
    step: int = 0
    best: dict = field(default_factory=lambda: {"metric": None, "value": None, "step": None, "metrics": {}})
    costs: dict = field(default_factory=lambda: {"eval": 0.0, "checkpoint": 0.0})
    sums: dict = field(default_factory=dict)
    n_since_log: int = 0
    tokens_seen: torch.Tensor | None = None    # device scalars: read at log steps only
    first_bad_step: torch.Tensor | None = None  # the first step with a non-finite loss, -1 while none

    def __post_init__(self):
        self.tokens_seen = torch.zeros((), dtype=torch.long, device=self.run.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.run.device)

    @property
    def history_path(self) -> Path:
        return self.run.out_dir / "history.jsonl"

    @property
    def state_path(self) -> Path:
        return self.run.out_dir / STATE_DIR / "state.pt"

    @property
    def main(self) -> bool:  # the main process: the one that writes files
        return self.run.accelerator.is_main_process

    def append_history(self, row: dict) -> None:
        with self.history_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def save(self, model, optimizer, scheduler) -> float:
        """Write ``state/state.pt``: everything exact resumption needs, of the weights only the
        trainable ones (LoRA: the adapters). Returns the seconds it took."""
        synchronize(self.run.device)
        started = time.perf_counter()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {"model": {k: v for k, v in model.state_dict().items() if k in trainable},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                 "step": self.step, "best": self.best, "loop": {name: getattr(self, name) for name in self.LOOP_CARRY}}
        atomic_write(self.state_path, lambda tmp: torch.save(state, tmp))
        seconds = time.perf_counter() - started
        self.costs["checkpoint"] += seconds
        return seconds

    def resume(self, policy, optimizer, scheduler) -> None:
        """Continue from ``state/state.pt`` where one was saved; keep the history up to its step."""
        if self.state_path.is_file():
            saved = torch.load(self.state_path, weights_only=False, map_location=self.run.device)
            self.run.accelerator.unwrap_model(policy).load_state_dict(saved["model"], strict=False)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            _set_rng_state(saved["rng"])
            self.step, self.best = saved["step"], saved["best"]
            for name, value in (saved["loop"] or {}).items():
                setattr(self, name, value)
            log.info("resumed from step %d", self.step)
        if self.main:
            lines = self.history_path.read_text().splitlines() if self.history_path.exists() else []
            kept = [line for line in lines if json.loads(line).get("step", 0) <= self.step] if self.step else []
            self.history_path.write_text("".join(line + "\n" for line in kept))


def _loop(state: RunState, objective, policy, optimizer, scheduler, batches, clock: StepClock, n_train: int,
          progress: bool) -> None:
    """Optimiser steps from ``state.step`` to max_steps; history rows every log_every steps,
    evaluations every eval_every, resumable states every save_every."""
    from tqdm.auto import tqdm

    params, accelerator = state.run.params, state.run.accelerator
    bar = tqdm(total=params.max_steps, initial=state.step, disable=not (progress and state.main),
               desc=params.run_id(), dynamic_ncols=True)
    while state.step < params.max_steps:
        for micro in range(params.grad_accum_steps):
            m = state.step * params.grad_accum_steps + micro
            with accelerator.accumulate(policy), accelerator.autocast():
                batch = objective.batch(m, batches[m])
                loss, metrics = objective.step(policy, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and params.max_grad_norm > 0:
                    metrics["grad_norm"] = accelerator.clip_grad_norm_(policy.parameters(), params.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.tokens_seen += batch["n_tokens"]
            for name, value in metrics.items():
                state.sums[name] = state.sums.get(name, 0) + value.detach().float() / params.grad_accum_steps
            # Record the first non-finite step on the device; it is read at the next log.
            state.first_bad_step.masked_fill_((state.first_bad_step < 0) & ~torch.isfinite(loss.detach()),
                                              state.step + 1)
        scheduler.step()
        state.step += 1
        state.n_since_log += 1
        bar.update(1)
        clock.step_done(state.step, state.tokens_seen)
        step, last = state.step, state.step == params.max_steps
        if step % params.log_every == 0 or last:
            _log_row(state, scheduler, n_train, bar)
        if params.eval_every and step % params.eval_every == 0 and not last:
            clock.exclude(_evaluate_and_keep_best(state, accelerator.unwrap_model(policy))[1])
        if params.save_every and step % params.save_every == 0 and not last and state.main:
            clock.exclude(state.save(accelerator.unwrap_model(policy), optimizer, scheduler))
    bar.close()
    clock.finish(state.step, state.tokens_seen)


def _log_row(state: RunState, scheduler, n_train: int, bar) -> None:
    """One history row: the mean of each metric since the last row; stop on a non-finite loss."""
    params, accelerator = state.run.params, state.run.accelerator
    bad = int(state.first_bad_step)  # the loop's one host sync, every log_every steps
    if bad >= 0:
        bar.close()
        raise TrainingError(f"loss became NaN/inf at step {bad} of run {params.run_id()}: lower learning_rate "
                            "or beta, or check the data; nothing was saved as finished")
    row = {"step": state.step, "epoch": state.step * params.batch_size * params.grad_accum_steps
           * accelerator.num_processes / n_train, "learning_rate": scheduler.get_last_lr()[0]}
    row.update({k: float(accelerator.reduce(v, "mean")) / state.n_since_log for k, v in state.sums.items()})
    state.sums, state.n_since_log = {}, 0
    bar.set_postfix(loss=f"{row['loss']:.4f}")
    if state.main:
        state.append_history(row)


# --- evaluate → write
def _evaluate_and_keep_best(state: RunState, model) -> tuple[dict, float]:
    """Evaluate on the selection split; save the checkpoint when the key metric improves (ties
    keep the earlier one). Adds the seconds spent to ``state.costs``; returns (metrics, seconds)."""
    if not state.main:
        return {}, 0.0
    run, params = state.run, state.run.params
    synchronize(run.device)  # queued training work belongs to training, not to this evaluation
    started = time.perf_counter()
    metrics = run_evaluation(model, run.tokenizer, state.selection, params, run.encoders, run.device)
    state.append_history({"step": state.step, **metrics})
    evaluated = time.perf_counter()
    state.costs["eval"] += evaluated - started
    value = metrics.get(params.key_metric, float("nan"))
    if is_better(params.key_metric, value, state.best["value"]):
        state.best.update(metric=params.key_metric, value=value, step=state.step, metrics=metrics)
        models.save_checkpoint(model, run.tokenizer, run.out_dir / CHECKPOINT_DIR, base_model=params.model,
                               base_init_from=params.init_from, seed=params.seed)
    state.costs["checkpoint"] += time.perf_counter() - evaluated
    return metrics, time.perf_counter() - started


def _report(state: RunState, model, report: HeldOut) -> dict[str, float]:
    """The report split's metrics, scored once on the selected checkpoint (main process only)."""
    run = state.run
    if not (state.main and report.rows):
        return {}
    selected = model if state.best["step"] == state.step else models.load_checkpoint(run.out_dir)[0].to(run.device)
    report_started = time.perf_counter()
    reported = run_evaluation(selected, run.tokenizer, report, run.params, run.encoders, run.device)
    state.costs["eval"] += time.perf_counter() - report_started
    return reported


def _write(run: RunContext, task, result: dict, started_at: str) -> None:
    """metrics.json and manifest.json; the resume state goes (a finished run needs none)."""
    if run.accelerator.is_main_process:
        shutil.rmtree(run.out_dir / STATE_DIR, ignore_errors=True)
        atomic_write_json(run.out_dir / "metrics.json", result)
        write_manifest(run.out_dir / "manifest.json", params=run.params, task=task, device=run.device,
                       started_at=started_at)
    run.accelerator.wait_for_everyone()


def _rate(amount, seconds) -> float | None:
    return amount / seconds if amount is not None and seconds else None


def _last_loss(history_path: Path) -> float | None:
    rows = [json.loads(line) for line in history_path.read_text().splitlines()] if history_path.exists() else []
    return next((row["loss"] for row in reversed(rows) if "loss" in row), None)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
