"""Closed forms and properties of prefnb.losses (contract 1 of DESIGN.md).

Everything here is pure tensor arithmetic on made-up log-probabilities: no model, no
data, no network. Comparisons to 1e-6 are done in float64 so that a failure means a
wrong formula, not rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prefnb import losses as L
from prefnb.losses import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    TOKEN_LOSSES,
    loss_options,
    preference_loss,
    token_loss,
)

TOL = dict(atol=1e-6, rtol=1e-6)
LN2 = math.log(2.0)
LENGTH_NORMALISED = ("ipo", "simpo", "cpo", "orpo")
REFERENCE_BASED = tuple(k for k in PREFERENCE_LOSSES if k not in REFERENCE_FREE)


def _close(a, b, **tol):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               **(tol or TOL))


def _pairs(seed: int, batch: int = 16, dtype=torch.float64):
    """Random summed log-probs of a batch of pairs, with lengths; chosen < rejected in some pairs."""
    g = torch.Generator().manual_seed(seed)
    chosen_len = torch.randint(1, 40, (batch,), generator=g)
    rejected_len = torch.randint(1, 40, (batch,), generator=g)
    # Per-token log-probs in (-6, -0.01): summed log-probs of realistic size and sign.
    pc = -(torch.rand(batch, generator=g, dtype=dtype) * 6 + 0.01) * chosen_len
    pr = -(torch.rand(batch, generator=g, dtype=dtype) * 6 + 0.01) * rejected_len
    rc = pc + torch.randn(batch, generator=g, dtype=dtype) * 3
    rr = pr + torch.randn(batch, generator=g, dtype=dtype) * 3
    return pc, pr, rc, rr, chosen_len, rejected_len


def _call(kind, pc, pr, rc, rr, cl, rl, beta=0.1, **options):
    return preference_loss(kind, pc, pr, rc, rr, beta=beta, chosen_lengths=cl, rejected_lengths=rl, **options)


# ---------------------------------------------------------------------------------------
# SFT token losses
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_token_loss_is_cross_entropy(seed):
    g = torch.Generator().manual_seed(seed)
    n, vocab = 64, 11
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (n,), generator=g)
    lp = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    expected = F.cross_entropy(logits, targets, reduction="none")
    _close(token_loss("kl", lp), expected)


CLOSED_FORMS = {
    "kl": lambda q: -torch.log(q),
    "tv": lambda q: 1 - q,
    "chi2": lambda q: 1 / q - 1,
    "hellinger": lambda q: 2 - 2 * torch.sqrt(q),
    "js": lambda q: 0.5 * (2 * LN2 - (1 + q) * torch.log1p(q) + q * torch.log(q)),
}

# The generators f(t) of the docstring's table; xlogy gives the convention 0·log 0 = 0, so
# these are also the right limits f(0) = lim_{t→0+} f(t) for the p(v) = 0 terms.
GENERATORS = {
    "kl": lambda t: torch.xlogy(t, t),
    "tv": lambda t: 0.5 * (t - 1).abs(),
    "chi2": lambda t: (t - 1) ** 2,
    "hellinger": lambda t: (t.sqrt() - 1) ** 2,
    "js": lambda t: 0.5 * (torch.xlogy(t, t) - torch.xlogy(1 + t, (1 + t) / 2)),
}


def test_token_losses_cover_the_documented_kinds():
    assert set(TOKEN_LOSSES) == set(CLOSED_FORMS) == set(GENERATORS)


@pytest.mark.parametrize("kind", sorted(CLOSED_FORMS))
def test_token_loss_closed_form(kind):
    # Ascending log q from e^-31.6 to 1, so that q (and log q) grows along the tensor.
    lp = torch.cat([-torch.logspace(1.5, -8, 500, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    got = token_loss(kind, lp)
    assert got.dtype == torch.float64 and got.shape == lp.shape
    _close(got, CLOSED_FORMS[kind](lp.exp()), atol=1e-9, rtol=1e-9)
    assert token_loss(kind, torch.zeros(3, dtype=torch.float64)).abs().max() == 0  # q = 1: no loss
    assert (got >= 0).all()
    # The loss decreases as the model's probability of the target grows.
    assert (got[1:] <= got[:-1]).all()


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_token_loss_is_f_divergence_of_one_hot_data(kind, seed):
    """D_f(δ_y ‖ π) = Σ_v π(v) f(δ_y(v)/π(v)), summed over a full vocabulary, = token_loss(log π(y))."""
    g = torch.Generator().manual_seed(seed)
    n, vocab = 32, 7
    # Spread out the logits so that some target probabilities are tiny and some near 1.
    pi = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 4).softmax(-1)
    y = torch.randint(0, vocab, (n,), generator=g)
    p = F.one_hot(y, vocab).to(torch.float64)
    divergence = (pi * GENERATORS[kind](p / pi)).sum(-1)
    q_logp = pi.log().gather(-1, y[:, None]).squeeze(-1)
    _close(token_loss(kind, q_logp), divergence, atol=1e-8, rtol=1e-8)
    # Each generator is a proper f-divergence generator: f(1) = 0, so D_f(π ‖ π) = 0.
    assert GENERATORS[kind](torch.ones(1, dtype=torch.float64)).item() == 0


EXTREME_LOGPS = [-1e4, -100.0, -60.0, -20.0, -1.0, -1e-6, -1e-12, 0.0]


@pytest.mark.parametrize("kind", sorted(TOKEN_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_loss_finite_at_extremes(kind, dtype):
    lp = torch.tensor(EXTREME_LOGPS, dtype=dtype, requires_grad=True)
    loss = token_loss(kind, lp)
    assert loss.dtype in (torch.float32, torch.float64)  # half precision is upcast
    assert torch.isfinite(loss).all(), loss
    assert (loss >= 0).all(), loss
    loss.sum().backward()
    assert lp.grad is not None and torch.isfinite(lp.grad).all(), lp.grad
    # A better-predicted target never gets a larger loss: d loss / d log q ≤ 0.
    assert (lp.grad <= 0).all(), lp.grad
    assert loss[-1].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", sorted(TOKEN_LOSSES))
def test_token_loss_gradient_matches_closed_form(kind):
    """d loss / d log q: −1 (kl), −q (tv), −1/q (chi2), −√q (hellinger), ½ q log(q/(1+q)) (js)."""
    lp = torch.linspace(-30, 0, 301, dtype=torch.float64, requires_grad=True)
    token_loss(kind, lp).sum().backward()
    q = lp.detach().exp()
    expected = {
        "kl": -torch.ones_like(q),
        "tv": -q,
        "chi2": -1 / q,
        "hellinger": -q.sqrt(),
        "js": 0.5 * q * torch.log(q / (1 + q)),
    }[kind]
    _close(lp.grad, expected, atol=1e-9, rtol=1e-9)


def test_token_loss_unknown_kind():
    with pytest.raises(ValueError, match="chi2"):
        token_loss("bogus", torch.zeros(2))


# ---------------------------------------------------------------------------------------
# Preference losses: closed forms at policy = reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_is_ln2_when_policy_equals_reference(beta, seed):
    pc, pr, _, _, cl, rl = _pairs(seed)
    losses, chosen_rewards, rejected_rewards = _call("dpo", pc, pr, pc.clone(), pr.clone(), cl, rl, beta=beta)
    _close(losses, torch.full_like(losses, LN2))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
def test_cdpo_and_robust_at_policy_equals_reference(beta, eps):
    # At h = 0 both σ(±βh) = ½, so cdpo = −(1−ε) log ½ − ε log ½ = ln 2 and
    # robust = [(1−ε) ln 2 − ε ln 2] / (1 − 2ε) = ln 2, for every ε and β.
    pc, pr, _, _, cl, rl = _pairs(3)
    for kind in ("cdpo", "robust"):
        losses, _, _ = _call(kind, pc, pr, pc, pr, cl, rl, beta=beta, label_smoothing=eps)
        _close(losses, torch.full_like(losses, LN2))


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_other_kinds_at_policy_equals_reference(beta):
    pc, pr, _, _, cl, rl = _pairs(4)
    hinge, _, _ = _call("hinge", pc, pr, pc, pr, cl, rl, beta=beta)
    _close(hinge, torch.ones_like(hinge))  # max(0, 1 − 0)
    ipo, _, _ = _call("ipo", pc, pr, pc, pr, cl, rl, beta=beta)
    _close(ipo, torch.full_like(ipo, (1 / (2 * beta)) ** 2))  # (0 − 1/(2β))²
    kto, _, _ = _call("kto", pc, pr, pc, pr, cl, rl, beta=beta, kl=0.0, desirable_weight=1.0,
                      undesirable_weight=1.33)
    _close(kto, torch.full_like(kto, 0.5 * (1.0 * 0.5 + 1.33 * 0.5)))  # 1 − σ(0) = ½ for each half


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_cdpo_and_robust_closed_forms(eps, seed):
    pc, pr, rc, rr, cl, rl = _pairs(seed)
    beta = 0.1
    h = beta * ((pc - rc) - (pr - rr))
    cdpo, _, _ = _call("cdpo", pc, pr, rc, rr, cl, rl, beta=beta, label_smoothing=eps)
    _close(cdpo, -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h))
    robust, _, _ = _call("robust", pc, pr, rc, rr, cl, rl, beta=beta, label_smoothing=eps)
    _close(robust, (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps))
    # ε = 0 reduces both to DPO.
    dpo, _, _ = _call("dpo", pc, pr, rc, rr, cl, rl, beta=beta)
    for kind in ("cdpo", "robust"):
        _close(_call(kind, pc, pr, rc, rr, cl, rl, beta=beta, label_smoothing=0.0)[0], dpo)


def test_robust_is_unbiased_under_label_flips():
    """Robust DPO's point (Chowdhury et al. 2024): averaged over a flip with probability ε, it is the clean loss."""
    pc, pr, rc, rr, cl, rl = _pairs(5)
    eps, beta = 0.2, 0.5
    kept, _, _ = _call("robust", pc, pr, rc, rr, cl, rl, beta=beta, label_smoothing=eps)
    flipped, _, _ = _call("robust", pr, pc, rr, rc, rl, cl, beta=beta, label_smoothing=eps)
    clean, _, _ = _call("dpo", pc, pr, rc, rr, cl, rl, beta=beta)
    _close((1 - eps) * kept + eps * flipped, clean)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probability_reward_is_dpo_with_zero_reference(beta, seed):
    pc, pr, _, _, cl, rl = _pairs(seed)
    zeros = torch.zeros_like(pc)
    losses, chosen_rewards, rejected_rewards = _call("dpo", pc, pr, zeros, zeros, cl, rl, beta=beta)
    _close(losses, -F.logsigmoid(beta * (pc - pr)))
    _close(chosen_rewards, beta * pc)
    _close(rejected_rewards, beta * pr)
    # ... which is also CPO's preference term (CPO = DPO with a uniform reference).
    _close(_call("cpo", pc, pr, zeros, zeros, cl, rl, beta=beta, cpo_alpha=0.0)[0], losses)


