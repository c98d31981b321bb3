"""One training loop for every objective: SFT (any f-divergence) and every preference loss.

Reads top to bottom: set up → data → starting policy → reference log-probs (once, cached:
`prefnb.precompute`) → LoRA → optimiser → loop → evaluate → write the run directory.
Objectives plug in as two step functions (`sft_step`, `preference_step`); there is no
trainer class hierarchy.

Runs on accelerate: CPU, one GPU (bf16 autocast) or several (`accelerate launch`; each
process takes its slice of every global batch). The loop never syncs with the host
except every `log_every` steps, when it writes a history row and checks the loss.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefnb import data as data_lib
from prefnb import evaluate, losses, models, preflight
from prefnb.config import RunParams, save_params
from prefnb.logprobs import (collate, collate_pairs, response_token_logps, score_all, score_pairs, sequence_logps,
                             to_device)
from prefnb.manifest import write_manifest
from prefnb.precompute import (ADD_EOS, Encoders, batch_encodings, batch_reference_logps, reference_logps,
                               sampled_rejections)
from prefnb.prompts import apply_prompt_format
from prefnb.rundir import atomic_write_json, now_iso
from prefnb.schedule import batch_indices, lr_scheduler
from prefnb.timing import StepClock, peak_memory_bytes, process_peak_rss_bytes, reset_peak_memory, synchronize

log = logging.getLogger(__name__)

STATE_DIR, CHECKPOINT_DIR = "state", "checkpoint"
# Training runs started in this process: only the first one's process peak RSS is its own.
_RUNS_IN_PROCESS = {"started": 0}


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a missing dependency); the message says where."""


# ---------------------------------------------------------------------------------------
# objectives: one step function each, returning (loss, metric tensors summed over the batch)
# ---------------------------------------------------------------------------------------
def sft_step(model, batch, params: RunParams):
    """Token-mean f-divergence SFT loss over the response tokens of the batch."""
    token_logps, _ = response_token_logps(model, batch)
    loss = losses.token_loss(params.sft_loss, token_logps).mean()
    return loss, {"loss": loss.detach(), "mean_token_logp": token_logps.detach().mean()}


