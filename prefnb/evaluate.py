"""Task metrics: paraphrase accuracy/F1, sonnet generation + chrF, implicit-reward accuracy.

Metric names follow DESIGN.md contract 2: ``<split>/accuracy``, ``<split>/f1``,
``<split>/chrf``, ``<split>/chrf_full``, ``<split>/implicit_reward_accuracy``, where
``split`` is ``eval`` (the selection split) or ``test`` (the report split).
"""

from __future__ import annotations

from typing import Sequence

import torch

from prefnb.logprobs import encode, score_all

ANSWER_YES, ANSWER_NO = " yes", " no"
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
    """Score " yes" and " no" as continuations of each cloze prompt; predict the likelier one.

    Each answer's score is the summed log-prob of its continuation tokens, so this works
    for any tokenizer, also when an answer is several tokens (byte-level: 4 and 3). A tie
    (equal scores) predicts "no", the negative class, and counts so in accuracy and F1.
    """
    items = []
    for row in rows:
        for answer in row.get("answers", (ANSWER_YES, ANSWER_NO)):  # [yes, no]; see prefnb.prompts
            items.append(encode(tokenizer, row["prompt"], answer, max_length=max_length, add_eos=False))
    scores = score_all(model, items, pad_id=tokenizer.pad_token_id, batch_size=batch_size, device=device)
    yes, no = scores[0::2], scores[1::2]
    predictions = (yes > no).long().tolist()  # a tie (yes == no) predicts "no": it takes evidence to say yes
    labels = [int(row["label"]) for row in rows]
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / len(labels)
    return {f"{split}/accuracy": accuracy, f"{split}/f1": binary_f1(predictions, labels)}


def generate(model, tokenizer, prompts: Sequence[str], **settings) -> list[str]:
    """Continuations of ``prompts`` (text after the prompt, up to EOS), greedy or seeded top-p;
    ``settings`` as :func:`generate_with_ends`."""
    return [text for text, _ in generate_with_ends(model, tokenizer, prompts, **settings)]


@torch.no_grad()
def generate_with_ends(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, greedy: bool, top_p: float,
                       temperature: float, seed: int, batch_size: int, max_length: int,
                       device) -> list[tuple[str, bool]]:
    """(continuation, whether the model emitted EOS) for each prompt: greedy, or top-p sampling
    seeded by ``seed`` (the global RNG is restored after). A continuation without EOS was cut
    off by ``max_new_tokens``."""
    was_training = model.training
    model.eval()
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    outputs: list[tuple[str, bool]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False,
                            truncation=True, max_length=max(1, max_length - max_new_tokens)).to(device)
            sampling = dict(do_sample=False) if greedy else dict(do_sample=True, top_p=top_p, temperature=temperature)
            out = model.generate(**enc, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 **sampling)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            # Padding after a finished row only ever follows its EOS, so EOS anywhere = emitted.
            ended = (new_tokens == tokenizer.eos_token_id).any(dim=1).tolist()
            outputs += zip(tokenizer.batch_decode(new_tokens, skip_special_tokens=True), ended)
    finally:
        tokenizer.padding_side = pad_side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return outputs


def first_lines(text: str, n: int) -> str:
    """The first ``n`` lines of a generation (a sonnet continuation has 11)."""
    return "\n".join(text.strip("\n").split("\n")[:n])


def sonnet_metrics(continuations: Sequence[str], rows: Sequence[dict], split: str = "eval") -> dict:
    """Corpus chrF (sacrebleu defaults) of continuations vs true lines 4–14, and of whole sonnets."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    n_lines = [len(row["reference"].strip("\n").split("\n")) for row in rows]
    hyps = [first_lines(text, n) for text, n in zip(continuations, n_lines)]
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
