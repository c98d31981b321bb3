"""Pure loss functions of log-probabilities (contract 1 of DESIGN.md): SFT losses take the
log-probability of each target token, preference losses one summed log-probability per response.

Notation: for a pair (x, y_w, y_l), π = the policy, π_ref = the reference, and
    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
is the difference of implicit rewards divided by β (DPO paper, Eq. 7).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F

from prefnb import objectives

Tensor = torch.Tensor

# --- SFT: f-divergence token losses
# The χ² loss 1/q − 1 overflows float32 once q < e^-88; clamping log q at this floor keeps
# the loss and its gradient finite for any input (the gradient is zero below the floor,
# which a model of sane initialisation never reaches).
LOG_Q_FLOOR = -60.0


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _js(lp: Tensor) -> Tensor:
    q = lp.exp()
    # q log q − (1+q) log(1+q) + 2 log 2, with log(1+q) = softplus(log q) for stability.
    return 0.5 * (q * lp - (1.0 + q) * F.softplus(lp) + 2.0 * math.log(2.0))


TOKEN_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "kl": lambda lp: -lp,
    "tv": lambda lp: -torch.expm1(lp),  # 1 − q, exact near q = 1
    "chi2": lambda lp: torch.expm1(-lp.clamp(min=LOG_Q_FLOOR)),  # 1/q − 1
    "hellinger": lambda lp: -2.0 * torch.expm1(0.5 * lp),  # 2 − 2√q
    "js": _js,
}


def token_loss(kind: str, target_logps: Tensor) -> Tensor:
    r"""Per-token SFT loss as an f-divergence between data and model next-token distributions.

    At one position let the data distribution be one-hot on the target token y, p = δ_y,
    and let q = π(y | context) be the model's probability of it. For a convex f with
    f(1) = 0, D_f(p ‖ π) = Σ_v π(v) f(p(v)/π(v)) = q·f(1/q) + (1 − q)·f(0), which gives

    ========== ========================================== ===========================
    kind       f(t)                                       loss as a function of q
    ========== ========================================== ===========================
    kl         t log t                                    −log q   (cross-entropy)
    tv         ½|t − 1|                                   1 − q
    chi2       (t − 1)²                                   1/q − 1
    hellinger  (√t − 1)²                                  2 − 2√q
    js         ½[t log t − (1+t) log((1+t)/2)]             ½[2 log 2 − (1+q) log(1+q) + q log q]
    ========== ========================================== ===========================

    Only ``kl`` is unbounded in q → 0 with a constant gradient in log q; tv, hellinger
    and js give vanishing gradients to tokens the model finds very unlikely (robust to
    noisy targets), χ² gives them larger ones.

    target_logps: log q for each target token, any shape (typically [n_tokens]) → the loss per
    token, same shape, in float32 or wider (exp/log1p of half precision loses the small-q tail).
    """
    try:
        fn = TOKEN_LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown token loss '{kind}'; choose from {sorted(TOKEN_LOSSES)}") from None
    return fn(_at_least_float32(target_logps))


# --- Preference losses: each returns (losses [B], chosen_rewards [B], rejected_rewards [B])
def _per_token(logps: Tensor, lengths: Tensor | None, kind: str) -> Tensor:
    """Length-normalised log-prob: summed log-prob / number of response tokens."""
    if lengths is None:
        raise ValueError(f"preference loss '{kind}' is length-normalised: pass chosen_lengths and rejected_lengths")
    return logps / lengths.to(logps.dtype).clamp(min=1.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, switching form at −ln 2 to avoid cancellation (Mächler 2012).

    torch.where back-propagates through both forms, and the unused one's infinite gradient
    times 0 is NaN (log1p(−eˣ) at x ≈ 0, e.g. a response the model is sure of), so each form
    only sees inputs where it is used. x = 0 (P(y) = 1 exactly in float32) is clamped to the
    smallest normal negative number, which keeps log(1 − P) finite (≈ −87 in float32).
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    small = x < -math.log(2.0)
    return torch.where(small, torch.log1p(-torch.exp(torch.where(small, x, -1.0))),
                       torch.log(-torch.expm1(torch.where(small, -0.5, x))))


def dpo(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None):
    """DPO, Rafailov et al. 2023, Eq. 7: −log σ(β h). Shapes: all [B]."""
    chosen_lr, rejected_lr = pc - rc, pr - rr
    losses = -F.logsigmoid(beta * (chosen_lr - rejected_lr))
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def cdpo(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None, label_smoothing):
    """Conservative DPO (Mitchell 2023), labels flipped with probability ε:
    −(1−ε) log σ(β h) − ε log σ(−β h), a biased but bounded-gradient estimate."""
    chosen_lr, rejected_lr = pc - rc, pr - rr
    logits = beta * (chosen_lr - rejected_lr)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def robust(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None, label_smoothing):
    """Robust DPO (Chowdhury et al. 2024, Eq. 8), the unbiased de-noised loss for flip rate ε:
    [−(1−ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)."""
    chosen_lr, rejected_lr = pc - rc, pr - rr
    logits = beta * (chosen_lr - rejected_lr)
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing)
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def ipo(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None):
    """IPO (Azar et al. 2023, Eq. 17) on per-token log-ratios, as TRL does: (h̄ − 1/(2β))²."""
    chosen_lr, rejected_lr = pc - rc, pr - rr
    h_mean = _per_token(chosen_lr, chosen_lengths, "ipo") - _per_token(rejected_lr, rejected_lengths, "ipo")
    losses = (h_mean - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def hinge(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None):
    """SLiC-style hinge on the DPO margin (Zhao et al. 2023): max(0, 1 − β h)."""
    chosen_lr, rejected_lr = pc - rc, pr - rr
    losses = torch.relu(1 - beta * (chosen_lr - rejected_lr))
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def simpo(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None, simpo_gamma):
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ).
    Reference-free: the reward is the length-normalised policy log-prob; rc, rr are ignored."""
    chosen = _per_token(pc, chosen_lengths, "simpo")
    rejected = _per_token(pr, rejected_lengths, "simpo")
    losses = -F.logsigmoid(beta * (chosen - rejected) - simpo_gamma)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def cpo(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None, cpo_alpha):
    """CPO (Xu et al. 2024, Eq. 3 + the NLL regulariser of Eq. 4), reference-free.

    −log σ(β[log π(y_w) − log π(y_l)]) + α · NLL(y_w), NLL per token of the chosen response.
    Differs from TRL by design in one point: TRL's NLL is the token mean over all chosen
    tokens of the batch, ours the per-token NLL of each pair (so the batch mean weighs
    every pair equally, like the preference term). They agree when the chosen responses of
    a batch have equal lengths (tests/test_losses_trl.py checks both facts).
    """
    losses = -F.logsigmoid(beta * (pc - pr))
    if cpo_alpha:
        losses = losses - cpo_alpha * _per_token(pc, chosen_lengths, "cpo")
    return losses, beta * pc.detach(), beta * pr.detach()


def orpo(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None):
    """ORPO (Hong et al. 2024, Eqs. 4–7), reference-free: NLL(y_w) − β log σ(log odds ratio).

    odds(y) = P(y)/(1 − P(y)) with P(y) the per-token-averaged probability exp(log π(y)/|y|).
    Differs from TRL by design in the NLL term: TRL's runs over the prompt and the response
    and is a token mean over the batch; ours is the per-token NLL of the chosen response
    only (the prompt is not trained on, as in our SFT and CPO), per pair. The odds-ratio
    term equals TRL's."""
    # log1mexp loses the P → 1 tail in half precision, so compute in float32 at least (TRL
    # always casts to float32; float64 inputs stay float64 here, so tests can compare to 1e-6).
    chosen = _at_least_float32(_per_token(pc, chosen_lengths, "orpo"))
    rejected = _at_least_float32(_per_token(pr, rejected_lengths, "orpo"))
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -chosen - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto(pc, pr, rc, rr, *, beta, chosen_lengths=None, rejected_lengths=None, kl=None,
        desirable_weight, undesirable_weight):
    """KTO (Ethayarajh et al. 2024, Eq. 7) on paired data: y_w desirable, y_l undesirable.

    L = ½[λ_D (1 − σ(β(r_w − z₀))) + λ_U (1 − σ(β(z₀ − r_l)))], r = log π − log π_ref.
    z₀ ≈ KL(π ‖ π_ref), not back-propagated through, is ``kl`` (a scalar, used as given): the
    authors' estimate is :func:`kto_reference_point` of mismatched pairs (training's default,
    ``kto_reference_point: mismatched``). Without it, z₀ is the in-batch estimate: the mean of
    all 2B matched log-ratios, clamped at 0 (``kto_reference_point: batch``). The ½ makes the
    mean over pairs equal TRL's mean over its 2B unpaired examples.
    """
    chosen_lr, rejected_lr = pc - rc, pr - rr
    if kl is None:
        kl = torch.cat([chosen_lr, rejected_lr]).mean().clamp(min=0)
    kl = torch.as_tensor(kl, dtype=chosen_lr.dtype, device=chosen_lr.device).detach()
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_lr - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_lr))
    losses = 0.5 * (desirable_weight * chosen_losses + undesirable_weight * rejected_losses)
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def kto_reference_point(mismatched_policy_logps: Tensor, mismatched_ref_logps: Tensor) -> Tensor:
    """KTO's z₀ as its authors estimate it (Ethayarajh et al. 2024, §4; HALOs; TRL's KTOTrainer):
    the mean log-ratio log π(y'|x) − log π_ref(y'|x) over mismatched pairs (x_i with the batch's
    y_{i−1}), clamped at 0, with no gradient. Shapes: [M] each → a scalar."""
    return (mismatched_policy_logps - mismatched_ref_logps).mean().clamp(min=0).detach()


