"""Task metrics (named as DESIGN.md contract 2): paraphrase accuracy/F1, sonnet generation +
chrF, implicit-reward accuracy."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from prefnb.data import ANSWERS
from prefnb.logprobs import encode, eval_mode, score_all, score_pairs

# The sampled decoding of the benchmark these sonnet files come from (its sonnet generation
# samples with temperature 1.2 and nucleus mass 0.9); reported as test/chrf_sampled beside greedy.
BENCHMARK_SAMPLING = {"temperature": 1.2, "top_p": 0.9}


def binary_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class (duplicate questions); 0 when nothing is predicted or true."""
    tp = sum(p == 1 and y == 1 for p, y in zip(predictions, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(predictions, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(predictions, labels))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def paraphrase_metrics(model, tokenizer, rows: Sequence[dict], *, max_length: int, batch_size: int, device,
                       split: str = "eval") -> dict:
    """Score " yes" and " no" as continuations of each cloze prompt (summed log-prob of the
    answer's tokens, DESIGN.md); predict the likelier one."""
    # [yes, no] after each prompt (the answers a row names, as training sees them: prefnb.prompts)
    items = [encode(tokenizer, row["prompt"], answer, max_length=max_length, add_eos=False)
             for row in rows for answer in row.get("answers", (ANSWERS[True], ANSWERS[False]))]
    scores = score_all(model, items, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device)
    yes, no = scores[0::2], scores[1::2]
    predictions = (yes > no).long().tolist()  # a tie (yes == no) predicts "no": it takes evidence to say yes
    labels = [int(row["label"]) for row in rows]
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / len(labels)
    return {f"{split}/accuracy": accuracy, f"{split}/f1": binary_f1(predictions, labels)}


class LineBudget:
    """Holds each generated row to its number of lines: as a logits processor it masks EOS until
    row i has written ``lines[i]`` newlines; :meth:`done` is the stopping criterion that ends
    the row as soon as it has.

    Why: chrF weights recall twice as much as precision, so a model that stops after two good
    lines scores below one that loops on a single line until ``max_new_tokens``. A sonnet has a
    fixed length, so the task fixes how many lines a continuation has (11: lines 4-14) and
    every model is scored on that many; content, not the decision to stop, is what chrF then
    compares. Measured on SmolLM2-135M-Instruct (dev sonnets 132-133, greedy): untrained it
    repeats one line to the token limit; after 12 LoRA SFT steps it emits EOS after 2-4 lines.

    newline_counts: [V] how many "\\n" each vocabulary token holds; lines: [B]; prompt_length:
    the padded prompt width T0 of the batch (generated tokens are input_ids[:, T0:]).
    (Plain callables: transformers' processor and criteria lists call them as they call their own.)
    """

    def __init__(self, newline_counts: torch.Tensor, lines: torch.Tensor, prompt_length: int, eos_token_id: int):
        self.newline_counts, self.lines = newline_counts, lines
        self.prompt_length, self.eos_token_id = prompt_length, eos_token_id

    def lines_written(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B]
        return self.newline_counts[input_ids[:, self.prompt_length:]].sum(dim=1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores [B, V]
        # masked_fill_ on the EOS column, not boolean-mask indexing: that would run nonzero(), a host
        # sync at every generated token on a GPU
        scores[:, self.eos_token_id].masked_fill_(self.lines_written(input_ids) < self.lines, float("-inf"))
        return scores

    def done(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:  # [B] bool
        return self.lines_written(input_ids) >= self.lines

    @staticmethod
    def newline_counts_of(tokenizer) -> torch.Tensor:
        """[V] on CPU: one decode of the whole vocabulary (`precompute.Encoders.newline_counts` keeps it)."""
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        return torch.tensor([text.count("\n") for text in texts])


def generate(model, tokenizer, prompts: Sequence[str], **settings) -> list[str]:
    """Continuations of ``prompts`` (text after the prompt, up to EOS), greedy or seeded top-p;
    with ``lines``, each exactly that many lines (:class:`LineBudget`; at most ``max_new_tokens``);
    ``settings`` as :func:`generate_with_ends`."""
    return [text for text, _ in generate_with_ends(model, tokenizer, prompts, **settings)]


@torch.no_grad()
def generate_with_ends(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, greedy: bool, top_p: float,
                       temperature: float, seed: int, batch_size: int, max_length: int,
                       device, lines: Sequence[int] | None = None,
                       newline_counts: torch.Tensor | None = None) -> list[tuple[str, bool]]:
    """(continuation, whether the model emitted EOS) for each prompt: greedy, or top-p sampling
    seeded by ``seed`` (the global CPU RNG and this device's CUDA RNG are restored after). A
    continuation without EOS was cut off by ``max_new_tokens``, or (with ``lines``, where no row
    emits EOS) by its line budget; ``newline_counts``: :meth:`LineBudget.newline_counts_of` of
    ``tokenizer``, if the caller has it."""
    if lines is not None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if newline_counts is None:
            newline_counts = LineBudget.newline_counts_of(tokenizer)
        newline_counts = newline_counts.to(device)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, top_p=top_p, temperature=temperature)
    cuda = [device] if torch.device(device).type == "cuda" else []
    outputs: list[tuple[str, bool]] = []
    # training's random streams go on untouched; generation appends on the right, so pad on the left
    with eval_mode(model), torch.random.fork_rng(devices=cuda), _padding_side(tokenizer, "left"):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False,
                            truncation=True, max_length=max(1, max_length - max_new_tokens)).to(device)
            if lines is not None:
                budget = LineBudget(newline_counts, torch.tensor(lines[start:start + batch_size], device=device),
                                    enc["input_ids"].shape[1], tokenizer.eos_token_id)
                sampling.update(logits_processor=LogitsProcessorList([budget]),
                                stopping_criteria=StoppingCriteriaList([budget.done]))
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sampling)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            # Padding after a finished row only ever follows its EOS (or its last line, with a line
            # budget: then EOS was masked), so EOS anywhere = emitted.
            ended = [False] * len(chunk) if lines is not None else \
                (new_tokens == tokenizer.eos_token_id).any(dim=1).tolist()
            outputs += zip(tokenizer.batch_decode(new_tokens, skip_special_tokens=True), ended)
    return outputs


@contextmanager
def _padding_side(tokenizer, side: str):
    saved, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        yield
    finally:
        tokenizer.padding_side = saved


def first_lines(text: str, n: int) -> str:
    """The first ``n`` lines of a generation (a sonnet continuation has 11)."""
    return "\n".join(text.strip("\n").split("\n")[:n])


def reference_lines(row: dict) -> int:
    """How many lines the true continuation of a sonnet row has (11: lines 4-14)."""
    return len(row["reference"].strip("\n").split("\n"))


def sonnet_metrics(continuations: Sequence[str], rows: Sequence[dict], split: str = "eval") -> dict:
    """Corpus chrF (sacrebleu defaults) of continuations vs true lines 4–14, and of whole sonnets."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    hyps = [first_lines(text, reference_lines(row)) for text, row in zip(continuations, rows)]
    refs = [row["reference"].strip("\n") for row in rows]
    full_hyps = [row.get("plain_prompt", row["prompt"]) + hyp for row, hyp in zip(rows, hyps)]  # prefnb.prompts
    full_refs = [row["full_reference"].strip("\n") for row in rows]
    return {f"{split}/chrf": chrf.corpus_score(hyps, [refs]).score,
            f"{split}/chrf_full": chrf.corpus_score(full_hyps, [full_refs]).score}


def implicit_reward_accuracy(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> float:
    """Share of pairs whose implicit reward log π/π_ref ranks chosen above rejected (β-free);
    a tie (margin exactly 0, e.g. a policy still equal to its reference) counts as not ranked."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return float((margin > 0).float().mean()) if margin.numel() else float("nan")


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


def _paraphrase(model, tokenizer, split: HeldOut, params, encoders, device) -> dict[str, float]:
    return paraphrase_metrics(model, tokenizer, split.rows, max_length=params.max_length,
                              batch_size=params.eval_batch_size, device=device, split=split.name)


def _sonnets(model, tokenizer, split: HeldOut, params, encoders, device) -> dict[str, float]:
    """chrF of greedy (or top-p: ``generation``) continuations; with ``eval_sampled``, the report
    split also with the benchmark's sampled decoding (``<split>/chrf_sampled``, …)."""
    # The task fixes the length (LineBudget).
    decode = dict(max_new_tokens=params.max_new_tokens, seed=params.seed, batch_size=params.eval_batch_size,
                  max_length=params.max_length, device=device, lines=[reference_lines(row) for row in split.rows],
                  newline_counts=encoders.newline_counts)
    prompts = [r["prompt"] for r in split.rows]
    continuations = generate(model, tokenizer, prompts, greedy=params.generation == "greedy", top_p=params.top_p,
                             temperature=params.temperature, **decode)
    metrics = sonnet_metrics(continuations, split.rows, split=split.name)
    if params.eval_sampled and split.name == "test":
        sampled = generate(model, tokenizer, prompts, greedy=False, **decode, **BENCHMARK_SAMPLING)
        metrics.update({f"{name}_sampled": value
                        for name, value in sonnet_metrics(sampled, split.rows, split=split.name).items()})
    return metrics


def _user_data(model, tokenizer, split: HeldOut, params, encoders, device) -> dict[str, float]:
    """A user's data has no task metric: SFT runs are scored by held-out NLL per response token
    (of the completion; of the chosen response in preference rows, which SFT trains on)."""
    if params.is_preference:
        return {}
    items = [encoders.one(r["prompt"], r["completion"] if "completion" in r else r["chosen"]) for r in split.rows]
    scores = score_all(model, items, pad_id=tokenizer.pad_token_id, batch_size=params.eval_batch_size, device=device)
    return {f"{split.name}/loss": float(-scores.sum() / sum(e.n_response for e in items))}


TASK_METRICS = {"paraphrase": _paraphrase, "sonnets": _sonnets, "jsonl": _user_data}


def run_evaluation(model, tokenizer, split: HeldOut, params, encoders, device) -> dict[str, float]:
    """The metrics of ``model`` on one held-out split, named ``<split.name>/<metric>``: its task's
    (:data:`TASK_METRICS`), then the implicit-reward accuracy of its preference pairs."""
    if not split.rows:
        return {}
    metrics = TASK_METRICS[params.task](model, tokenizer, split, params, encoders, device)
    if split.pairs:
        scores = score_pairs(model, *encoders.pairs(split.pairs), pad_id=tokenizer.pad_token_id,
                             batch_size=params.eval_batch_size, device=device)  # (chosen [P], rejected [P])
        metrics[f"{split.name}/implicit_reward_accuracy"] = implicit_reward_accuracy(*scores, *split.reference)
        if split.chain_base_reference is not None:
            metrics[f"{split.name}/implicit_reward_accuracy_total"] = implicit_reward_accuracy(
                *scores, *split.chain_base_reference)
    return metrics
