"""prefnb.losses equals TRL's losses on the same log-probabilities (contract 1 of DESIGN.md).

We call TRL's own code, not a copy of it: the real (unbound) trainer methods run on a
lightweight stand-in for ``self`` that carries only the attributes they read, and on a
stand-in model whose per-token log-probs we choose, so that TRL and prefnb see exactly the
same numbers. Everything is float64 and compared to 1e-6 (absolute and relative), except
where TRL itself computes in float32 (ORPO), which is stated where it happens.

Written against TRL 1.16.0, the version the `dev` extra of pyproject.toml pins (a test below
fails when another TRL is installed: these tests read TRL's internals, which move): DPO (``DPOTrainer._compute_loss``, losses inline), KTO
(``KTOTrainer._compute_loss``), and ``trl.experimental`` CPO/SimPO and ORPO.
"""

from __future__ import annotations

import os
import types
import warnings
from collections import defaultdict

import pytest
import torch

from prefnb.losses import preference_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")


def test_trl_is_the_version_these_tests_were_written_against():
    import re
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()  # no tomllib on 3.10
    pins = re.findall(r'^\s*"(trl[^"]*)"', pyproject, re.M)
    pinned = re.fullmatch(r"trl==([\w.]+)", pins[0]) if len(pins) == 1 else None
    assert pinned, f"pyproject's dev extra must pin TRL exactly once (trl==X.Y.Z), got {pins}"
    assert trl.__version__ == pinned.group(1), (
        f"TRL {trl.__version__} is installed, but these parity tests read TRL {pinned.group(1)}'s code: "
        f"`pip install -e .[dev]` (or update the tests and the pin together)")

TOL = dict(atol=1e-6, rtol=1e-6)
CPU = torch.device("cpu")
BETAS = [0.01, 0.1, 1.0]
# (seed, batch size): batch 1 exercises the degenerate means, 16 a realistic batch.
BATCHES = [(0, 1), (1, 4), (2, 16)]