@pytest.mark.parametrize("seed", [0, 1])
def test_length_normalised_closed_forms(seed):
    pc, pr, rc, rr, cl, rl = _pairs(seed)
    beta, gamma = 2.0, 0.7
    c_avg, r_avg = pc / cl, pr / rl
    ipo, _, _ = _call("ipo", pc, pr, rc, rr, cl, rl, beta=beta)
    _close(ipo, (((pc - rc) / cl - (pr - rr) / rl) - 1 / (2 * beta)) ** 2)
    simpo, cr, rj = _call("simpo", pc, pr, rc, rr, cl, rl, beta=beta, simpo_gamma=gamma)
    _close(simpo, -F.logsigmoid(beta * (c_avg - r_avg) - gamma))
    _close(cr, beta * c_avg)
    _close(rj, beta * r_avg)
    cpo, _, _ = _call("cpo", pc, pr, rc, rr, cl, rl, beta=beta, cpo_alpha=0.5)
    _close(cpo, -F.logsigmoid(beta * (pc - pr)) - 0.5 * c_avg)
    # ORPO: odds(y) = P/(1 − P) with P = exp(mean token log-prob), computed naively in float64.
    orpo, _, _ = _call("orpo", pc, pr, rc, rr, cl, rl, beta=beta)
    p_c, p_r = c_avg.exp(), r_avg.exp()
    log_odds_ratio = torch.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
    _close(orpo, -c_avg - beta * F.logsigmoid(log_odds_ratio))


