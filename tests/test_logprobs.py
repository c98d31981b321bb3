"""Scoring responses: the shared-prompt pair layout gives the same log-probs as two rows."""

import pytest
import torch

from prefnb import models
from prefnb.logprobs import collate, collate_pairs, encode, sequence_logps, shared_prompt_pays

PROMPTS = ["Question 1: is this the same as that?\nAnswer:", "Q: short?", "A much longer prompt " * 6]
CHOSEN = [" yes", " no", " a longer chosen answer"]
REJECTED = [" no", " yes, of course it is", " x"]


def encoded_pairs(tokenizer, max_length=512):
    chosen = [encode(tokenizer, p, c, max_length=max_length, add_eos=True) for p, c in zip(PROMPTS, CHOSEN)]
    rejected = [encode(tokenizer, p, r, max_length=max_length, add_eos=True) for p, r in zip(PROMPTS, REJECTED)]
    return chosen, rejected


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_rows_score_like_separate_rows(lora):
    model, tokenizer = models.build_tiny(0)
    if lora:
        model = models.add_lora(model, r=4, alpha=8, dropout=0.0, targets="auto")
        for name, p in model.named_parameters():  # non-zero adapters, so that they matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    model.eval()
    chosen, rejected = encoded_pairs(tokenizer)
    separate = collate(chosen + rejected, tokenizer.pad_token_id)
    shared = collate_pairs(chosen, rejected, tokenizer.pad_token_id, hidden_size=64)
    assert shared["input_ids"].shape[0] == len(chosen)  # one row per pair: the layout was used
    expected, lengths = sequence_logps(model, separate)
    got, got_lengths = sequence_logps(model, shared)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(got_lengths, lengths) and int(shared["n_tokens"]) == int(separate["n_tokens"])


def test_shared_prompt_gradients_match_separate_rows():
    model, tokenizer = models.build_tiny(0)
    chosen, rejected = encoded_pairs(tokenizer)
    grads = []
    for batch in (collate(chosen + rejected, tokenizer.pad_token_id),
                  collate_pairs(chosen, rejected, tokenizer.pad_token_id, hidden_size=64)):
        model.zero_grad()
        logps, _ = sequence_logps(model, batch)
        (logps[:3] - 0.5 * logps[3:]).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_sharing_is_used_only_where_prompts_match_and_it_saves_compute():
    _, tokenizer = models.build_tiny(0)
    chosen, rejected = encoded_pairs(tokenizer)
    assert shared_prompt_pays(chosen, rejected, hidden_size=64)  # long prompts, short answers
    long_answers = [encode(tokenizer, "Q:", "x" * 400, max_length=512, add_eos=True)] * 2
    assert not shared_prompt_pays(long_answers[:1], long_answers[1:], hidden_size=64)  # rows would double
    truncated = [encode(tokenizer, PROMPTS[2], "y" * 60, max_length=100, add_eos=True)]
    assert not shared_prompt_pays(chosen[2:], truncated, hidden_size=64)  # the prompts were cut differently
    batch = collate_pairs(chosen[2:], truncated, tokenizer.pad_token_id, hidden_size=64)
    assert batch["input_ids"].shape[0] == 2 and "attention_mask" not in batch  # fell back to two rows


def test_score_pairs_equals_scoring_every_sequence_alone():
    from prefnb.logprobs import score_all, score_pairs

    model, tokenizer = models.build_tiny(0)
    chosen, rejected = encoded_pairs(tokenizer)
    both = score_all(model, chosen + rejected, pad_id=tokenizer.pad_token_id, batch_size=2, device="cpu")
    c, r = score_pairs(model, chosen, rejected, pad_id=tokenizer.pad_token_id, batch_size=4, device="cpu")
    torch.testing.assert_close(torch.cat([c, r]), both, rtol=1e-5, atol=1e-4)


def test_right_padded_rows_without_a_mask_score_like_each_sequence_alone():
    """Padding only ever follows a row's real tokens, so causal attention needs no mask."""
    from prefnb.logprobs import score_all

    model, tokenizer = models.build_tiny(0)
    chosen, rejected = encoded_pairs(tokenizer)
    items = chosen + rejected
    batch = collate(items, tokenizer.pad_token_id)
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] == max(len(e.ids) for e in items)
    together, _ = sequence_logps(model.eval(), batch)
    alone = score_all(model, items, pad_id=tokenizer.pad_token_id, batch_size=1, device="cpu")  # no padding
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_one_token_answers_to_shared_prompts_score_like_each_sequence_alone():
    """paraphrase: " yes" and " no" after the same prompt are scored from one forward of it."""
    from prefnb.logprobs import score_all, score_pairs

    model, tokenizer = models.build_tiny(0)
    bpe_like = [encode(tokenizer, p, a, max_length=512, add_eos=False) for p in PROMPTS for a in ("y", "n")]
    assert all(e.n_response == 1 for e in bpe_like)  # byte tokens: one-letter answers are one token
    alone = torch.cat([score_all(model, [e], pad_id=tokenizer.pad_token_id, batch_size=1, device="cpu")
                       for e in bpe_like])
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                           with_kwargs=True)
    together = score_all(model, bpe_like, pad_id=tokenizer.pad_token_id, batch_size=2, device="cpu")
    hook.remove()
    assert sum(rows) == len(PROMPTS)  # one row per prompt, not per answer
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    chosen, rejected = score_pairs(model, bpe_like[0::2], bpe_like[1::2], pad_id=tokenizer.pad_token_id,
                                   batch_size=4, device="cpu")
    torch.testing.assert_close(torch.cat([chosen, rejected]), torch.cat([alone[0::2], alone[1::2]]),
                               rtol=1e-5, atol=1e-5)