def _import(module: str, name: str):
    """A TRL class, or skip with the reason if this TRL version does not have it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError) as err:  # pragma: no cover - depends on the installed TRL
        pytest.skip(f"{module}.{name} is not importable in trl {trl.__version__}: {err}")


def _close(actual, expected, **tol):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), **(tol or TOL))


def _accelerator():
    """Single process: gathering is the identity."""
    return types.SimpleNamespace(device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x)


def _pairs(seed: int, batch: int):
    """Summed log-probs (policy, reference) and response lengths of `batch` pairs, float64.

    Pair 0 has chosen less likely than rejected under the policy and a negative margin h
    (the policy prefers the rejected response more than the reference does); pair 1 the
    opposite, so every batch of two or more holds both cases.
    """
    g = torch.Generator().manual_seed(seed)
    cl = torch.randint(1, 12, (batch,), generator=g)
    rl = torch.randint(1, 12, (batch,), generator=g)
    pc = -(torch.rand(batch, generator=g, dtype=torch.float64) * 4 + 0.05) * cl
    pr = -(torch.rand(batch, generator=g, dtype=torch.float64) * 4 + 0.05) * rl
    rc = pc + torch.randn(batch, generator=g, dtype=torch.float64) * 2
    rr = pr + torch.randn(batch, generator=g, dtype=torch.float64) * 2
    if batch >= 2:
        pc[0], pr[0], rc[0], rr[0] = -9.0, -2.0, -7.0, -3.5  # pc < pr, h = (−2) − (1.5) < 0
        pc[1], pr[1], rc[1], rr[1] = -1.5, -6.0, -2.5, -4.0  # pc > pr, h = 1 − (−2) > 0
    return pc, pr, rc, rr, cl, rl


def _token_layout(seq_logps, lengths, width, g):
    """Spread each sequence log-prob over its response tokens, as a causal LM's outputs would be.

    Returns per-token log-probs [N, width] (row sums = seq_logps, 0 outside the response),
    completion_mask [N, width + 1] (the ones in mask[:, 1:] are the response positions of
    the shifted log-probs; position 0 is always prompt) and attention_mask (right padding).
    """
    n = seq_logps.shape[0]
    per_token = torch.zeros(n, width, dtype=seq_logps.dtype)
    completion_mask = torch.zeros(n, width + 1, dtype=torch.long)
    attention_mask = torch.zeros(n, width + 1, dtype=torch.long)
    for i in range(n):
        length = int(lengths[i])
        start = int(torch.randint(1, width + 2 - length, (1,), generator=g))  # first response position
        completion_mask[i, start:start + length] = 1
        attention_mask[i, :start + length] = 1
        w = torch.rand(length, generator=g, dtype=seq_logps.dtype) + 0.1
        per_token[i, start - 1:start - 1 + length] = seq_logps[i] * w / w.sum()
    return per_token, completion_mask, attention_mask


class _FakeCausalLM:
    """Stands in for the model TRL's DPO/KTO trainers call with ``fused_lm_head=True``.

    Returns the chosen per-token log-probs for inputs of the matching shape, plus entropy,
    mean logits and top-1 flags of the right shapes for TRL's logging.
    """

    def __init__(self, *per_token_logps, seed=0):
        self.outputs = {}
        g = torch.Generator().manual_seed(seed)
        for lp in per_token_logps:
            self.outputs[lp.shape[1] + 1] = types.SimpleNamespace(
                log_probs=lp,
                entropy=torch.rand(lp.shape, generator=g, dtype=lp.dtype),
                mean_logits=torch.randn(lp.shape, generator=g, dtype=lp.dtype),
                is_top1=torch.rand(lp.shape, generator=g) > 0.5,
            )

    def __call__(self, *, input_ids, attention_mask, labels, fused_lm_head, use_cache=False, **kwargs):
        assert fused_lm_head and labels.shape == input_ids.shape
        out = self.outputs[input_ids.shape[1]]
        assert out.log_probs.shape[0] == input_ids.shape[0]
        return out


def _metrics():
    return defaultdict(lambda: defaultdict(list))


def _training_trainer_self(**fields):
    """A stand-in `self` for TRL's DPO/KTO `_compute_loss`: the state every such trainer
    reads while training on precomputed reference log-probs, plus ``fields``."""
    return types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_accelerator(), precompute_ref_logps=True,
        aux_loss_enabled=False, _metrics=_metrics(), _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(),
        **fields)


def _ours(kind, pc, pr, rc, rr, cl, rl, beta, **options):
    return preference_loss(kind, pc, pr, rc, rr, beta=beta, chosen_lengths=cl, rejected_lengths=rl, **options)


def _assert_reward_metrics(logged, chosen_rewards, rejected_rewards, accuracies=True):
    """TRL's logged reward metrics (contract 2 names) equal the batch means of ours."""
    _close(logged["rewards/chosen"][-1], chosen_rewards.mean())
    _close(logged["rewards/rejected"][-1], rejected_rewards.mean())
    _close(logged["rewards/margins"][-1], (chosen_rewards - rejected_rewards).mean())
    if accuracies:
        assert logged["rewards/accuracies"][-1] == (chosen_rewards > rejected_rewards).double().mean().item()


