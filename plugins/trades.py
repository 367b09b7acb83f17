"""TRADES: the KL attack and the clean-plus-KL training loss (Zhang et al., 2019).

Reference: H. Zhang, Y. Yu, J. Jiao, E. P. Xing, L. El Ghaoui, M. I. Jordan, "Theoretically
Principled Trade-off between Robustness and Accuracy", ICML 2019 (arXiv:1901.08573).

TRADES trains on ``CE(f(x), y) + β · (1/B) Σ_i KL(softmax(f(x_i)) ‖ softmax(f(x'_i)))``, where
``x'`` maximises the same KL over the threat ball. This module registers:

- perturbation ``trades-kl``: projected sign (L-inf) or normalised-gradient (L2) ascent on the
  summed KL divergence between the clean and the perturbed output distributions;
- loss term ``trades``: the natural cross-entropy plus β times the batch-mean KL.

Semantics follow the authors' PyTorch code (``yaodongyu/TRADES``, ``trades.py``):

- the attack starts at ``x + 0.001 · N(0, I)`` (a tiny Gaussian, not a uniform point of the
  ball), because the KL gradient vanishes at ``x' = x`` (in floating point it is round-off
  there, hence ``init_std > 0``); the start is projected onto the ball and [0, 1] here (the
  reference projects only after the first step);
- the attack maximises the KL with ``reduction = "sum"``, not cross-entropy. ART's
  ``AdversarialTrainerTRADESPyTorch`` takes any attack and its example uses CE-PGD; ``trades-kl``
  is the reference attack;
- the clean distribution is computed once per ``generate`` without a graph, in the attack's
  model mode; the reference recomputes it at every step, which gives the same values because the
  model does not change during the attack (BN in eval mode, the default ``model_mode``);
- L-inf step ``0.007`` at ``ε = 0.031`` for 10 steps; the default step here keeps that ratio,
  ``ε · 0.007 / 0.031``, for any ε and for both norms (the reference's L2 branch instead takes
  SGD steps of ``2 ε / steps`` on the normalised gradient; set ``step_size`` to reproduce it);
- in the loss the gradient flows through both ``f(x)`` and ``f(x')``: the clean distribution in
  the KL is not detached.

Hypersphere embedding (Pang et al. 2020, TRADES+HE): softmax inputs are the model's outputs times
``artplug.logit_scale`` (``s · cos``) in the loss and times ``artplug.attack_logit_scale`` in the
attack; with the ``he-margin`` loss on the clean batch providing the natural term, set
``natural = false`` on ``trades`` (the margin is in the clean cross-entropy only).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

import artplug

# TRADES' KL attack math lives in artplug (artplug/ops.py), shared with the spat plugin's KL
# objective without one plugin importing the other; the old names stay importable from here.
REFERENCE_STEP_RATIO = artplug.TRADES_STEP_RATIO
kl_terms = artplug.kl_terms
kl_attack_start = artplug.kl_attack_start


class TradesKL:
    """TRADES attack: PGD maximising KL(p(x) ‖ p(x')) from a tiny Gaussian start (Zhang 2019).

    Each of ``steps`` iterations takes the steepest-ascent step of the threat's norm on
    ``Σ_i KL(softmax(s · f(x_i)) ‖ softmax(s · f(x'_i)))`` (``s`` = ``attack_logit_scale``, 1 for
    ordinary models) and projects onto the ball and [0, 1]. The start is ``x + init_std · N(0,
    I)``, projected. ``init_std`` must be positive: at ``x' = x`` the KL and its gradient vanish
    in exact arithmetic, but in floating point the gradient there is round-off (~1e-16 in
    float64, ~1e-7 in float32) and a sign step would follow that noise.

    ``step_size = None`` means ``eps · 0.007 / 0.031`` (TRADES' 0.007 at ε = 0.031; 0.00708 at
    ε = 8/255), using the step's training eps (``state.threat``, scaled by any eps warm-up); an
    explicit ``step_size`` is not scaled.
    """

    name = "trades-kl"
    paper = (
        "H. Zhang, Y. Yu, J. Jiao, E. P. Xing, L. El Ghaoui, M. I. Jordan, "
        '"Theoretically Principled Trade-off between Robustness and Accuracy", ICML '
        "2019 (arXiv:1901.08573)"
    )

    class Params(artplug.Params):
        """Parameters of the ``trades-kl`` perturbation."""

        steps: int = Field(10, ge=1, description="gradient steps")
        step_size: float | None = Field(
            None,
            gt=0,
            description="step length in pixel units; None means eps * 0.007 / 0.031 "
            "(TRADES: 0.007 at eps 0.031)",
        )
        init_std: float = Field(
            0.001,
            gt=0,
            description="standard deviation of the Gaussian start around x; > 0 because at "
            "x' = x the KL gradient is only round-off",
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return the TRADES adversarial batch (detached, in [0, 1], inside ``state.threat``)."""
        # Read params at call time: schedules replace self.params between steps (with a copy
        # the engine has validated, so every field has its declared type).
        params = self.params
        threat = state.threat
        x = x.detach()
        if threat.eps == 0:
            # A Python float: no host sync. The ball is the single point x.
            return x
        steps = params.steps
        step_size = (
            threat.eps * REFERENCE_STEP_RATIO if params.step_size is None else params.step_size
        )
        scale = artplug.attack_logit_scale(model)
        log_p, start = kl_attack_start(model, x, threat, scale, params.init_std)

        def objective(outputs: Tensor) -> Tensor:
            # Sum over the batch (the reference's KLDivLoss(size_average=False)): each example's
            # input gradient is that of its own KL.
            return kl_terms(log_p, scale * artplug.full_precision(outputs)).sum()

        return artplug.projected_ascent(
            model, x, start, threat, objective, steps=steps, step_size=step_size
        )


class TradesLoss:
    """TRADES objective: CE(f(x), y) + β · batch-mean KL(p(x) ‖ p(x')) (Zhang et al. 2019).

    Value: ``CE(s · f(x), y) + β · (1/B) Σ_i KL(softmax(s · f(x_i)) ‖ softmax(s · f(x'_i)))``,
    ``s`` = ``artplug.logit_scale(state.model)`` (1 for ordinary models, the HE scale for a
    hypersphere head). The gradient flows through both the clean and the adversarial outputs.
    ``natural = false`` drops the cross-entropy, for recipes where another term provides the
    natural loss (TRADES+HE: ``he-margin`` on the clean batch). The reference attack is the
    ``trades-kl`` perturbation; pairing this loss with a cross-entropy attack such as ``pgd``
    is a legitimate variant (it is what ART's TRADES trainer example does), not the paper's.
    """

    name = "trades"
    paper = (
        "H. Zhang, Y. Yu, J. Jiao, E. P. Xing, L. El Ghaoui, M. I. Jordan, "
        '"Theoretically Principled Trade-off between Robustness and Accuracy", ICML '
        "2019 (arXiv:1901.08573)"
    )
    needs = frozenset({"clean", "adv"})

    class Params(artplug.Params):
        """Parameters of the ``trades`` loss term."""

        beta: float = Field(
            6.0, ge=0, description="weight of the KL (robustness) term; TRADES uses 1 to 10"
        )
        natural: bool = Field(
            True,
            description="include CE on the clean batch; false when another term (he-margin "
            'on = "clean") provides the natural loss',
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> Tensor:
        """The unweighted TRADES loss of the step (0-dim tensor)."""
        params = self.params
        if out.logits_clean is None or out.logits_adv is None:
            raise RuntimeError(
                "trades was called without logits_clean and logits_adv; the engine must run "
                "the forward passes listed in needs=['adv', 'clean']"
            )
        scale = artplug.logit_scale(state.model)
        clean = scale * artplug.full_precision(out.logits_clean)
        adv = scale * artplug.full_precision(out.logits_adv)
        # Not detached: the KL's gradient reaches the clean forward too, as in the reference.
        kl = kl_terms(F.log_softmax(clean, dim=1), adv).sum() / clean.shape[0]
        robust = params.beta * kl
        if not bool(params.natural):
            return robust
        return F.cross_entropy(clean, out.y) + robust

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Reasons why this recipe combines ``trades`` wrongly (empty when it is fine)."""
        reasons = []
        if params.natural and "he-margin" in recipe.losses:
            reasons.append(
                "with he-margin, set natural = false: TRADES+HE puts the margin in the clean "
                'term only (he-margin on = "clean")'
            )
        return reasons


@artplug.hookimpl
def register_perturbations(register: artplug.Register) -> None:
    """Register the ``trades-kl`` perturbation."""
    register(TradesKL)


@artplug.hookimpl
def register_loss_terms(register: artplug.Register) -> None:
    """Register the ``trades`` loss term."""
    register(TradesLoss)