def preference_step(model, batch, params: RunParams, ref_chosen, ref_rejected, mismatched=None):
    """Chosen and rejected in one forward: [chosen; rejected] rows, or one row per pair with
    the prompt shared (`prefnb.logprobs.collate_pairs`).

    ``mismatched`` (KTO): the batch's prompts paired with the previous pair's responses
    (`prefnb.precompute.batch_encodings`), with their ``reference_logps`` [2, B]; their
    policy log-probs, without gradient, give KTO's reference point z₀
    (`losses.kto_reference_point`), estimated on each process's own micro-batch.
    """
    logps, lengths = sequence_logps(model, batch)
    pc, pr = logps.chunk(2)
    lc, lr = lengths.chunk(2)
    options = params.loss_options()
    if mismatched is not None:
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, mismatched)
        options["kl"] = losses.kto_reference_point(kl_logps, mismatched["reference_logps"].reshape(-1))
    per_pair, chosen_rewards, rejected_rewards = losses.preference_loss(
        params.objective, pc, pr, ref_chosen, ref_rejected, beta=params.beta,
        chosen_lengths=lc, rejected_lengths=lr, **options)
    loss = per_pair.mean()
    metrics = {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------
# evaluation during and after training
# ---------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """One held-out split: ``name`` is the metric prefix, "eval" (selection: picks the best
    checkpoint) or "test" (report: scored once, on the selected checkpoint, after training)."""

    name: str
    rows: list[dict]
    pairs: list[dict]
    reference: tuple[torch.Tensor, torch.Tensor]  # log π_ref(chosen), log π_ref(rejected) of ``pairs``: [P] each
    # The same under the base model a chain of runs (SFT → DPO) started from, where that is not
    # the run's own reference: the implicit reward of everything the chain learnt, not just this run.
    chain_base_reference: tuple[torch.Tensor, torch.Tensor] | None = None


def run_evaluation(model, tokenizer, split: HeldOut, params: RunParams, encoders: Encoders, device) -> dict[str, float]:
    """The task metrics of ``model`` on one held-out split, named ``<split.name>/<metric>``."""
    metrics: dict[str, float] = {}
    prefix = split.name
    if not split.rows:
        return metrics
    if params.task == "paraphrase":
        metrics.update(evaluate.paraphrase_metrics(model, tokenizer, split.rows, max_length=params.max_length,
                                                   batch_size=params.eval_batch_size, device=device, split=prefix))
    elif params.task == "sonnets":
        continuations = evaluate.generate(
            model, tokenizer, [r["prompt"] for r in split.rows], max_new_tokens=params.max_new_tokens,
            greedy=params.generation == "greedy", top_p=params.top_p, temperature=params.temperature,
            seed=params.seed, batch_size=params.eval_batch_size, max_length=params.max_length, device=device)
        metrics.update(evaluate.sonnet_metrics(continuations, split.rows, split=prefix))
        if params.eval_sampled and prefix == "test":
            sampled = evaluate.generate(
                model, tokenizer, [r["prompt"] for r in split.rows], max_new_tokens=params.max_new_tokens,
                greedy=False, seed=params.seed, batch_size=params.eval_batch_size, max_length=params.max_length,
                device=device, **evaluate.BENCHMARK_SAMPLING)
            metrics.update({f"{name}_sampled": value
                            for name, value in evaluate.sonnet_metrics(sampled, split.rows, split=prefix).items()})
    elif not params.is_preference:  # user SFT data: held-out NLL per response token
        items = [encoders.one(r["prompt"], r["completion"]) for r in split.rows]
        scores = score_all(model, items, pad_id=tokenizer.pad_token_id, batch_size=params.eval_batch_size, device=device)
        metrics[f"{prefix}/loss"] = float(-scores.sum() / sum(e.n_response for e in items))
    if split.pairs:
        chosen, rejected = encoders.pairs(split.pairs)
        chosen_scores, rejected_scores = score_pairs(model, chosen, rejected, pad_id=tokenizer.pad_token_id,
                                                     batch_size=params.eval_batch_size, device=device)
        metrics[f"{prefix}/implicit_reward_accuracy"] = evaluate.implicit_reward_accuracy(
            chosen_scores, rejected_scores, *split.reference)
        if split.chain_base_reference is not None:
            metrics[f"{prefix}/implicit_reward_accuracy_total"] = evaluate.implicit_reward_accuracy(
                chosen_scores, rejected_scores, *split.chain_base_reference)
    return metrics


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None or math.isnan(old):
        return True
    return new < old if metric == "eval/loss" else new > old


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _mixed_precision(params: RunParams) -> str:
    if params.precision == "bf16" or (params.precision == "auto" and torch.cuda.is_available()):
        return "bf16"
    return "no"


def train(params: RunParams, *, progress: bool = True) -> dict[str, float]:
    """Train and evaluate one run; write params.yaml, history.jsonl, metrics.json, manifest.json
    and checkpoint/ into ``params.resolved_output_dir()``. Returns the final metrics.

    The completion marker is not written here: the caller (CLI or study) writes it last.
    """
    started, started_at = time.perf_counter(), now_iso()  # before the imports: start-up counts them
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint-writing bars would drown the run's own progress
    out_dir = params.resolved_output_dir()
    cache_dir = Path(params.cache_dir) if params.cache_dir else out_dir.parent.parent / ".cache"
    # Values the data or machine cannot serve fail here, before anything is allocated; the
    # check loads the task data, which the run then uses.
    task = preflight.check(params, out_dir, cache_dir)
    try:
        accelerator = Accelerator(mixed_precision=_mixed_precision(params),
                                  gradient_accumulation_steps=params.grad_accum_steps)
    except ValueError as err:  # accelerate fixes mixed precision once per process
        raise TrainingError(f"precision '{params.precision}': this process already trained with another precision "
                            f"and accelerate cannot switch ({err}); restart the kernel or train in a new process") from err
    device, main = accelerator.device, accelerator.is_main_process
    first_in_process = _RUNS_IN_PROCESS["started"] == 0
    _RUNS_IN_PROCESS["started"] += 1
    reset_peak_memory(device)
    # Seconds of evaluation and of checkpoint/state writes, kept out of train/seconds and throughput.
    costs = {"eval": 0.0, "checkpoint": 0.0}
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_params(params, out_dir / "params.yaml")
    seed_everything(params.seed)

    # --- data and the starting policy ----------------------------------------------------
    start_model, tokenizer = models.load_starting_model(params.model, params.init_from, params.seed)
    start_model.to(device)
    task = apply_prompt_format(task, tokenizer, params.prompt_format)
    start_identity = models.weights_identity(params.init_from or params.model, params.seed)
    encoders = Encoders.shared(tokenizer, params.max_length, ADD_EOS[params.task])

    if params.is_preference:
        train_rows = task.train_pairs
        if train_rows is None and params.task != "sonnets":
            raise data_lib.DataError(f"objective '{params.objective}' needs preference data: {params.data_path} has "
                                     "prompt/completion rows; give prompt/chosen/rejected rows or use objective 'sft'")
        if train_rows is None:  # sonnets: rejected = samples of the starting policy (on-policy)
            with accelerator.main_process_first():
                rejected = sampled_rejections(params, start_model, tokenizer, task.train_sft, cache_dir=cache_dir,
                                              start_identity=start_identity, device=device)
            train_rows = data_lib.sonnet_sampled_pairs(task.train_sft, rejected)
    else:
        train_rows = task.train_sft

    # --- the micro-batches, fixed in advance: a pure function of (step, seed, rank) --------
    n_train = len(train_rows)
    micro_batches = [batch_indices(m, n=n_train, batch_size=params.batch_size, seed=params.seed,
                                   rank=accelerator.process_index, world=accelerator.num_processes)
                     for m in range(params.max_steps * params.grad_accum_steps)]
    hidden_size = getattr(start_model.config, "hidden_size", None)  # decides shared-prompt pair rows

    # --- reference log-probs: once, before training, so no reference forward runs in the loop
    ref_started = time.perf_counter()
    reference_free = params.objective in losses.REFERENCE_FREE
    kto_mismatched = params.objective == "kto" and params.kto_reference_point == "mismatched"
    with accelerator.main_process_first():
        if params.is_preference and not reference_free:
            train_ref = batch_reference_logps(params, start_model, tokenizer, encoders, train_rows, micro_batches,
                                              hidden_size=hidden_size, autocast=accelerator.autocast,
                                              mixed_precision=accelerator.mixed_precision,
                                              with_mismatched=kto_mismatched, cache_dir=cache_dir,
                                              start_identity=start_identity, device=device)
        elif params.is_preference:  # simpo/cpo/orpo ignore these: no reference forward at all
            train_ref = {"chosen": torch.zeros(len(micro_batches), params.batch_size)}
            train_ref["rejected"] = train_ref["chosen"]
        selection, report = (
            HeldOut(name, rows, pairs, reference_logps(params, start_model, tokenizer, encoders, pairs, split=name,
                                                       cache_dir=cache_dir, start_identity=start_identity,
                                                       device=device))
            for name, rows, pairs in (("eval", task.eval_rows, task.eval_pairs),
                                      ("test", task.test_rows, task.test_pairs)))
        # A run started from an earlier one (SFT → DPO): also rank the report pairs against the
        # base model the chain started from (test/implicit_reward_accuracy_total).
        base = models.chain_base(params.init_from) if params.init_from else None
        if base and report.pairs and base[0] != params.reference:
            report.chain_base_reference = reference_logps(params, start_model, tokenizer, encoders, report.pairs,
                                                          split="test", cache_dir=cache_dir, device=device,
                                                          start_identity=start_identity, source=base)
    reference_seconds = time.perf_counter() - ref_started

    # --- the policy: the starting model, with fresh LoRA adapters when lora_r > 0 ----------
    policy = start_model
    if params.uses_lora:
        policy = models.add_lora(policy, r=params.lora_r, alpha=params.lora_alpha, dropout=params.lora_dropout,
                                 targets=params.lora_target_modules)
    if params.is_preference:
        models.disable_dropout(policy)
    policy.train()
    trainable, total = models.count_parameters(policy)
    log.info("policy: %s trainable of %s parameters", f"{trainable:,}", f"{total:,}")

    if params.is_preference:
        chosen_enc, rejected_enc = encoders.pairs(train_rows)
    else:
        sft_enc = [encoders.one(r["prompt"], r["completion"]) for r in train_rows]

    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=params.learning_rate,
                                  weight_decay=params.weight_decay)
    # The scheduler is stepped by hand once per optimiser step (accelerate would scale it by
    # the number of processes).
    scheduler = lr_scheduler(optimizer, params.lr_schedule, warmup_steps=params.warmup_steps,
                             total_steps=params.max_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)

    # --- resume -------------------------------------------------------------------------
    step, best = 0, {"metric": None, "value": None, "step": None, "metrics": {}}
    loop_carry = None
    history_path = out_dir / "history.jsonl"
    state_path = out_dir / STATE_DIR / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False, map_location=device)
        unwrapped.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, best = state["step"], state["best"]
        loop_carry = state["loop"]
        log.info("resumed from step %d", step)
    if main:
        kept = [line for line in (history_path.read_text().splitlines() if history_path.exists() else [])
                if json.loads(line).get("step", 0) <= step] if step else []
        history_path.write_text("".join(line + "\n" for line in kept))

    # --- the loop -----------------------------------------------------------------------
    sums: dict[str, torch.Tensor] = {}
    tokens_seen = torch.zeros((), dtype=torch.long, device=device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    n_since_log = 0
    if loop_carry:  # running sums since the last history row, so a resumed run logs the same rows
        sums, n_since_log = loop_carry["sums"], loop_carry["n_since_log"]
        tokens_seen, first_bad_step = loop_carry["tokens_seen"], loop_carry["first_bad_step"]
    metric_name = params.key_metric
    bar = tqdm(total=params.max_steps, initial=step, disable=not (progress and main), desc=params.run_id(),
               dynamic_ncols=True)
    loop_started = time.perf_counter()
    clock = StepClock(device, params.max_steps, started=started)  # syncs at steps 1 and warm-up only
    steps_at_start = step
    while step < params.max_steps:
        for micro in range(params.grad_accum_steps):
            m = step * params.grad_accum_steps + micro
            idx = micro_batches[m]
            with accelerator.accumulate(policy), accelerator.autocast():
                if params.is_preference:
                    batch = collate_pairs([chosen_enc[i] for i in idx], [rejected_enc[i] for i in idx],
                                          tokenizer.pad_token_id, hidden_size=hidden_size)
                    # The batch's reference log-probs travel with it from the host (indexing a GPU
                    # tensor with host indices would copy them over synchronously).
                    batch["reference_logps"] = torch.stack([train_ref["chosen"][m], train_ref["rejected"][m]])  # [2, B]
                    batch = to_device(batch, device)
                    mismatched = None
                    if kto_mismatched:
                        mismatched = collate_pairs(*batch_encodings(encoders, train_rows, idx, kl=True),
                                                   tokenizer.pad_token_id, hidden_size=hidden_size)
                        mismatched["reference_logps"] = torch.stack([train_ref["kl_chosen"][m],
                                                                     train_ref["kl_rejected"][m]])
                        mismatched = to_device(mismatched, device)
                    loss, metrics = preference_step(policy, batch, params, *batch["reference_logps"],
                                                    mismatched=mismatched)
                else:
                    batch = collate([sft_enc[i] for i in idx], tokenizer.pad_token_id, device)
                    loss, metrics = sft_step(policy, batch, params)
                accelerator.backward(loss)
                if accelerator.sync_gradients and params.max_grad_norm > 0:
                    metrics["grad_norm"] = accelerator.clip_grad_norm_(policy.parameters(), params.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens_seen += batch["n_tokens"]
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0) + value.detach().float() / params.grad_accum_steps
            # Record the first non-finite step on the device; it is read at the next log.
            first_bad_step.masked_fill_((first_bad_step < 0) & ~torch.isfinite(loss.detach()), step + 1)
        scheduler.step()
        step += 1
        n_since_log += 1
        bar.update(1)
        if clock.wants_mark(step):
            clock.step_done(step, tokens_seen)

        if step % params.log_every == 0 or step == params.max_steps:
            bad = int(first_bad_step)  # the loop's one host sync, every log_every steps
            if bad >= 0:
                bar.close()
                raise TrainingError(f"loss became NaN/inf at step {bad} of run {params.run_id()}: lower learning_rate "
                                    "or beta, or check the data; nothing was saved as finished")
            row = {"step": step, "epoch": step * params.batch_size * params.grad_accum_steps
                   * accelerator.num_processes / n_train, "learning_rate": scheduler.get_last_lr()[0]}
            row.update({k: float(accelerator.reduce(v, "mean")) / n_since_log for k, v in sums.items()})
            sums, n_since_log = {}, 0
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if main:
                with history_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")

        if params.eval_every and step % params.eval_every == 0 and step < params.max_steps:
            clock.exclude(_evaluate_and_keep_best(unwrapped, tokenizer, selection, params, encoders, device, step,
                                                  best, metric_name, out_dir, history_path, main, costs)[1])
        if params.save_every and step % params.save_every == 0 and step < params.max_steps and main:
            synchronize(device)
            save_started = time.perf_counter()
            _save_state(state_path, unwrapped, optimizer, scheduler, step, best,
                        loop={"sums": sums, "n_since_log": n_since_log, "tokens_seen": tokens_seen,
                              "first_bad_step": first_bad_step})
            costs["checkpoint"] += time.perf_counter() - save_started
            clock.exclude(time.perf_counter() - save_started)
    bar.close()
    clock.finish(step, tokens_seen)
    train_seconds = time.perf_counter() - loop_started - costs["eval"] - costs["checkpoint"]  # the loop's own work
    timing = clock.summary()

    # --- final evaluation, checkpoint, metrics --------------------------------------------
    final, _ = _evaluate_and_keep_best(unwrapped, tokenizer, selection, params, encoders, device, step, best,
                                       metric_name, out_dir, history_path, main, costs)
    # The report split, once, on the selected checkpoint: the final weights, or the best
    # checkpoint reloaded when an earlier evaluation won (the model a later run's init_from gets).
    reported = {}
    if main and report.rows:
        selected = unwrapped if best["step"] == step else models.load_checkpoint(out_dir)[0].to(device)
        report_started = time.perf_counter()
        reported = run_evaluation(selected, tokenizer, report, params, encoders, device)
        costs["eval"] += time.perf_counter() - report_started
    tokens = int(accelerator.reduce(tokens_seen, "sum"))
    steps_run = step - steps_at_start
    result = {**best["metrics"], **reported}
    result.update({
        "best_step": best["step"],
        "final/" + metric_name: final.get(metric_name),
        "train/loss": _last_loss(history_path),
        "train/steps": step,
        "train/seconds": train_seconds,
        "train/tokens": tokens,
        "train/tokens_per_second": tokens / train_seconds if train_seconds > 0 and steps_run else 0.0,
        "train/first_step_seconds": timing["first_step_seconds"],
        "train/steady_steps_per_second": _rate(timing["steady_steps"], timing["steady_seconds"]),
        "train/steady_tokens_per_second": _rate(timing["steady_units"], timing["steady_seconds"]),
        "train/peak_memory_bytes": peak_memory_bytes(device, first_in_process=first_in_process),
        "train/process_peak_rss_bytes": process_peak_rss_bytes(),
        "eval/seconds": costs["eval"],
        "checkpoint/seconds": costs["checkpoint"],
        "train/trainable_parameters": trainable,
        "train/total_parameters": total,
        "reference/seconds": reference_seconds,
        "run/seconds": time.perf_counter() - started,
    })
    if main:
        shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)  # a finished run needs no resume state
        atomic_write_json(out_dir / "metrics.json", result)
        write_manifest(out_dir / "manifest.json", params=params, task=task, device=device, started_at=started_at)
    accelerator.wait_for_everyone()
    return result


def _evaluate_and_keep_best(model, tokenizer, selection: HeldOut, params, encoders, device, step, best, metric_name,
                            out_dir, history_path, main, costs: dict) -> tuple[dict, float]:
    """Evaluate on the selection split; save the checkpoint when the key metric improves (ties
    keep the earlier one). Adds the seconds spent to ``costs`` and returns (metrics, seconds)."""
    if not main:
        return {}, 0.0
    synchronize(device)  # queued training work belongs to training, not to this evaluation
    started = time.perf_counter()
    metrics = run_evaluation(model, tokenizer, selection, params, encoders, device)
    with history_path.open("a") as fh:
        fh.write(json.dumps({"step": step, **metrics}) + "\n")
    evaluated = time.perf_counter()
    costs["eval"] += evaluated - started
    value = metrics.get(metric_name, float("nan"))
    if is_better(metric_name, value, best["value"]):
        best.update(metric=metric_name, value=value, step=step, metrics=metrics)
        models.save_checkpoint(model, tokenizer, out_dir / CHECKPOINT_DIR, base_model=params.model,
                               base_init_from=params.init_from, seed=params.seed)
    costs["checkpoint"] += time.perf_counter() - evaluated
    return metrics, time.perf_counter() - started


def _save_state(path: Path, model, optimizer, scheduler, step: int, best: dict, loop: dict) -> None:
    """Everything exact resumption needs; only trainable weights (LoRA: the adapters)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {"model": {k: v for k, v in model.state_dict().items() if k in trainable}, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step, "best": best, "loop": loop}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _rate(amount, seconds) -> float | None:
    return amount / seconds if amount is not None and seconds else None


def _last_loss(history_path: Path) -> float | None:
    rows = [json.loads(line) for line in history_path.read_text().splitlines()] if history_path.exists() else []
    losses_logged = [r["loss"] for r in rows if "loss" in r]
    return losses_logged[-1] if losses_logged else None