# ---------------------------------------------------------------------------------------
# DPO trainer: sigmoid, hinge, ipo, robust
# ---------------------------------------------------------------------------------------
def _trl_dpo(loss_type, pc, pr, rc, rr, cl, rl, beta, label_smoothing=0.0, seed=0):
    """TRL's DPOTrainer._compute_loss on a batch whose log-probs sum to (pc, pr); returns (loss, metrics, lengths)."""
    DPOTrainer = _import("trl.trainer.dpo_trainer", "DPOTrainer")
    g = torch.Generator().manual_seed(seed + 100)
    width = int(torch.cat([cl, rl]).max()) + 3
    per_token, completion_mask, attention_mask = _token_layout(torch.cat([pc, pr]), torch.cat([cl, rl]), width, g)
    fake_self = _training_trainer_self(
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        use_weighting=False,
    )
    inputs = {
        "input_ids": torch.randint(0, 50, completion_mask.shape, generator=g),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(fake_self, _FakeCausalLM(per_token, seed=seed), inputs, return_outputs=False)
    lengths = completion_mask[:, 1:].sum(1)
    # The sequence log-probs exactly as TRL summed them (equal to pc, pr up to rounding).
    seq = per_token.sum(1)
    return loss, fake_self._metrics["train"], lengths.chunk(2), seq.chunk(2)


DPO_CASES = [
    ("sigmoid", "dpo", {}),
    ("hinge", "hinge", {}),
    ("ipo", "ipo", {}),
    ("robust", "robust", {"label_smoothing": 0.1}),
    ("robust", "robust", {"label_smoothing": 0.3}),
]


@pytest.mark.parametrize("trl_type, kind, options", DPO_CASES, ids=[f"{c[0]}-{c[2]}" for c in DPO_CASES])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed, batch", BATCHES)
def test_dpo_trainer_losses(trl_type, kind, options, beta, seed, batch):
    pc, pr, rc, rr, cl, rl = _pairs(seed, batch)
    trl_loss, logged, (cl_trl, rl_trl), (pc_trl, pr_trl) = _trl_dpo(
        trl_type, pc, pr, rc, rr, cl, rl, beta, label_smoothing=options.get("label_smoothing", 0.0), seed=seed)
    # The fake batch encodes the lengths we meant: TRL's IPO divides by these counts.
    assert torch.equal(cl_trl, cl) and torch.equal(rl_trl, rl)
    losses, chosen_rewards, rejected_rewards = _ours(kind, pc_trl, pr_trl, rc, rr, cl_trl, rl_trl, beta, **options)
    _close(trl_loss, losses.mean())
    _assert_reward_metrics(logged, chosen_rewards, rejected_rewards)
    _close(logged["logps/chosen"][-1], pc.mean())
    _close(logged["logps/rejected"][-1], pr.mean())


def test_dpo_trainer_at_policy_equals_reference_is_ln2():
    pc, pr, _, _, cl, rl = _pairs(3, 8)
    for beta in (0.01, 1.0):
        trl_loss, _, _, _ = _trl_dpo("sigmoid", pc, pr, pc, pr, cl, rl, beta)
        _close(trl_loss, torch.log(torch.tensor(2.0, dtype=torch.float64)))


# ---------------------------------------------------------------------------------------
# cDPO: TRL 1.16's DPO "sigmoid" has no label smoothing, CPO's "sigmoid" does
# ---------------------------------------------------------------------------------------
def _cpo_self(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=0.0):
    CPOTrainer = _import("trl.experimental.cpo", "CPOTrainer")
    fake_self = types.SimpleNamespace(
        alpha=0.0,  # AlphaPO reward shaping off: the reward is the log-prob itself
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        simpo_gamma=simpo_gamma,
        cpo_alpha=cpo_alpha,
        accelerator=_accelerator(),
        is_encoder_decoder=False,
        pad_token_id=0,
        aux_loss_enabled=False,
        concatenated_inputs=CPOTrainer.concatenated_inputs,  # static methods
        get_batch_logps=CPOTrainer.get_batch_logps,
    )
    fake_self.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, fake_self)
    fake_self.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, fake_self)
    return CPOTrainer, fake_self


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed, batch", BATCHES)
def test_cdpo_equals_trl_label_smoothed_sigmoid(eps, beta, seed, batch):
    # TRL 1.16 dropped label smoothing from DPOTrainer's "sigmoid" loss; the conservative
    # (label-smoothed) sigmoid lives on in CPOTrainer.cpo_loss, whose logits are
    # policy_chosen − policy_rejected. cDPO's logits are h = (pc − rc) − (pr − rr), linear
    # in the same way, so feeding cpo_loss the log-ratios pc − rc and pr − rr as its
    # "policy log-probs" gives exactly the cDPO loss, and β·log-ratio as its rewards.
    pc, pr, rc, rr, cl, rl = _pairs(seed, batch)
    CPOTrainer, fake_self = _cpo_self("sigmoid", beta, label_smoothing=eps)
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(fake_self, pc - rc, pr - rr)
    losses, chosen_rewards, rejected_rewards = _ours("cdpo", pc, pr, rc, rr, cl, rl, beta, label_smoothing=eps)
    _close(trl_losses, losses)
    _close(trl_chosen, chosen_rewards)
    _close(trl_rejected, rejected_rewards)