# Each preference objective of `prefnb.objectives.OBJECTIVES` is trained with the function of
# its name above: that table is the one list of objectives (and of the reference-free ones).
PREFERENCE_LOSSES: dict[str, Callable] = {kind: globals()[kind] for kind in objectives.PREFERENCE_OBJECTIVES}
REFERENCE_FREE = objectives.REFERENCE_FREE


def loss_options(kind: str) -> tuple[str, ...]:
    """Names of the extra keyword options a preference loss accepts (e.g. label_smoothing);
    their defaults, with sources, are in `prefnb.objectives` (and every one is a RunParams key)."""
    params = inspect.signature(_preference_fn(kind)).parameters
    return tuple(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in _COMMON)


# Not options: β is every loss's; the lengths come with the batch; KTO's kl is computed per
# batch (kto_reference_point), not set.
_COMMON = frozenset({"beta", "chosen_lengths", "rejected_lengths", "kl"})


def _preference_fn(kind: str) -> Callable:
    try:
        return PREFERENCE_LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown preference loss '{kind}'; choose from {sorted(PREFERENCE_LOSSES)}") from None


def preference_loss(kind, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    *, beta, chosen_lengths=None, rejected_lengths=None, **options):
    """Per-pair preference loss and implicit rewards.

    Args:
        kind: a key of ``PREFERENCE_LOSSES`` (a preference objective of `prefnb.objectives`).
        policy_chosen_logps, policy_rejected_logps: [B] summed log π(y|x) of each response.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference (zeros, or the
            prior log π_ref(y) without the prompt: DESIGN.md contract 1).
        beta: inverse temperature β (> 0).
        chosen_lengths, rejected_lengths: [B] response token counts (length-normalised kinds).
        options: ``loss_options(kind)``; those not given take the defaults of `prefnb.objectives`.
    Returns:
        (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are detached.
    """
    fn = _preference_fn(kind)
    options = {**{name: objectives.default(kind, name) for name in objectives.option_names(kind)}, **options}
    return fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              beta=beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **options)
