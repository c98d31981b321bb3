"""Tokenising (prompt, response) pairs and scoring log π(y_t | x, y_<t) at response tokens only.

Sequences are right-padded and run without an attention mask: under causal attention no real
token sees the padding after it, so the log-probs are exact and attention takes its causal
kernel (block skipping on CPU, FlashAttention on CUDA) instead of a masked one. The LM head is
applied only at the positions that predict a response token: never a [batch, length, vocab]
logits tensor. A pair whose responses share a prompt can be one row (:func:`collate_pairs`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

Tensor = torch.Tensor

# The LM head is applied to at most this many positions at once, bounding the float32
# [positions, vocab] block that log-softmax needs (≈ 800 MB for GPT-2's vocabulary).
HEAD_CHUNK = 4096


@dataclass(frozen=True)
class Encoded:
    """Token ids of one prompt + response; the response is the last ``n_response`` ids."""

    ids: tuple[int, ...]
    n_response: int


def encode(tokenizer, prompt: str, response: str, *, max_length: int, add_eos: bool,
           prompt_ids: Sequence[int] | None = None) -> Encoded:
    """Tokenise prompt and response separately (the boundary is exact), then truncate.

    Too long: the response keeps at most ``max_length - 1`` tokens, then the prompt is cut
    from the left, so the text right before the response survives. ``prompt_ids`` replaces
    the prompt (the prior reference scores the response after a lone start token).
    """
    p_ids = list(prompt_ids) if prompt_ids is not None else tokenizer(prompt, add_special_tokens=False).input_ids
    r_ids = tokenizer(response, add_special_tokens=False).input_ids
    if add_eos:
        r_ids = r_ids + [tokenizer.eos_token_id]
    if not p_ids:  # a response needs a context token to be predicted from
        p_ids = [start_token_id(tokenizer)]
    r_ids = r_ids[: max_length - 1]
    p_ids = p_ids[-(max_length - len(r_ids)):]
    return Encoded(tuple(p_ids + r_ids), len(r_ids))


def start_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def collate(items: Sequence[Encoded], pad_id: int, device=None) -> dict[str, Tensor]:
    """Right-pad a batch of S sequences into [S, L] rows (``pad_id``: the tokenizer's pad id).

    Returns input_ids, position_ids [S, L] (0, 1, … on every row), no attention mask, and the
    response tokens (:func:`_with_targets`).
    """
    length = max(len(e.ids) for e in items)
    # No real token reads the padding, so any id will do; not the pad id itself, which without
    # a mask makes transformers warn that padding might be attended to.
    input_ids = torch.full((len(items), length), 1 if pad_id == 0 else 0, dtype=torch.long)
    targets = []
    for i, e in enumerate(items):
        input_ids[i, :len(e.ids)] = torch.tensor(e.ids)
        first = i * length + len(e.ids) - e.n_response
        targets.append(torch.arange(first, first + e.n_response))
    # Positions keep counting through the padding, so transformers sees one ordinary causal
    # sequence per row (restarting positions would read as packed sequences and bring a mask back).
    position_ids = torch.arange(length).expand(len(items), length).contiguous()
    # The token at column t is predicted by the hidden state at column t - 1.
    return _with_targets(dict(input_ids=input_ids, position_ids=position_ids), items, targets,
                         [t - 1 for t in targets], device)


def collate_pairs(chosen: Sequence[Encoded], rejected: Sequence[Encoded], pad_id: int, device=None, *,
                  hidden_size: int | None = None) -> dict[str, Tensor]:
    """A batch of B preference pairs as 2B scored sequences: [chosen; rejected].

    Where every pair's chosen and rejected share their prompt and it saves compute (see
    :func:`shared_prompt_pays`; ``hidden_size`` is the model width, None = never share),
    each pair is one row, prompt + chosen + rejected, with a mask that hides chosen from
    rejected and rejected positions restarting after the prompt: the prompt goes through
    the model once instead of twice, and every log-prob equals the two-row layout's up to
    float rounding. Otherwise this is ``collate(chosen + rejected)``.
    """
    if hidden_size is None or not shared_prompt_pays(chosen, rejected, hidden_size):
        return collate(list(chosen) + list(rejected), pad_id, device)
    pairs = len(chosen)
    length = max(len(c.ids) + r.n_response for c, r in zip(chosen, rejected))
    input_ids = torch.full((pairs, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((pairs, length), dtype=torch.long)
    # Boolean [B, 1, L, L], True = may attend; handed to the model as is (a prepared 4-D mask).
    allowed = torch.zeros((pairs, 1, length, length), dtype=torch.bool)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    targets, predictors = [None] * (2 * pairs), [None] * (2 * pairs)
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        n_prompt, n_c, n_r = len(c.ids) - c.n_response, c.n_response, r.n_response
        start = length - (n_prompt + n_c + n_r)
        c_start, r_start = start + n_prompt, start + n_prompt + n_c
        input_ids[i, start:] = torch.tensor(c.ids + r.ids[n_prompt:])
        position_ids[i, start:r_start] = torch.arange(n_prompt + n_c)
        position_ids[i, r_start:] = torch.arange(n_prompt, n_prompt + n_r)
        allowed[i, 0, start:, start:] = causal[: length - start, : length - start]
        allowed[i, 0, r_start:, c_start:r_start] = False  # rejected never sees chosen
        base = i * length
        targets[i] = base + torch.arange(c_start, c_start + n_c)
        targets[pairs + i] = base + torch.arange(r_start, r_start + n_r)
        predictors[i] = targets[i] - 1
        # The first rejected token is predicted from the prompt's last position, like the first chosen one.
        predictors[pairs + i] = torch.cat([targets[i][:1] - 1, targets[pairs + i][:-1]])
    idx = torch.arange(length)
    allowed[:, 0, idx, idx] = True  # padding rows attend to themselves (no all-masked row, no NaN)
    return _with_targets(dict(input_ids=input_ids, attention_mask=allowed, position_ids=position_ids),
                         [*chosen, *rejected], targets, predictors, device)


def to_device(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    """Move a collated batch to ``device`` without waiting for it: on CUDA a copy from ordinary
    (pageable) host memory synchronises the stream, so the host would wait for every queued
    kernel at each step; from pinned memory with ``non_blocking`` it is queued like a kernel."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def shared_prompt_pays(chosen: Sequence[Encoded], rejected: Sequence[Encoded], hidden_size: int) -> bool:
    """Whether one row per pair costs fewer FLOPs than two rows per pair.

    Every pair must have the same prompt tokens on both sides (truncation can make them
    differ). A padded row of length L costs about L·(6d + a·L) in a transformer of width d
    (linear layers 24·d² per token, attention 4·d per query–key pair, per layer; a = 1/2 for
    the two-row layout's unmasked causal rows, 1 for shared rows, whose 4-D mask makes the
    kernel compute every pair): sharing removes the duplicate prompt but makes rows longer,
    so it pays for long prompts with short responses (paraphrase) and not for short prompts
    with long responses (byte-level sonnets on a narrow model).
    """
    if any(c.ids[:len(c.ids) - c.n_response] != r.ids[:len(r.ids) - r.n_response] for c, r in zip(chosen, rejected)):
        return False
    separate = max(max(len(c.ids), len(r.ids)) for c, r in zip(chosen, rejected))
    shared = max(len(c.ids) + r.n_response for c, r in zip(chosen, rejected))
    d = hidden_size
    return len(chosen) * shared * (6 * d + shared) < 2 * len(chosen) * separate * (6 * d + separate / 2)