# ---------------------------------------------------------------------------------------
# SimPO and CPO (trl.experimental.cpo)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.4])
@pytest.mark.parametrize("beta", BETAS + [2.5])
@pytest.mark.parametrize("seed, batch", BATCHES)
def test_simpo_equals_trl(gamma, beta, seed, batch):
    pc, pr, rc, rr, cl, rl = _pairs(seed, batch)
    CPOTrainer, fake_self = _cpo_self("simpo", beta, simpo_gamma=gamma)
    # TRL's CPO trainer feeds SimPO per-token-average log-probs (average_log_prob=True).
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(fake_self, pc / cl, pr / rl)
    losses, chosen_rewards, rejected_rewards = _ours("simpo", pc, pr, rc, rr, cl, rl, beta, simpo_gamma=gamma)
    _close(trl_losses, losses)
    _close(trl_chosen, chosen_rewards)
    _close(trl_rejected, rejected_rewards)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed, batch", BATCHES)
def test_cpo_preference_term_equals_trl(beta, seed, batch):
    pc, pr, rc, rr, cl, rl = _pairs(seed, batch)
    CPOTrainer, fake_self = _cpo_self("sigmoid", beta)
    # TRL's CPO "sigmoid" works on summed log-probs (average_log_prob is only for ipo/simpo).
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(fake_self, pc, pr)
    losses, chosen_rewards, rejected_rewards = _ours("cpo", pc, pr, rc, rr, cl, rl, beta, cpo_alpha=0.0)
    _close(trl_losses, losses)
    _close(trl_chosen, chosen_rewards)
    _close(trl_rejected, rejected_rewards)


def _logit_batch(seed, batch, chosen_lengths, rejected_lengths, prompt_len, vocab=13):
    """A batch in the format of TRL's CPO/ORPO collators, and random float64 logits for it.

    Returns (batch dict, logits [2B, T, V] for the concatenated chosen-then-rejected inputs,
    summed response log-probs pc, pr, computed here independently of TRL).
    """
    g = torch.Generator().manual_seed(seed)
    width = prompt_len + int(torch.cat([chosen_lengths, rejected_lengths]).max()) + 2
    out = {}
    for side, lengths in (("chosen", chosen_lengths), ("rejected", rejected_lengths)):
        ids = torch.randint(1, vocab, (batch, width), generator=g)
        attention = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), -100)
        for i, n in enumerate(lengths.tolist()):
            attention[i, :prompt_len + n] = 1
            labels[i, prompt_len:prompt_len + n] = ids[i, prompt_len:prompt_len + n]
        ids = ids.masked_fill(attention == 0, 0)
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    logits = torch.randn(2 * batch, width, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.cat([out["chosen_labels"], out["rejected_labels"]])
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    seq = (token_logps * (labels[:, 1:] != -100)).sum(1)
    return out, logits, *seq.chunk(2)


class _FakeLogitsLM:
    def __init__(self, logits):
        self.logits = logits

    def __call__(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        assert input_ids.shape == self.logits.shape[:2]
        return types.SimpleNamespace(logits=self.logits)


@pytest.mark.parametrize("cpo_alpha", [1.0, 0.3])
@pytest.mark.parametrize("beta", [0.01, 1.0])
@pytest.mark.parametrize("seed, batch", BATCHES)
def test_cpo_full_loss_equals_trl_with_equal_chosen_lengths(cpo_alpha, beta, seed, batch):
    """TRL's whole CPO step (get_batch_loss_metrics: forward, NLL, cpo_loss) vs our cpo.

    Assumption: all chosen responses in the batch have the same length. TRL's NLL is the
    token mean over every chosen token of the batch; ours is the per-token NLL of each
    chosen response, averaged over pairs (so every pair weighs the same, like every other
    term of the loss). The two coincide when the chosen lengths are equal; the test below
    pins down what each computes when they are not.
    """
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 6, (1,), generator=g))
    chosen_lengths = torch.full((batch,), n)
    rejected_lengths = torch.randint(1, 8, (batch,), generator=g)
    inputs, logits, pc, pr = _logit_batch(seed, batch, chosen_lengths, rejected_lengths, prompt_len=3)
    CPOTrainer, fake_self = _cpo_self("sigmoid", beta, cpo_alpha=cpo_alpha)
    trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(fake_self, _FakeLogitsLM(logits), inputs)
    zeros = torch.zeros_like(pc)  # reference-free; any value would do
    losses, chosen_rewards, rejected_rewards = _ours("cpo", pc, pr, zeros, zeros, chosen_lengths, rejected_lengths,
                                                     beta, cpo_alpha=cpo_alpha)
    _close(trl_loss, losses.mean())
    _close(trl_metrics["nll_loss"], (-pc / chosen_lengths).mean())
    _close(trl_metrics["logps/chosen"], pc.mean())
    _assert_reward_metrics({k: [v] for k, v in trl_metrics.items()}, chosen_rewards, rejected_rewards)


