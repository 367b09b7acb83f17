"""Hypersphere embedding (HE) for adversarial training: a cosine head and a margin loss.

Reference: T. Pang, X. Yang, Y. Dong, K. Xu, J. Zhu, H. Su, "Boosting Adversarial Training with
Hypersphere Embedding", NeurIPS 2020 (arXiv:2002.08619); official code ``ShawnXYang/AT_HE``.

HE changes the last layer and the training loss of any adversarial-training framework. This
module registers:

- model transform ``hypersphere``: replaces the model's final ``nn.Linear`` ``fc`` by a
  bias-free :class:`CosineHead` whose outputs are ``cos θ_k = <Ŵ_k, φ̂>`` in [−1, 1], and
  publishes the logit scale ``s`` on the model (``artplug.set_logit_scale``) so that softmax-based
  terms train on ``s·cos``;
- loss term ``he-margin``: the additive-margin cross-entropy ``CE(s·(cos − m·onehot(y)), y)``.

Semantics of the reference code that are followed here:

- **FN**: the pooled penultimate features are L2-normalised, ``φ̂ = φ / ‖φ‖₂`` (differentiable).
- **WN as projected SGD**: before every forward the class weight rows are re-projected onto the
  unit sphere in place and without autograd (the reference assigns ``fc.weight.data``). The
  gradient is therefore taken with respect to the normalised rows as if they were free
  parameters; SGD and weight decay then move them off the sphere until the next forward
  projects them back. This is *not* ``torch.nn.utils.weight_norm`` (whose gradient goes through
  the normalisation). FN and WN are independent switches, as the ablation flags of the code.
- **Margin**: CosFace-style, subtracted from the target cosine (the paper's "angular margin";
  nothing is added to the angle), and only in the training loss.
- **Attacks without margin**: training attacks maximise the cross-entropy on ``s·cos``
  (``attack_logits = "s_cos"``, the AT_HE CIFAR-10 code) or on the unscaled ``cos``
  (``"cos"``, the default of the Bag-of-Tricks repository ``P2333/Bag-of-Tricks-for-AT``);
  the choice is a recipe parameter. FreeAT+HE has no separate attack: its δ comes from the
  training backward, so the margin is inside the ascent, as in the AT_HE ImageNet code.
- **Evaluation** (ART) attacks the raw outputs, i.e. the cosines, like the AT_HE and
  RobustBench evaluations of the released models.

Logits per framework (AT_HE): PGD-AT+HE trains ``he-margin`` on the adversarial outputs;
TRADES+HE puts the margin only in the clean CE term and computes the KL on ``s·cos`` (attack and
training); ALP+HE trains ``0.5·he-margin(clean) + 0.5·he-margin(adv)`` plus logit pairing on the
unscaled cosines.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

import artplug

# Lower bound of a norm before dividing by it: a zero feature vector (all post-ReLU features
# zero) or a zero weight row gives a zero output instead of NaN.
_EPS = 1e-12


def _unit_rows(t: Tensor, eps: float = _EPS) -> Tensor:
    """``t`` with every row divided by its L2 norm (at least ``eps``), in ``t``'s dtype.

    Half-precision inputs are normalised in float32: ``eps`` underflows to zero in float16, and
    the norm of a long bf16 vector loses digits.
    """
    work = artplug.full_precision(t)
    return F.normalize(work, p=2.0, dim=1, eps=eps).to(t.dtype)


class CosineHead(nn.Module):
    """Bias-free last layer that outputs cosines between the features and the class weights.

    ``forward(φ) = F.linear(φ̂, W)`` with ``φ̂ = φ / ‖φ‖₂`` when ``feature_norm`` (FN). With
    ``weight_norm`` (WN) every forward first re-projects each row of ``weight`` onto the unit
    sphere, in place and outside autograd, so the output is ``cos θ`` and the optimizer performs
    projected SGD on the sphere (see the module docstring). The parameter is called ``weight``
    (state-dict key ``fc.weight``, as the replaced ``nn.Linear``).
    """

    def __init__(
        self, weight: Tensor, *, feature_norm: bool = True, weight_norm: bool = True
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.feature_norm = feature_norm
        self.weight_norm = weight_norm
        init = weight.detach().clone()
        if weight_norm:
            init = _unit_rows(init)
        self.weight = nn.Parameter(init)

    @torch.no_grad()
    def project_weight(self) -> None:
        """Re-project every weight row onto the unit sphere, in place and without autograd.

        The copy goes through ``weight.data``, like the reference's ``fc.weight.data = ...``:
        it does not bump the parameter's autograd version counter, so a second forward before
        ``backward()`` (TRADES, ALP: clean and adversarial passes) does not invalidate the first
        pass's graph. Between two optimizer steps the projection is idempotent, so the saved
        weight only changes by round-off. ``copy_`` keeps the parameter's dtype and device.
        """
        data = self.weight.data
        data.copy_(_unit_rows(data))

    def forward(self, features: Tensor) -> Tensor:
        """Cosines ``(N, out_features)`` of a feature batch ``(N, in_features)``."""
        if self.weight_norm:
            self.project_weight()
        if self.feature_norm:
            features = _unit_rows(features)
        return F.linear(features, self.weight)

    def extra_repr(self) -> str:
        """Show the sizes and the two normalisation switches in ``print(model)``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias=False, "
            f"feature_norm={self.feature_norm}, weight_norm={self.weight_norm}"
        )