def test_kto_closed_form_and_default_kl():
    pc, pr, rc, rr, cl, rl = _pairs(6)
    beta, kl = 0.3, 0.8
    losses, _, _ = _call("kto", pc, pr, rc, rr, cl, rl, beta=beta, kl=kl, desirable_weight=1.0,
                         undesirable_weight=1.33)
    expected = 0.5 * ((1 - torch.sigmoid(beta * ((pc - rc) - kl))) + 1.33 * (1 - torch.sigmoid(beta * (kl - (pr - rr)))))
    _close(losses, expected)
    # Default z₀: the in-batch mean of all 2B log-ratios, clamped at 0 (see the kto docstring).
    z0 = torch.cat([pc - rc, pr - rr]).mean().clamp(min=0)
    _close(_call("kto", pc, pr, rc, rr, cl, rl, beta=beta)[0], _call("kto", pc, pr, rc, rr, cl, rl, beta=beta, kl=z0)[0])
    # ... and it is a constant: no gradient flows through z₀.
    x = pc.clone().requires_grad_()
    _call("kto", x, pr, rc, rr, cl, rl, beta=beta)[0].sum().backward()
    expected_grad = 0.5 * beta * torch.sigmoid(beta * ((pc - rc) - z0)) * (torch.sigmoid(beta * ((pc - rc) - z0)) - 1)
    _close(x.grad, expected_grad)