def test_cpo_nll_with_unequal_chosen_lengths_is_a_documented_difference():
    """TRL: −Σ pc / Σ |y_w| (token mean over the batch); prefnb: mean over pairs of −pc/|y_w|."""
    chosen_lengths, rejected_lengths = torch.tensor([1, 4, 9]), torch.tensor([2, 2, 5])
    inputs, logits, pc, pr = _logit_batch(7, 3, chosen_lengths, rejected_lengths, prompt_len=2)
    CPOTrainer, fake_self = _cpo_self("sigmoid", 0.1, cpo_alpha=1.0)
    _, trl_metrics = CPOTrainer.get_batch_loss_metrics(fake_self, _FakeLogitsLM(logits), inputs)
    _close(trl_metrics["nll_loss"], -pc.sum() / chosen_lengths.sum())
    zeros = torch.zeros_like(pc)
    with_nll, _, _ = _ours("cpo", pc, pr, zeros, zeros, chosen_lengths, rejected_lengths, 0.1, cpo_alpha=1.0)
    without, _, _ = _ours("cpo", pc, pr, zeros, zeros, chosen_lengths, rejected_lengths, 0.1, cpo_alpha=0.0)
    _close((with_nll - without).mean(), (-pc / chosen_lengths).mean())


# ---------------------------------------------------------------------------------------
# ORPO (trl.experimental.orpo)
# ---------------------------------------------------------------------------------------
def _orpo_self(beta):
    ORPOTrainer = _import("trl.experimental.orpo", "ORPOTrainer")
    fake_self = types.SimpleNamespace(
        beta=beta,
        accelerator=_accelerator(),
        is_encoder_decoder=False,
        padding_value=0,
        aux_loss_enabled=False,
        concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps,
    )
    fake_self.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, fake_self)
    fake_self.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, fake_self)
    return ORPOTrainer, fake_self


