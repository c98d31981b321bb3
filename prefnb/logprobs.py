"""Tokenising (prompt, response) pairs and scoring responses: memory-lean log-probs.

Every objective needs log π(y_t | x, y_<t) at the response tokens only. Sequences are
left-padded so that all responses end at the last position; the model is run for its
hidden states, and the LM head is applied only at the positions that predict a response
token — never a full [batch, length, vocab] logits tensor, and nothing on the prompt.
"""

from __future__ import annotations

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
    """Left-pad a batch. Returns input_ids, attention_mask, position_ids [B, L] and
    response_mask [B, L] (1 on response tokens)."""
    length = max(len(e.ids) for e in items)
    batch = len(items)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    response_mask = torch.zeros((batch, length), dtype=torch.bool)
    for i, e in enumerate(items):
        n = len(e.ids)
        input_ids[i, length - n:] = torch.tensor(e.ids)
        attention_mask[i, length - n:] = 1
        response_mask[i, length - e.n_response:] = True
    # Left padding shifts real tokens right: positions must count real tokens only.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
               response_mask=response_mask)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def response_token_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Log-probs of every response token.

    Args:
        model: a causal LM (transformers or peft-wrapped).
        batch: from :func:`collate`; input_ids etc. [B, L].
    Returns:
        (token_logps [N] float32, row [N] long): N = number of response tokens in the batch,
        row = which sequence each token belongs to.
    """
    # Only the final hidden states are needed; logits_to_keep=1 stops the model from
    # applying the LM head to every position (we do it below on the positions that matter).
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]  # [B, L, d], final layer norm applied
    # The token at position t is predicted by the hidden state at t - 1.
    predicts = batch["response_mask"][:, 1:]  # [B, L-1]
    rows, cols = predicts.nonzero(as_tuple=True)
    states = hidden[:, :-1][rows, cols]  # [N, d]
    targets = batch["input_ids"][:, 1:][rows, cols]  # [N]
    head = model.get_output_embeddings()
    pieces = []
    for start in range(0, states.shape[0], HEAD_CHUNK):
        logits = head(states[start:start + HEAD_CHUNK]).float()  # [n, V]
        target_logits = logits.gather(-1, targets[start:start + HEAD_CHUNK, None]).squeeze(-1)
        pieces.append(target_logits - logits.logsumexp(-1))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return token_logps, rows


def sequence_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(summed log π(y|x) [B] float32, response lengths [B] float32)."""
    token_logps, rows = response_token_logps(model, batch)
    size = batch["input_ids"].shape[0]
    sums = torch.zeros(size, dtype=torch.float32, device=token_logps.device).index_add(0, rows, token_logps)
    lengths = batch["response_mask"].sum(-1).float()
    return sums, lengths


@torch.no_grad()
def score_all(model, items: Sequence[Encoded], *, pad_id: int, batch_size: int, device) -> Tensor:
    """Summed response log-probs of many sequences, in order, without gradients: [len(items)]."""
    was_training = model.training
    model.eval()
    out = []
    # Sorting by length wastes less compute on padding; results are put back in order.
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logps, _ = sequence_logps(model, collate([items[i] for i in idx], pad_id, device))
        out.append(logps)
    model.train(was_training)
    scores = torch.cat(out) if out else torch.zeros(0)
    result = torch.empty_like(scores)
    result[torch.tensor(order, device=scores.device)] = scores
    return result.cpu()