def _with_targets(batch: dict[str, Tensor], items: Sequence[Encoded], targets: list[Tensor],
                  predictors: list[Tensor], device) -> dict[str, Tensor]:
    """Add the scored tokens of the S sequences ``items`` to a batch, on ``device`` (None: stay).

    ``targets`` and ``predictors`` are per sequence, as flat indices into the [rows · L]
    positions. Adds, for each of the N response tokens: ``predictor`` (where the hidden state
    that predicts it is), ``target`` (its token id) and ``sequence`` (which sequence it belongs
    to); ``response_lengths`` [S]; and ``n_tokens``, the prompt + response tokens of the S
    sequences (a shared prompt counted per sequence, so tokens/s measures the same work
    whichever layout is used)."""
    batch.update(predictor=torch.cat(predictors), target=batch["input_ids"].reshape(-1)[torch.cat(targets)],
                 sequence=torch.cat([torch.full((len(t),), s) for s, t in enumerate(targets)]),
                 response_lengths=torch.tensor([e.n_response for e in items], dtype=torch.float32),
                 n_tokens=torch.tensor(sum(len(e.ids) for e in items)))
    return to_device(batch, device) if device is not None else batch


def response_token_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Log-probs of every response token under ``model`` (a causal LM, transformers or peft).

    ``batch``: from :func:`collate` or :func:`collate_pairs`, input_ids etc. [rows, L]. Returns
    (token_logps [N] float32, sequence [N] long) for the N response tokens of the batch,
    sequence = which scored sequence each token belongs to.
    """
    head = model.get_output_embeddings()
    pieces = []
    # [N, d] states and [N] target ids, HEAD_CHUNK at a time (an empty batch is one empty chunk)
    for states, targets in zip(predictor_states(model, batch).split(HEAD_CHUNK), batch["target"].split(HEAD_CHUNK)):
        logits = head(states).float()  # [n, V]
        pieces.append(logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(pieces), batch["sequence"]


def predictor_states(model, batch: dict[str, Tensor]) -> Tensor:
    """Final hidden states [N, d] at the N positions that predict a response token."""
    # Only the final hidden states are needed; logits_to_keep=1 stops the model from
    # applying the LM head to every position (the caller applies it where it matters).
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch["position_ids"], output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]  # [rows, L, d], final layer norm applied
    return hidden.reshape(-1, hidden.shape[-1])[batch["predictor"]]


def sequence_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(summed log π(y|x) [S] float32, response lengths [S] float32) of the S scored sequences."""
    token_logps, sequence = response_token_logps(model, batch)
    lengths = batch["response_lengths"]
    sums = torch.zeros(len(lengths), dtype=torch.float32, device=token_logps.device).index_add(0, sequence, token_logps)
    return sums, lengths


@contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def score_all(model, items: Sequence[Encoded], *, pad_id: int, batch_size: int, device) -> Tensor:
    """Summed response log-probs of many sequences, in order, without gradients: [len(items)].

    Where every response is one token and prompts repeat (paraphrase: " yes" and " no" after
    each prompt), each distinct prompt is run once (:func:`_score_single_tokens`).
    """
    with eval_mode(model):
        if items and all(e.n_response == 1 for e in items) and len({e.ids[:-1] for e in items}) < len(items):
            return _score_single_tokens(model, items, pad_id=pad_id, batch_size=batch_size, device=device)
        # Sorting by length wastes less compute on padding; results are put back in order.
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        return _in_original_order([sequence_logps(model, collate([items[i] for i in idx], pad_id, device))[0]
                                   for idx in batches], order)


@torch.no_grad()
def score_pairs(model, chosen: Sequence[Encoded], rejected: Sequence[Encoded], *, pad_id: int, batch_size: int,
                device) -> tuple[Tensor, Tensor]:
    """Summed response log-probs of many pairs, in order, without gradients: ([P], [P]).

    ``batch_size`` counts sequences (two per pair), as in :func:`score_all`; pairs whose
    prompt is shared are scored in one row each where that saves compute.
    """
    if chosen and all(e.n_response == 1 for e in (*chosen, *rejected)):  # one forward per prompt, none per answer
        scores = score_all(model, [*chosen, *rejected], pad_id=pad_id, batch_size=batch_size, device=device)
        return scores[:len(chosen)], scores[len(chosen):]
    hidden_size = getattr(model.config, "hidden_size", None)
    order = sorted(range(len(chosen)), key=lambda i: max(len(chosen[i].ids), len(rejected[i].ids)))
    step = max(1, batch_size // 2)
    out_chosen, out_rejected = [], []
    with eval_mode(model):
        for start in range(0, len(order), step):
            idx = order[start:start + step]
            batch = collate_pairs([chosen[i] for i in idx], [rejected[i] for i in idx], pad_id, device,
                                  hidden_size=hidden_size)
            chosen_logps, rejected_logps = sequence_logps(model, batch)[0].chunk(2)  # rows: [chosen; rejected]
            out_chosen.append(chosen_logps)
            out_rejected.append(rejected_logps)
    return _in_original_order(out_chosen, order), _in_original_order(out_rejected, order)


def _score_single_tokens(model, items: Sequence[Encoded], *, pad_id: int, batch_size: int, device) -> Tensor:
    """Log-probs of one-token responses, each distinct prompt run once: [len(items)].

    The hidden state after a prompt predicts every answer to it, so K answers cost one
    forward of the prompt instead of K forwards of prompt + answer (paraphrase: half the
    work). Equal to :func:`score_all`'s general path up to float rounding.
    """
    # Each distinct prompt with one of its answers as the response: the predictor is the
    # prompt's last position, whose distribution over the vocabulary scores all its answers.
    answered_by: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(items):
        answered_by.setdefault(e.ids[:-1], []).append(i)
    groups = sorted(answered_by.values(), key=lambda g: len(items[g[0]].ids))  # less padding
    head = model.get_output_embeddings()
    scores = torch.empty(len(items))
    for start in range(0, len(groups), batch_size):
        chunk = groups[start:start + batch_size]
        batch = collate([items[g[0]] for g in chunk], pad_id, device)
        logps = head(predictor_states(model, batch)).float().log_softmax(-1)  # [b, V]
        rows = torch.tensor([k for k, g in enumerate(chunk) for _ in g], device=logps.device)
        answers = torch.tensor([items[i].ids[-1] for g in chunk for i in g], device=logps.device)
        scores[[i for g in chunk for i in g]] = logps[rows, answers].cpu()
    return scores


def _in_original_order(parts: list[Tensor], order: list[int]) -> Tensor:
    """Scores computed in ``order`` (batch by batch), put back at their original indices, on CPU."""
    scores = torch.cat(parts).cpu() if parts else torch.zeros(0)
    result = torch.empty_like(scores)
    result[torch.tensor(order, dtype=torch.long)] = scores
    return result