# TRL's odds_ratio_loss casts its inputs to float32 and so computes the log-odds in
# float32; prefnb keeps float64. Their difference is float32 rounding (~1e-7 relative),
# below the 1e-6 tolerance on these magnitudes: no tolerance is loosened for it.
@pytest.mark.parametrize("beta", BETAS + [0.5])
@pytest.mark.parametrize("seed, batch", BATCHES)
def test_orpo_equals_trl(beta, seed, batch):
    pc, pr, rc, rr, _, rl = _pairs(seed, batch)
    # Equal chosen lengths: TRL's NLL is a token mean over the batch, ours a mean over pairs.
    cl = torch.full_like(rl, 5)
    ORPOTrainer, fake_self = _orpo_self(beta)
    # TRL's ORPO works on per-token-average log-probs (average_log_prob=True).
    trl_terms, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(fake_self, pc / cl, pr / rl)
    nll = (-pc / cl).mean()
    trl_loss = nll - trl_terms.mean()  # as in ORPOTrainer.get_batch_loss_metrics
    losses, chosen_rewards, rejected_rewards = _ours("orpo", pc, pr, rc, rr, cl, rl, beta)
    _close(trl_loss, losses.mean())
    # Per pair, our loss minus its NLL term is TRL's −β log σ(log odds ratio).
    _close(losses - (-pc / cl), -trl_terms)
    _close(trl_chosen, chosen_rewards)
    _close(trl_rejected, rejected_rewards)


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("seed, batch", [(0, 1), (2, 6)])
def test_orpo_full_loss_equals_trl_with_one_token_prompts(beta, seed, batch):
    """TRL's whole ORPO step vs our orpo.

    TRL's ORPO NLL runs over the prompt *and* the response (every attended token after the
    first); prefnb's, like CPO's and the SFT loss, over the response only, so the prompt
    is not trained on. With a one-token prompt (the first token is never predicted) and
    equal chosen lengths the two are the same quantity, so the whole loss must agree.
    """
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.full((batch,), int(torch.randint(1, 6, (1,), generator=g)))
    rejected_lengths = torch.randint(1, 8, (batch,), generator=g)
    inputs, logits, pc, pr = _logit_batch(seed, batch, chosen_lengths, rejected_lengths, prompt_len=1)
    ORPOTrainer, fake_self = _orpo_self(beta)
    trl_loss, trl_metrics = ORPOTrainer.get_batch_loss_metrics(fake_self, _FakeLogitsLM(logits), inputs)
    zeros = torch.zeros_like(pc)
    losses, chosen_rewards, rejected_rewards = _ours("orpo", pc, pr, zeros, zeros, chosen_lengths,
                                                     rejected_lengths, beta)
    _close(trl_loss, losses.mean())
    _close(trl_metrics["nll_loss"], (-pc / chosen_lengths).mean())
    _assert_reward_metrics({k: [v] for k, v in trl_metrics.items()}, chosen_rewards, rejected_rewards)


# ---------------------------------------------------------------------------------------
# KTO trainer
# ---------------------------------------------------------------------------------------
def _trl_kto(pc, pr, rc, rr, cl, rl, beta, kl, desirable_weight, undesirable_weight, seed, ref_kl=None):
    """TRL's KTOTrainer._compute_loss on B desirable (our chosen) + B undesirable (our rejected) examples.

    The examples are shuffled (TRL selects each side by its label) and the KL batch (TRL's
    mismatched prompt/completion pairs) is built so that mean(KL_logps − ref_KL_logps) = kl,
    or, given ``ref_kl`` [2B], with those reference log-probs (then TRL estimates z₀ itself).
    Returns (loss, logged metrics, (chosen, rejected) log-probs as TRL summed them, the KL
    batch's policy log-probs as TRL summed them).
    """
    KTOTrainer = _import("trl.trainer.kto_trainer", "KTOTrainer")
    g = torch.Generator().manual_seed(seed + 200)
    b = pc.shape[0]
    order = torch.randperm(2 * b, generator=g)  # order[j] = which example sits at row j
    label = order < b  # examples 0..B-1 are the chosen responses
    seq = torch.cat([pc, pr])[order]
    ref = torch.cat([rc, rr])[order]
    lengths = torch.cat([cl, rl])[order]
    width = int(lengths.max()) + 3
    per_token, completion_mask, attention_mask = _token_layout(seq, lengths, width, g)
    # KL batch: other completions, a different width so the fake model can tell the calls apart.
    kl_lengths = torch.randint(1, 6, (2 * b,), generator=g)
    kl_seq = -torch.rand(2 * b, generator=g, dtype=torch.float64) * 10
    kl_per_token, kl_completion_mask, kl_attention_mask = _token_layout(kl_seq, kl_lengths, width + 4, g)
    noise = torch.randn(2 * b, generator=g, dtype=torch.float64)
    if ref_kl is None:
        ref_kl = kl_per_token.sum(1) - kl - (noise - noise.mean())
    fake_self = _training_trainer_self(
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        calculate_KL=True,
    )
    fake_self._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, fake_self)
    inputs = {
        "input_ids": torch.randint(0, 50, completion_mask.shape, generator=g),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "label": label,
        "ref_logps": ref,
        "KL_input_ids": torch.randint(0, 50, kl_completion_mask.shape, generator=g),
        "KL_attention_mask": kl_attention_mask,
        "KL_completion_mask": kl_completion_mask,
        "ref_KL_logps": ref_kl,
    }
    model = _FakeCausalLM(per_token, kl_per_token, seed=seed)
    loss = KTOTrainer._compute_loss(fake_self, model, inputs, return_outputs=False)
    # Undo the shuffle to hand back the sequence log-probs as TRL summed them, in pair order.
    seq_trl = torch.empty_like(seq)
    seq_trl[order] = per_token.sum(1)
    return loss, fake_self._metrics["train"], seq_trl.chunk(2), kl_per_token.sum(1)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
