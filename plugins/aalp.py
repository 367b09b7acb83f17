"""Adaptive Adversarial Logits Pairing (AALP), as a parametrised reading of Wu et al. 2020.

Reference: S. Wu, J. Sang, K. Xu, G. Zheng, C. Xu, "Adaptive Adversarial Logits Pairing",
arXiv:2005.11904 (ACM TOMM 2024). No official code exists and only the abstract and the start
of the introduction could be read: the exact selection rule of the dropout, its placement, the
weighting function and every hyperparameter are **not known**. Everything below is the spec's
[READING] (docs/techniques/aalp.md), with the open choices exposed as parameters; recipes that use
it
are called "AALP-like".

AALP is ALP (Kannan et al. 2018, see ``artplug_plugins.alp``) plus two modules that the
abstract names. This module registers one technique for each:

- model transform ``guided-dropout`` ("adaptive feature optimisation with Guided Dropout", to
  make the network rely on fewer, high-contribution features): a :class:`GuidedDropout`
  module applied to the penultimate features, in front of the model's final layer ``fc``;
- loss term ``adaptive-logit-pairing`` ("adaptive sample weighting", sample-specific weights
  between the logit-pairing and the classification loss): the whole AALP objective, one term.

How the dropout is put in front of ``fc``: artplug models compute ``forward(x) =
fc(features(x))``. The transform registers the dropout as the submodule ``guided_dropout``
and gives the model instance a forward ``fc(guided_dropout(features(x), fc))``. ``fc`` itself
stays untouched, so a later ``hypersphere`` transform still finds its ``nn.Linear`` and
replaces it; the forward looks ``fc`` up at call time and so uses the cosine head. Transform
order (docs/techniques/README.md, rule 3): SAT → SLAT sites → AALP dropout → HE head.

When the dropout is on: only in training-mode forwards of the weight update (the phases
``"update-clean"``, ``"update-adv"`` and ``"update"`` of :func:`artplug.current_phase`). It is off
in eval mode, in the attack (phase ``"attack"``, unless ``during_attack``; docs/techniques/aalp.md,
interactions:
the attack must see the network without dropout) and in every forward outside the engine's
step (phase ``"eval"``: validation, the sanity gate, user code), even in train mode.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

import artplug

Weighting = Literal["own-share", "ratio", "misclassified"]
_UPDATE_PHASES = ("update-clean", "update-adv", "update")
# Loss terms whose job the adaptive-logit-pairing term already does (stacking double counts).
_DOUBLE_COUNTED = {
    "cross-entropy": "its per-sample classification term ce_i is already the cross-entropy of "
    "the clean and the adversarial outputs",
    "he-margin": "its per-sample classification term ce_i is already the (margin) "
    "cross-entropy of the clean and the adversarial outputs; set its margin parameter instead "
    "(ALP+HE: 0.3)",
    "logit-pairing": "its per-sample pairing term lp_i is already ALP's logit pairing",
}


# ------------------------------------------------------------------------------------------
# Guided dropout (model transform)


def dropped_count(fraction: float, units: int) -> int:
    """How many of ``units`` a drop ``fraction`` removes: ``floor(fraction · units)``.

    Floor, so a fraction below one unit drops nothing (a warm-up ramp starts at zero drops).
    A tiny slack absorbs round-off such as ``0.3 · 10 = 2.9999999999999996``.
    """
    return min(units, max(0, math.floor(fraction * units + 1e-9)))


def kept_count(fraction: float, units: int) -> int:
    """How many of ``units`` the top-``fraction`` keeps: ``ceil(fraction · units)``.

    Ceil, so any ``q > 0`` protects at least the single highest-contribution unit.
    """
    return min(units, max(0, math.ceil(fraction * units - 1e-9)))


class GuidedDropout(nn.Module):
    """Dropout on the penultimate features whose choice of units is guided, not uniform.

    ``forward(features, head)`` takes the ``(N, d)`` features and the final layer ``head``
    (``nn.Linear``, or the ``hypersphere`` cosine head; anything with a ``(K, d)`` ``weight``
    whose ``argmax`` output is the predicted class). Two selection rules:

    - ``"contribution"`` (default, the spec's reading): the contribution of unit ``j`` to the
      output of class ``k`` is ``|φ_j · ∂z_k/∂φ_j|``. For a final linear layer ``∂z_k/∂φ_j =
      W_kj``, so it is ``|φ_j · W_kj|``, the magnitude of unit ``j``'s own term in the logit:
      no extra backward pass is needed. Under a cosine head the term is ``φ_j Ŵ_kj / ‖φ‖``,
      a positive per-example multiple of ``φ_j W_kj`` within a row, so the ranking (all that
      is used) is the same. The class ``k`` is the **predicted** class ``argmax head(φ)`` of
      the undropped features, not the label: a module's forward cannot see the labels (a
      reading; for the adversarial pass it is the class the attack pushed the example to).
      Per example, the ``ceil(q · d)`` units with the largest contribution are always kept,
      and ``floor(p · r)`` of the ``r`` remaining units are dropped: chosen uniformly at random
      (``rest = "random"``) or the lowest-contribution ones (``rest = "lowest"``).
    - ``"strength"`` (Keshari et al., AAAI 2019, "Guided Dropout", as in the unofficial
      PyTorch implementation the spec read): a learnable strength ``t_j``, initialised
      ``U(0, 1)``, multiplies unit ``j`` in every forward (training and evaluation); the
      ``floor(p · d)`` units with the **largest** ``|t_j|`` are dropped (the same units for the
      whole batch), so that the weaker units must learn. ``q`` is not used.

    ``rescale``: the units that could have been dropped and survived are multiplied by
    ``r / (r − dropped)`` (``r`` = the size of the droppable pool: the non-top-``q`` units, or
    all ``d`` units for ``"strength"``), the inverted-dropout convention that keeps the pool's
    scale between training and evaluation. The protected top-``q`` units are never scaled.
    Whether the paper rescales is not known; ``rescale = false`` zeroes units and nothing else.

    Schedule of ``p``: the module counts optimizer steps itself (a model transform receives no
    knobs; see :meth:`note_update_forward`) in the buffer ``steps_seen``, saved in checkpoints.
    At step ``s`` (0-based) the drop fraction is ``p · clamp((s − start_step + 1) /
    max(ramp_steps, 1), 0, 1)``: zero before ``start_step``, then a linear ramp that reaches
    ``p`` after ``ramp_steps`` steps (at once when ``ramp_steps`` is 0 or 1).
    """

    steps_seen: Tensor
    strength: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        *,
        rule: Literal["contribution", "strength"] = "contribution",
        p: float = 0.3,
        q: float = 0.1,
        rest: Literal["random", "lowest"] = "random",
        rescale: bool = True,
        start_step: int = 0,
        ramp_steps: int = 0,
        during_attack: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.rule = rule
        self.p = float(p)
        self.q = float(q)
        self.rest = rest
        self.rescale = rescale
        self.start_step = int(start_step)
        self.ramp_steps = int(ramp_steps)
        self.during_attack = during_attack
        if rule == "strength":
            # Keshari et al.: strengths start uniform in (0, 1) and are trained like weights.
            self.strength = nn.Parameter(torch.rand(in_features))
        else:
            self.register_parameter("strength", None)
        # A buffer, so a resumed run continues the p schedule where it stopped. The Python
        # mirror below is what forward reads: reading the buffer would sync with the GPU.
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self._steps: int | None = 0
        self._last_update_phase: str | None = None
        self.register_load_state_dict_post_hook(_forget_step_mirror)

    # ---------------------------------------------------------------- step counting

    def _step_count(self) -> int:
        if self._steps is None:
            # After load_state_dict: one host read of the restored counter.
            self._steps = int(self.steps_seen.item())
        return self._steps

    def note_update_forward(self, phase: str) -> int:
        """Count optimizer steps from the update forwards; return the current step's index.

        Every optimizer step runs its update forwards in the order ``"update-clean"`` (when a
        loss needs it) then ``"update-adv"`` (when a loss needs it), so a new step starts at
        every ``"update-clean"`` forward and at every ``"update-adv"`` forward not directly
        preceded by an ``"update-clean"`` one. Extra ``"update"`` forwards (inside loss terms)
        belong to the current step. FreeAT's replays are optimizer steps and count as such.
        """
        steps = self._step_count()
        new_step = phase == "update-clean" or (
            phase == "update-adv" and self._last_update_phase != "update-clean"
        )
        if phase in ("update-clean", "update-adv"):
            self._last_update_phase = phase
        if new_step:
            steps += 1
            self._steps = steps
            # fill_ with a Python int launches a kernel without a host sync.
            self.steps_seen.fill_(steps)
        return max(steps - 1, 0)

    def drop_fraction(self, step: int) -> float:
        """The scheduled drop fraction ``p`` at optimizer step ``step`` (0-based)."""
        if step < self.start_step:
            return 0.0
        ramp = max(self.ramp_steps, 1)
        return self.p * min(1.0, (step - self.start_step + 1) / ramp)

    def _active_step(self) -> int | None:
        """The optimizer step this forward belongs to when the dropout is on, else ``None``."""
        if not self.training:
            return None
        phase = artplug.current_phase()
        if phase in _UPDATE_PHASES:
            return self.note_update_forward(phase)
        if phase == "attack" and self.during_attack:
            # The attack of step s runs before step s's update forwards are counted.
            return self._step_count()
        return None

    # ---------------------------------------------------------------- masks

    def contribution_mask(self, features: Tensor, head: nn.Module, fraction: float) -> Tensor:
        """The ``(N, d)`` multiplier of the contribution rule at drop ``fraction`` (no grad).

        Entries are 0 (dropped), 1 (protected top-``q`` units, and the pool when not
        rescaling) or ``r / (r − dropped)`` (the pool's survivors when rescaling).
        """
        with torch.no_grad():
            phi = features.detach()
            weight = getattr(head, "weight", None)
            if not isinstance(weight, Tensor) or weight.shape[-1] != phi.shape[1]:
                raise ValueError(
                    "guided-dropout (rule = 'contribution') needs a final layer with a "
                    f"(num_classes, {phi.shape[1]}) weight"
                )
            units = phi.shape[1]
            keep = kept_count(self.q, units)
            pool = units - keep
            drop = dropped_count(fraction, pool)
            mask = torch.ones_like(phi)
            if drop == 0:
                return mask
            predicted = head(phi).argmax(dim=1)
            # |φ_j · W_ŷj|: the magnitude of unit j's term in the predicted class's logit.
            contribution = (phi.float() * weight.detach()[predicted].float()).abs()
            # One stable sort gives disjoint protected and droppable sets even with ties
            # (post-ReLU features have many exact zeros).
            order = contribution.argsort(dim=1, descending=True, stable=True)
            pool_index = order[:, keep:]
            if self.rest == "lowest":
                dropped = pool_index[:, pool - drop :]
            else:
                pick = torch.rand(pool_index.shape, device=phi.device).topk(drop, dim=1).indices
                dropped = pool_index.gather(1, pick)
            if self.rescale:
                mask.scatter_(1, pool_index, pool / (pool - drop))
            mask.scatter_(1, dropped, 0.0)
            return mask

    def strength_mask(self, fraction: float, like: Tensor) -> Tensor:
        """The ``(d,)`` multiplier of the strength rule at drop ``fraction`` (no grad)."""
        assert self.strength is not None
        with torch.no_grad():
            units = self.in_features
            drop = dropped_count(fraction, units)
            mask = torch.ones(units, dtype=like.dtype, device=like.device)
            if drop == 0:
                return mask
            if self.rescale:
                mask.fill_(units / (units - drop))
            strongest = self.strength.detach().abs().topk(drop).indices
            mask[strongest] = 0.0
            return mask

    def forward(self, features: Tensor, head: nn.Module) -> Tensor:
        """The features with the strengths applied (strength rule) and guided units dropped."""
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"guided-dropout expects (N, {self.in_features}) penultimate features, got "
                f"{tuple(features.shape)}"
            )
        if self.strength is not None:
            features = features * self.strength.to(features.dtype)
        step = self._active_step()
        if step is None:
            return features
        fraction = self.drop_fraction(step)
        if fraction <= 0.0:
            return features
        if self.strength is not None:
            return features * self.strength_mask(fraction, features)
        return features * self.contribution_mask(features, head, fraction)

    def extra_repr(self) -> str:
        """Show the rule and the schedule in ``print(model)``."""
        return (
            f"in_features={self.in_features}, rule={self.rule}, p={self.p}, q={self.q}, "
            f"rest={self.rest}, rescale={self.rescale}, start_step={self.start_step}, "
            f"ramp_steps={self.ramp_steps}, during_attack={self.during_attack}"
        )


def _forget_step_mirror(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: re-read the restored step counter on the next forward."""
    if isinstance(module, GuidedDropout):
        module._steps = None
        module._last_update_phase = None


def _forward_with_guided_dropout(self: nn.Module, x: Tensor) -> Tensor:
    """``fc(guided_dropout(features(x), fc))``: the forward the transform gives the model.

    ``fc`` is looked up at every call, so a head installed after this transform (the
    ``hypersphere`` cosine head) is the one used, and the one that guides the dropout.
    """
    # cast: nn.Module's __getattr__ is typed as returning a Tensor or a Module.
    features = cast("Callable[[Tensor], Tensor]", self.features)(x)
    head = cast(nn.Module, self.fc)
    dropout = cast(GuidedDropout, self.guided_dropout)
    return cast(Tensor, head(dropout(features, head)))


class GuidedDropoutTransform:
    """AALP's Guided Dropout on the penultimate features (a reading of Wu et al. 2020).

    Adds a :class:`GuidedDropout` submodule ``guided_dropout`` and makes the model compute
    ``fc(guided_dropout(features(x), fc))``; ``fc`` is left in place (so ``hypersphere`` may
    follow). The model must follow artplug's architecture contract ``forward(x) ==
    fc(features(x))``, with ``fc`` having a ``(num_classes, d)`` weight.

    Readings (none of this is known from the paper): the placement (penultimate features; the
    abstract does not say, block outputs are not implemented), the selection rule
    (``"contribution"``: keep the top-``q`` units by ``|φ_j W_ŷj|`` for the predicted class
    ``ŷ`` and drop a fraction ``p`` of the rest; or Keshari et al.'s ``"strength"`` rule), the
    inverted-dropout rescaling, the defaults ``p = 0.3`` and ``q = 0.1``, and the warm-up /
    linear-ramp schedule counted in optimizer steps. Dropout is on only in training-mode
    forwards of the weight update, never during the attack (unless ``during_attack``) or
    outside the engine's step.
    """

    name = "guided-dropout"
    paper = (
        'S. Wu, J. Sang, K. Xu, G. Zheng, C. Xu, "Adaptive Adversarial Logits Pairing", '
        "arXiv:2005.11904; a parametrised reading of the abstract"
    )
    # Acts on the penultimate features: after latent sites, before the head is replaced.
    stage: ClassVar[artplug.TransformStage] = "features"

    class Params(artplug.Params):
        """Parameters of the ``guided-dropout`` model transform."""

        rule: Literal["contribution", "strength"] = Field(
            "contribution",
            description="how units are chosen: 'contribution' keeps the top-q units by "
            "|phi_j * W_(predicted class) j| and drops a fraction p of the rest; 'strength' "
            "(Keshari et al. 2019) drops the fraction p with the largest learnable strength",
        )
        p: float = Field(
            0.3,
            ge=0.0,
            lt=1.0,
            description="drop fraction after the warm-up: of the non-top-q units "
            "('contribution') or of all units ('strength'); [NOT FOUND], our choice",
        )
        q: float = Field(
            0.1,
            ge=0.0,
            le=1.0,
            description="fraction of units with the largest contribution that are never "
            "dropped ('contribution' only); [NOT FOUND], our choice",
        )
        rest: Literal["random", "lowest"] = Field(
            "random",
            description="which non-top-q units are dropped ('contribution' only): uniformly "
            "random ones, or the lowest-contribution ones",
        )
        rescale: bool = Field(
            True,
            description="multiply the surviving droppable units by pool / (pool - dropped) "
            "(inverted dropout); false only zeroes the dropped units",
        )
        start_step: int = Field(
            0, ge=0, description="optimizer steps without dropout (warm-up), counted from 0"
        )
        ramp_steps: int = Field(
            0,
            ge=0,
            description="after start_step, p grows linearly over this many optimizer steps "
            "(0 or 1: full p at once)",
        )
        during_attack: bool = Field(
            False,
            description="also drop in train-mode attack forwards ([perturbation] model_mode = "
            "'train'); off by default: the attack sees the network without dropout",
        )
        placement: Literal["penultimate"] = Field(
            "penultimate",
            description="where the dropout sits: on the penultimate features, in front of fc "
            "(block outputs are not implemented)",
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def apply(self, model: nn.Module) -> nn.Module:
        """Install ``guided_dropout`` in front of ``model.fc``, in place; return the model."""
        params = self.params
        if isinstance(getattr(model, "guided_dropout", None), GuidedDropout):
            raise ValueError(
                "guided-dropout: the model already has a guided_dropout module; list the "
                "guided-dropout transform only once"
            )
        fc = getattr(model, "fc", None)
        weight = getattr(fc, "weight", None)
        if not isinstance(fc, nn.Module) or not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(
                "guided-dropout needs a model with a final layer 'fc' that has a "
                "(num_classes, d) weight and forward(x) = fc(features(x)); "
                f"{type(model).__name__} has no such 'fc'"
            )
        if not callable(getattr(model, "features", None)):
            raise ValueError(
                "guided-dropout needs a model with a features(x) method returning the "
                f"penultimate features (forward(x) = fc(features(x))); {type(model).__name__} "
                "has none"
            )
        model.guided_dropout = GuidedDropout(
            int(weight.shape[1]),
            rule=params.rule,
            p=params.p,
            q=params.q,
            rest=params.rest,
            rescale=params.rescale,
            start_step=params.start_step,
            ramp_steps=params.ramp_steps,
            during_attack=params.during_attack,
        )
        # An instance attribute shadows the class's forward; copy.deepcopy rebinds the
        # method to the copy (the sanity gate deep-copies models). setattr: nn.Module's typed
        # __setattr__ only admits tensors and modules.
        setattr(model, "forward", types.MethodType(_forward_with_guided_dropout, model))  # noqa: B010
        return model

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Reject a repeated transform and a no-op during_attack (the order follows ``stage``)."""
        transforms = list(recipe.transforms)
        reasons = []
        count = transforms.count(cls.name)
        if count > 1:
            reasons.append(f"guided-dropout is listed {count} times; list it once")
        if params.during_attack and recipe.model_mode != "train":
            reasons.append(
                "during_attack = true has no effect while the attack runs in eval mode; set "
                '[perturbation] model_mode = "train" or during_attack = false'
            )
        return reasons


# ------------------------------------------------------------------------------------------
# Adaptive logit pairing (loss term)


def per_sample_terms(
    clean: Tensor,
    adv: Tensor,
    y: Tensor,
    *,
    scale: float = 1.0,
    margin: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-example ``(ce_i, lp_i)`` of AALP, both ``(B,)``, in float32 or wider.

    ``ce_i = ½[CE(s·(z_i − m·e_y), y_i) + CE(s·(z'_i − m·e_y), y_i)]`` (``s = 1, m = 0`` for
    ordinary models: plain cross-entropy of the logits; under a hypersphere head the HE
    margin loss of each pass) and ``lp_i = (1/K)‖z_i − z'_i‖²`` on the raw outputs (cosines
    under HE, never scaled). Gradients flow through both passes.
    """
    clean, adv = artplug.full_precision(clean), artplug.full_precision(adv)
    shift = float(margin) * F.one_hot(y, clean.shape[1]).to(clean.dtype)
    smoothing = float(label_smoothing)
    ce_clean = F.cross_entropy(
        scale * (clean - shift), y, reduction="none", label_smoothing=smoothing
    )
    ce_adv = F.cross_entropy(scale * (adv - shift), y, reduction="none", label_smoothing=smoothing)
    ce = 0.5 * (ce_clean + ce_adv)
    lp = (clean - adv).pow(2).mean(dim=1)
    return ce, lp


def sample_weights(
    ce: Tensor,
    lp: Tensor,
    misclassified: Tensor,
    *,
    weighting: Weighting,
    lam: float,
    rho: float,
) -> Tensor:
    """The per-example pairing weights ``w_i`` (detached, ``(B,)``).

    With ``T_i = ce_i + λ·lp_i`` (``w_i = ½`` when ``T_i = 0``):

    - ``"own-share"``: ``w_i = λ·lp_i / T_i``: each term is weighted by its own share of
      ``T_i``, so an example whose classification loss dominates (one that ALP fits badly)
      trains mostly on its cross-entropy, ``1 − w_i = ce_i / T_i``.
    - ``"ratio"``: ``w_i = ce_i / T_i``, the spec's example formula taken literally: each term
      is weighted by the *other* term's share. Degenerate in practice: at initialisation the
      clean and adversarial outputs agree (``lp_i ≈ 0``), so ``w_i ≈ 1`` and the
      cross-entropy gets no gradient; the pairing term then collapses the outputs to a
      constant (digits twin: chance accuracy, loss → 0).
    - ``"misclassified"``: ``w_i = 1 − ρ·1[x'_i misclassified]``.
    """
    ce, lp = ce.detach(), lp.detach()
    if weighting == "misclassified":
        return 1.0 - float(rho) * misclassified.to(ce.dtype)
    paired = float(lam) * lp
    total = ce + paired
    share = ce if weighting == "ratio" else paired  # "own-share": the pairing's own share
    return torch.where(total > 0, share / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)


class AdaptiveLogitPairing:
    """The AALP objective (a reading of Wu et al. 2020): ALP with per-sample adaptive weights.

    With ``ce_i`` and ``lp_i`` from :func:`per_sample_terms` and ``w_i`` from
    :func:`sample_weights` (stop-gradient: the weights are constants of the step),

        ``L = (1/B) Σ_i [(1 − w_i) · c · ce_i + w_i · λ · lp_i]``.

    The term is the whole objective: do not add ``cross-entropy``, ``he-margin`` or
    ``logit-pairing`` terms (``check_recipe`` rejects them). Under a hypersphere head the
    cross-entropies use ``s·cos`` (``artplug.logit_scale``) with the HE margin ``margin``
    (AT_HE's ALP+HE uses m = 0.3; ``margin`` needs the hypersphere transform), the pairing is
    on the unscaled cosines, and so the weights come from the HE losses (docs/techniques/aalp.md,
    interactions).
    An example is misclassified when ``argmax z'_i ≠ y_i``.

    Readings (the exact form is [NOT FOUND]): the per-sample ``ce_i`` and ``lp_i``, the
    weighting rules, the loss form, and the defaults ``c = 1``, ``ρ = 0.5``; ``λ = 0.5`` is
    ALP's pairing weight. The default ``weighting = "own-share"`` (``w_i = λ·lp_i / (ce_i +
    λ·lp_i)``) departs from the spec's example ``w_i = ce_i / (ce_i + λ·lp_i)`` (kept as
    ``"ratio"``), which collapses training (see :func:`sample_weights`); ``"own-share"`` gives
    the badly fitted examples more cross-entropy weight, as the abstract motivates.
    """

    name = "adaptive-logit-pairing"
    paper = (
        'S. Wu, J. Sang, K. Xu, G. Zheng, C. Xu, "Adaptive Adversarial Logits Pairing", '
        "arXiv:2005.11904; a parametrised reading of the abstract"
    )
    needs = frozenset({"clean", "adv"})

    class Params(artplug.Params):
        """Parameters of the ``adaptive-logit-pairing`` loss term."""

        weighting: Weighting = Field(
            "own-share",
            description="per-sample pairing weight w_i: 'own-share' = lam * lp_i / (ce_i + "
            "lam * lp_i); 'ratio' = ce_i / (ce_i + lam * lp_i) (the spec's example, collapses "
            "training); 'misclassified' = 1 - rho * [adversarial example misclassified]",
        )
        lam: float = Field(
            0.5,
            ge=0.0,
            allow_inf_nan=False,
            description="lambda: weight of the logit-pairing term (ALP's 0.5)",
        )
        c: float = Field(
            1.0,
            ge=0.0,
            allow_inf_nan=False,
            description="coefficient of the classification term",
        )
        rho: float = Field(
            0.5,
            ge=0.0,
            le=1.0,
            allow_inf_nan=False,
            description="pairing weight removed from misclassified examples ('misclassified')",
        )
        margin: float = Field(
            0.0,
            ge=0.0,
            allow_inf_nan=False,
            description="HE cosine margin m inside both cross-entropies (needs the hypersphere "
            "transform; ALP+HE uses 0.3)",
        )
        label_smoothing: float = Field(
            0.0,
            ge=0.0,
            lt=1.0,
            description="label smoothing of both cross-entropies (the official ALP code: 0.1)",
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> Tensor:
        """The AALP loss of the step (0-dim tensor)."""
        params = self.params
        if out.logits_clean is None or out.logits_adv is None:
            raise RuntimeError(
                "adaptive-logit-pairing was called without logits_clean and logits_adv; the "
                "engine must run the forward passes listed in needs=['adv', 'clean']"
            )
        ce, lp = per_sample_terms(
            out.logits_clean,
            out.logits_adv,
            out.y,
            scale=artplug.logit_scale(state.model),
            margin=params.margin,
            label_smoothing=params.label_smoothing,
        )
        misclassified = out.logits_adv.detach().argmax(dim=1) != out.y
        weights = sample_weights(
            ce,
            lp,
            misclassified,
            weighting=params.weighting,
            lam=params.lam,
            rho=params.rho,
        )
        per_example = (1.0 - weights) * params.c * ce + weights * params.lam * lp
        return per_example.mean()

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Reject double-counted terms, a margin without HE and training without an attack."""
        reasons = []
        if recipe.perturbation == "none":
            reasons.append(
                "needs an adversarial perturbation (e.g. pgd): with perturbation 'none' the "
                "clean and adversarial outputs are the same and nothing is paired"
            )
        count = recipe.losses.count(cls.name)
        if count > 1:
            reasons.append(
                f"adaptive-logit-pairing is listed {count} times; it is the whole AALP "
                "objective, list it once"
            )
        for other, why in _DOUBLE_COUNTED.items():
            if other in recipe.losses:
                reasons.append(
                    f"do not stack it with the {other} loss: {why} (the term is the whole AALP "
                    "objective)"
                )
        if params.margin > 0 and "hypersphere" not in recipe.transforms:
            reasons.append(
                "margin > 0 is the HE cosine margin and needs cosine outputs; add "
                '[[transform]] use = "hypersphere" or set margin = 0'
            )
        return reasons


# ------------------------------------------------------------------------------------------
# Registration


@artplug.hookimpl
def register_model_transforms(register: artplug.Register) -> None:
    """Register the ``guided-dropout`` model transform."""
    register(GuidedDropoutTransform)


@artplug.hookimpl
def register_loss_terms(register: artplug.Register) -> None:
    """Register the ``adaptive-logit-pairing`` loss term."""
    register(AdaptiveLogitPairing)