# ---------------------------------------------------------------------------------------
# Rewards, reference (in)dependence, errors, options
# ---------------------------------------------------------------------------------------
def _options(kind):
    return {"kto": {"kl": 0.2}}.get(kind, {})


@pytest.mark.parametrize("kind", sorted(PREFERENCE_LOSSES))
def test_shapes_and_detached_rewards(kind):
    pc, pr, rc, rr, cl, rl = _pairs(7, batch=5)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = _call(kind, pc, pr, rc, rr, cl, rl, beta=0.1, **_options(kind))
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (5,)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    assert losses.dtype == chosen_rewards.dtype == torch.float64  # float64 in, float64 out
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("kind", REFERENCE_BASED)
@pytest.mark.parametrize("beta", [0.01, 1.0])
def test_rewards_are_beta_times_logratio(kind, beta):
    pc, pr, rc, rr, cl, rl = _pairs(8)
    _, chosen_rewards, rejected_rewards = _call(kind, pc, pr, rc, rr, cl, rl, beta=beta, **_options(kind))
    _close(chosen_rewards, beta * (pc - rc))
    _close(rejected_rewards, beta * (pr - rr))


@pytest.mark.parametrize("kind", sorted(PREFERENCE_LOSSES))
def test_reference_free_kinds_ignore_the_reference(kind):
    """REFERENCE_FREE is exactly the set of kinds whose loss and rewards do not read rc, rr."""
    pc, pr, rc, rr, cl, rl = _pairs(9)
    a = _call(kind, pc, pr, rc, rr, cl, rl, **_options(kind))
    b = _call(kind, pc, pr, rc + torch.randn_like(rc) * 5, rr - 3.0, cl, rl, **_options(kind))
    unchanged = all(torch.equal(x, y) for x, y in zip(a, b))
    assert unchanged == (kind in REFERENCE_FREE)