@pytest.mark.parametrize("kl", [0.0, 0.37, 2.0])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed, batch", BATCHES)
def test_kto_trainer_loss(weights, kl, beta, seed, batch):
    pc, pr, rc, rr, cl, rl = _pairs(seed, batch)
    trl_loss, logged, (pc_trl, pr_trl), _ = _trl_kto(pc, pr, rc, rr, cl, rl, beta, kl, *weights, seed=seed)
    _close(logged["kl"][-1], kl)  # the KL batch gives TRL the z₀ we chose
    losses, chosen_rewards, rejected_rewards = _ours("kto", pc_trl, pr_trl, rc, rr, cl, rl, beta, kl=kl,
                                                     desirable_weight=weights[0], undesirable_weight=weights[1])
    # TRL averages over its 2B unpaired examples; ours halves each pair's sum (see kto's docstring).
    _close(trl_loss, losses.mean())
    _assert_reward_metrics(logged, chosen_rewards, rejected_rewards, accuracies=False)
    _close(logged["logps/chosen"][-1], pc.mean())
    _close(logged["logps/rejected"][-1], pr.mean())


@pytest.mark.parametrize("shift", [-3.0, 0.0, 2.5])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed, batch", BATCHES)
def test_kto_reference_point_from_mismatched_pairs_matches_trl(shift, beta, seed, batch):
    """TRL estimates z₀ from its KL batch (the mismatched pairs); ours is
    losses.kto_reference_point of the same mismatched log-probs. shift < 0 makes the mean
    log-ratio negative, so both must clamp it at 0."""
    from prefnb.losses import kto_reference_point

    pc, pr, rc, rr, cl, rl = _pairs(seed, batch)
    g = torch.Generator().manual_seed(seed + 300)
    kl_policy = _trl_kto(pc, pr, rc, rr, cl, rl, beta, 0.0, 1.0, 1.0, seed=seed)[3]  # the KL batch TRL will see
    ref_kl = kl_policy - shift - torch.randn(2 * batch, generator=g, dtype=torch.float64)
    trl_loss, logged, (pc_trl, pr_trl), kl_policy_trl = _trl_kto(pc, pr, rc, rr, cl, rl, beta, None, 1.0, 1.0,
                                                                 seed=seed, ref_kl=ref_kl)
    z0 = kto_reference_point(kl_policy_trl, ref_kl)
    _close(logged["kl"][-1], z0)
    if shift < 0:
        assert z0.item() == 0.0
    losses, _, _ = _ours("kto", pc_trl, pr_trl, rc, rr, cl, rl, beta, kl=z0)
    _close(trl_loss, losses.mean())
