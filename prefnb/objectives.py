"""The objectives: the one table of their names, plug-in families and operating points. Adding
one is a row here (README, "Adding an objective"); a preference objective's loss is the function
of the same name in `prefnb.losses`.

Each has its own default β and options: one β for every objective would put several far from
where they work (SimPO's reward is a per-token log-prob, its authors use β of 2 to 10; IPO's τ
is a different quantity from DPO's β). A ``null`` in params gets the value below, resolved with
the parameters (params.yaml and the run id show it). Torch-free, so that validating a params
file stays fast; `prefnb.losses` reads its option defaults from here too.

Sources: the paper and where in it, else the reference code (TRL 1.16's config defaults,
which the TRL-parity tests in tests/test_losses_trl.py run against).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The SFT token losses: each an f-divergence (`prefnb.losses.TOKEN_LOSSES`, same names).
SFT_LOSSES = ("kl", "tv", "chi2", "hellinger", "js")


@dataclass(frozen=True)
class Objective:
    """One row of :data:`OBJECTIVES`."""

    family: str = "preference"  # a key of prefnb.plugins.FAMILIES: "sft" or "preference"
    # β and the loss's keyword options (every key but "beta" is one) -> documented default.
    defaults: dict[str, float] = field(default_factory=dict)
    reference_free: bool = False  # the loss ignores the reference log-probs: no reference is loaded or scored


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective("sft"),
    # Rafailov et al. 2023, App. B: "Unless noted otherwise, we use β = 0.1"; TRL DPOConfig.beta = 0.1.
    "dpo": Objective(defaults={"beta": 0.1}),
    # Mitchell 2023 (cDPO note) and Chowdhury et al. 2024 (robust DPO): ε is the assumed rate of
    # flipped preference labels; 0.1 is "a typical value recommended by the Robust DPO paper"
    # (TRL 1.16, DPOConfig.label_smoothing). β as DPO's.
    "cdpo": Objective(defaults={"beta": 0.1, "label_smoothing": 0.1}),
    "robust": Objective(defaults={"beta": 0.1, "label_smoothing": 0.1}),
    # IPO's τ (Azar et al. 2023, Eq. 17) plays β's part; the paper fixes no value for language
    # models (its experiments are bandits), so TRL's default: DPOConfig.beta = 0.1 is τ for loss_type='ipo'.
    "ipo": Objective(defaults={"beta": 0.1}),
    # Hinge on the DPO margin (SLiC-HF, Zhao et al. 2023; margin 1/β on h): TRL DPOConfig.beta = 0.1
    # for loss_type='hinge'.
    "hinge": Objective(defaults={"beta": 0.1}),
    # SimPO (Meng et al. 2024): "we used a small beta (e.g., 2.0 or 2.5)" and γ = c·β with c grid-searched
    # over 0.25-0.4 (princeton-nlp/SimPO README, hyperparameter tips; the paper's settings have γ/β of
    # 0.3-0.5). β = 2, γ/β = 0.3. γ is absolute (as TRL's CPOConfig.simpo_gamma): setting β alone keeps γ.
    "simpo": Objective(defaults={"beta": 2.0, "simpo_gamma": 0.6}, reference_free=True),
    # CPO (Xu et al. 2024): Eq. 4 adds the NLL term with weight 1; TRL CPOConfig.beta = 0.1, cpo_alpha = 1.0.
    "cpo": Objective(defaults={"beta": 0.1, "cpo_alpha": 1.0}, reference_free=True),
    # ORPO's λ (Hong et al. 2024, Eq. 6) is our β: TRL ORPOConfig.beta = 0.1 ("denoted by λ in the paper").
    "orpo": Objective(defaults={"beta": 0.1}, reference_free=True),
    # KTO (Ethayarajh et al. 2024, §4: β = 0.1; λ_D n_D / (λ_U n_U) should lie in [1, 4/3]): paired data
    # has n_D = n_U, so λ_D = λ_U = 1 (TRL KTOConfig.desirable_weight = undesirable_weight = 1.0).
    "kto": Objective(defaults={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}),
}


# Views of the table, for ordering and tests; code asks the table itself, so that an entry
# added at run time (a test's toy objective) is seen everywhere.
PREFERENCE_OBJECTIVES = tuple(k for k, o in OBJECTIVES.items() if o.family == "preference")
REFERENCE_FREE = frozenset(k for k, o in OBJECTIVES.items() if o.reference_free)


def is_preference(objective: str) -> bool:
    return OBJECTIVES[objective].family == "preference"


def option_names(objective: str) -> tuple[str, ...]:
    """The loss options of ``objective`` (everything it takes beyond β)."""
    return tuple(k for k in _defaults(objective) if k != "beta")


def default(objective: str, name: str) -> float | None:
    """The documented default of β or an option for ``objective`` (None: not one of its settings)."""
    return _defaults(objective).get(name)


def _defaults(objective: str) -> dict[str, float]:
    return OBJECTIVES.get(objective, Objective()).defaults