@pytest.mark.parametrize("kind", LENGTH_NORMALISED)
def test_length_normalised_kinds_need_lengths(kind):
    pc, pr, rc, rr, cl, rl = _pairs(10)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(kind, pc, pr, rc, rr, beta=0.1)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(kind, pc, pr, rc, rr, beta=0.1, rejected_lengths=rl)


@pytest.mark.parametrize("kind", sorted(set(PREFERENCE_LOSSES) - set(LENGTH_NORMALISED)))
def test_other_kinds_do_not_need_lengths(kind):
    pc, pr, rc, rr, cl, rl = _pairs(11)
    without = preference_loss(kind, pc, pr, rc, rr, beta=0.1, **_options(kind))
    with_lengths = _call(kind, pc, pr, rc, rr, cl, rl, beta=0.1, **_options(kind))
    for x, y in zip(without, with_lengths):
        assert torch.equal(x, y)


def test_loss_options():
    assert loss_options("dpo") == ()
    assert loss_options("cdpo") == ("label_smoothing",)
    assert loss_options("robust") == ("label_smoothing",)
    assert loss_options("simpo") == ("simpo_gamma",)
    assert loss_options("cpo") == ("cpo_alpha",)
    assert set(loss_options("kto")) == {"desirable_weight", "undesirable_weight"}  # kl is computed, not set
    for kind in PREFERENCE_LOSSES:
        assert isinstance(loss_options(kind), tuple)
        assert not {"beta", "chosen_lengths", "rejected_lengths", "kl"} & set(loss_options(kind))


@pytest.mark.parametrize("kind", sorted(PREFERENCE_LOSSES))
def test_every_loss_option_is_a_run_parameter_whose_value_reaches_the_loss(kind, monkeypatch):
    """Each objective has a documented default β and options (prefnb.objectives); null in params
    means that default, and a value set in params is the value the loss is called with."""
    from prefnb import objectives, plugins
    from prefnb.config import FIELDS, resolve_params

    assert set(objectives.option_names(kind)) == set(loss_options(kind))  # one list of options
    defaults = resolve_params([("test", {"objective": kind})])
    assert defaults.beta == objectives.default(kind, "beta") > 0
    set_values = {"beta": 0.37, **{name: 0.123 + k / 100 for k, name in enumerate(loss_options(kind))}}
    for name in set_values:
        assert name in FIELDS, f"{kind} option '{name}' cannot be set from params"
        assert getattr(defaults, name) == objectives.default(kind, name)
    params = resolve_params([("test", {"objective": kind, **set_values})])
    seen = {}
    real = PREFERENCE_LOSSES[kind]

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setitem(PREFERENCE_LOSSES, kind, spy)
    pc, pr, rc, rr, cl, rl = _pairs(3)
    batch_logps = torch.cat([pc, pr]).float()

    def fake_sequence_logps(model, batch):
        return batch_logps, torch.cat([cl, rl]).float()

    monkeypatch.setattr(plugins, "sequence_logps", fake_sequence_logps)
    plugins.preference_step(None, {}, params, rc.float(), rr.float())
    assert {name: seen[name] for name in set_values} == pytest.approx(set_values)


def test_kto_reference_point_is_the_clamped_mean_mismatched_log_ratio_without_gradient():
    policy = torch.tensor([-3.0, -1.0, -2.0, -6.0], requires_grad=True)
    ref = torch.tensor([-4.0, -1.5, -2.0, -5.0])
    z0 = L.kto_reference_point(policy, ref)
    assert z0.item() == pytest.approx((1.0 + 0.5 + 0.0 - 1.0) / 4) and not z0.requires_grad
    assert L.kto_reference_point(ref, policy.detach()).item() == 0.0  # negative mean: clamped


def test_unknown_preference_kind_names_the_allowed_kinds():
    pc, pr, rc, rr, _, _ = _pairs(12)
    for call in (lambda: loss_options("dop"), lambda: preference_loss("dop", pc, pr, rc, rr, beta=0.1)):
        with pytest.raises(ValueError) as err:
            call()
        assert "dop" in str(err.value)
        assert all(kind in str(err.value) for kind in PREFERENCE_LOSSES)