class Hypersphere:
    """Hypersphere embedding head (Pang et al. 2020): bias-free cosine fc with FN + WN, scale s.

    Replaces the model's final ``nn.Linear`` named ``fc`` (the model must compute
    ``forward(x) = fc(features(x))``, as every built-in architecture does) by a
    :class:`CosineHead` initialised from the old weight (rows normalised when ``weight_norm``),
    and sets the model's logit scale to ``s`` and its attack logit scale (``s``
    for ``attack_logits = "s_cos"``, 1 for ``"cos"``). Cross-entropy and TRADES' KL then train
    on ``s·cos``, training attacks use the attack scale, logit pairing uses the raw cosines, and
    the evaluation attacks the raw cosines.

    Per-framework defaults of the reference (recipes set them): PGD-AT+HE s = 10, m = 0.2;
    TRADES+HE s = 15, m = 0.2 (β = 6); ALP+HE s = 20, m = 0.3 (β = 0.5); FreeAT+HE (ImageNet)
    s = 10, m = 0.2. FastAT+HE has no official code; the Bag-of-Tricks repository runs FGSM
    with FN + WN and attacks the unscaled cosines by default (``attack_logits = "cos"``).

    Its stage is ``"head"``, so it is the last ``[[transform]]``: transforms apply in stage
    order SAT → SLAT sites → AALP dropout → HE head, so hooks installed earlier see the final
    modules.
    """

    name = "hypersphere"
    paper = (
        'T. Pang, X. Yang, Y. Dong, K. Xu, J. Zhu, H. Su, "Boosting Adversarial '
        'Training with Hypersphere Embedding", NeurIPS 2020 (arXiv:2002.08619)'
    )
    # Replaces the head: last, so hooks installed by earlier stages see the final modules.
    stage: ClassVar[artplug.TransformStage] = "head"

    class Params(artplug.Params):
        """Parameters of the ``hypersphere`` model transform."""

        s: float = Field(
            10.0,
            gt=0.0,
            allow_inf_nan=False,
            description="logit scale: softmax-based terms use s * cos (PGD-AT+HE 10, "
            "TRADES+HE 15, ALP+HE 20)",
        )
        feature_norm: bool = Field(
            True, description="FN: L2-normalise the penultimate features before the head"
        )
        weight_norm: bool = Field(
            True,
            description="WN: re-project each class weight row onto the unit sphere before "
            "every forward (projected SGD)",
        )
        attack_logits: Literal["s_cos", "cos"] = Field(
            "s_cos",
            description="what training attacks maximise the cross-entropy of: s * cos (AT_HE "
            "code) or the unscaled cos (Bag-of-Tricks default)",
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def apply(self, model: nn.Module) -> nn.Module:
        """Swap ``model.fc`` for a :class:`CosineHead` and set the logit scales; in place."""
        params = self.params
        fc = getattr(model, "fc", None)
        if isinstance(fc, CosineHead):
            raise ValueError(
                "hypersphere: the model's 'fc' is already a cosine head; list the "
                "hypersphere transform only once"
            )
        if not isinstance(fc, nn.Linear):
            found = "no attribute 'fc'" if fc is None else f"'fc' of type {type(fc).__name__}"
            raise ValueError(
                "hypersphere needs a model with a final nn.Linear named 'fc' "
                f"(forward(x) = fc(features(x))) to replace by the cosine head; "
                f"{type(model).__name__} has {found}"
            )
        model.fc = CosineHead(
            fc.weight, feature_norm=params.feature_norm, weight_norm=params.weight_norm
        )
        attack_scale = params.s if params.attack_logits == "s_cos" else 1.0
        artplug.set_logit_scale(model, params.s, attack_scale=attack_scale)
        return model

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Reject a repeated ``hypersphere`` (its place, last, follows from ``stage``)."""
        transforms = list(recipe.transforms)
        reasons = []
        count = transforms.count(cls.name)
        if count > 1:
            reasons.append(
                f"hypersphere is listed {count} times; the head can only be replaced once"
            )
        return reasons


class HEMargin:
    """HE margin loss (Pang et al. 2020): cross-entropy on s·(cos − m·onehot(y)), CosFace style.

    ``L = −log(e^{s(cos_y − m)} / (e^{s(cos_y − m)} + Σ_{k≠y} e^{s·cos_k}))``, averaged over
    the batch, with ``s = artplug.logit_scale(model)`` set by the ``hypersphere`` transform. The
    margin is subtracted from the target cosine only in training; attacks see no margin (except
    FreeAT, whose δ comes from this loss's own backward). ``m = 0`` is cross-entropy on
    ``s·cos``. PGD-AT+HE uses ``on = "adv"``; TRADES+HE ``on = "clean"`` (with the TRADES KL
    term); ALP+HE one term on each, weight 0.5, plus logit pairing on the cosines.
    """

    name = "he-margin"
    paper = (
        'T. Pang, X. Yang, Y. Dong, K. Xu, J. Zhu, H. Su, "Boosting Adversarial '
        'Training with Hypersphere Embedding", NeurIPS 2020 (arXiv:2002.08619)'
    )
    needs: frozenset[str]

    class Params(artplug.Params):
        """Parameters of the ``he-margin`` loss term."""

        m: float = Field(
            0.2,
            ge=0.0,
            allow_inf_nan=False,
            description="additive cosine margin subtracted from the target class's cosine "
            "(PGD-AT+HE and TRADES+HE 0.2, ALP+HE 0.3)",
        )
        on: Literal["adv", "clean"] = Field(
            "adv", description="which forward pass the loss is computed on"
        )

    def __init__(self, params: Params) -> None:
        self.params = params
        # 'on' is a string: no (float-valued) knob can change it after construction.
        self.needs = frozenset({params.on})

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> Tensor:
        """Mean margin cross-entropy of the chosen cosines against ``out.y`` (0-dim tensor)."""
        params = self.params
        cosines = out.logits_adv if params.on == "adv" else out.logits_clean
        if cosines is None:
            raise RuntimeError(
                f"he-margin (on={params.on!r}) was called without logits_{params.on}; "
                f"the engine must run the forward passes listed in needs={sorted(self.needs)}"
            )
        # s·(cos − m) in bf16 would round the logits by up to ~s/256 before the softmax.
        cosines = artplug.full_precision(cosines)
        scale = artplug.logit_scale(state.model)
        # Knob values arrive as plain floats; float() also covers a validated Params value.
        margin = params.m * F.one_hot(out.y, cosines.shape[1]).to(cosines.dtype)
        return F.cross_entropy(scale * (cosines - margin), out.y)

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Require the ``hypersphere`` transform, which makes the outputs cosines."""
        if Hypersphere.name not in recipe.transforms:
            return ['he-margin is defined on cosine logits; add [[transform]] use = "hypersphere"']
        return []


@artplug.hookimpl
def register_model_transforms(register: artplug.Register) -> None:
    """Register the ``hypersphere`` model transform."""
    register(Hypersphere)


@artplug.hookimpl
def register_loss_terms(register: artplug.Register) -> None:
    """Register the ``he-margin`` loss term."""
    register(HEMargin)