def test_an_option_of_another_kind_is_an_error():
    pc, pr, rc, rr, _, _ = _pairs(13)
    with pytest.raises(TypeError):
        preference_loss("dpo", pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)


def test_config_lists_match_the_losses():
    from prefnb import config
    assert config.PREFERENCE_OBJECTIVES == tuple(PREFERENCE_LOSSES)
    assert config.SFT_LOSSES == tuple(TOKEN_LOSSES)
    assert REFERENCE_FREE <= set(PREFERENCE_LOSSES)


# ---------------------------------------------------------------------------------------
# Gradients and precision
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_dpo_gradient_direction(beta):
    pc, pr, rc, rr, cl, rl = _pairs(14)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    rc, rr = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    losses, _, _ = _call("dpo", pc, pr, rc, rr, cl, rl, beta=beta)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # Closed form: d/d pc [−log σ(βh)] = −β σ(−βh); the reference sees the opposite gradient.
    h = (pc - rc - pr + rr).detach()
    _close(pc.grad, -beta * torch.sigmoid(-beta * h))
    _close(pr.grad, beta * torch.sigmoid(-beta * h))
    _close(rc.grad, -pc.grad)


@pytest.mark.parametrize("kind", ["cdpo", "robust", "ipo", "simpo", "cpo", "orpo", "kto"])
def test_preference_gradient_direction_near_init(kind):
    """Near policy = reference every objective raises chosen and lowers rejected log-probs."""
    pc, pr, _, _, cl, rl = _pairs(15)
    # Reference = policy; for the reference-free kinds make chosen/rejected equal per-token.
    pr = pc / cl * rl
    x, z = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, _, _ = _call(kind, x, z, pc, pr, cl, rl, beta=0.1, **_options(kind))
    losses.sum().backward()
    assert (x.grad < 0).all() and (z.grad > 0).all()


@pytest.mark.parametrize("kind", sorted(PREFERENCE_LOSSES))
def test_preference_losses_finite_for_extreme_logps(kind):
    pc = torch.tensor([-1e-6, -5e3, -0.5, -300.0, -1e-3], dtype=torch.float32, requires_grad=True)
    pr = torch.tensor([-5e3, -1e-6, -0.5, -1e-3, -300.0], dtype=torch.float32, requires_grad=True)
    ref = torch.full((5,), -10.0)
    lengths = torch.tensor([1, 50, 3, 7, 2])
    losses, cr, rj = preference_loss(kind, pc, pr, ref, ref, beta=1.0, chosen_lengths=lengths,
                                     rejected_lengths=lengths, **_options(kind))
    assert torch.isfinite(losses).all() and torch.isfinite(cr).all() and torch.isfinite(rj).all()
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_orpo_log1mexp_is_stable_at_both_ends():
    x = torch.tensor([-1e-20, -1e-8, -0.5, -math.log(2.0), -1.0, -50.0, -800.0], dtype=torch.float64,
                     requires_grad=True)
    expected = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    got = L._log1mexp(x)
    _close(got, expected, atol=1e-12, rtol=1e-12)
    got.sum().backward()  # d/dx log(1 − eˣ) = −1/(e^−x − 1)
    _close(x.grad, -1 / torch.expm1(-x.detach()), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_orpo_finite_when_the_model_is_certain(dtype):
    """P(y) → 1 (mean token log-prob 0 or within rounding of it) must not give NaN gradients."""
    pc = torch.tensor([0.0, -1e-9, -2e-8, -3.0, 0.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-3.0, -2.0, 0.0, -1e-9, 0.0], dtype=dtype, requires_grad=True)
    lengths = torch.tensor([1, 1, 4, 2, 1])
    losses, _, _ = preference_loss("orpo", pc, pr, pc.detach(), pr.detach(), beta=0.1, chosen_lengths=lengths,
                                   rejected_lengths=lengths)
    assert torch.isfinite(losses).all(), losses
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), (pc.grad, pr.grad)
