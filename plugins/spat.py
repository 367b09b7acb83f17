"""SPAT: semantics-preserving adversarial training — a parametrised READING.

Reference: W. Lee, H. Lee, S. Lee, "Semantics-Preserving Adversarial Training",
arXiv:2009.10978 (2020).

What the abstract says: the adversarial examples used in adversarial training often change the
meaning of the input (they become ambiguous between classes), which the authors believe hurts
robustness; SPAT encourages the perturbation to fall on the pixels that are shared among all
classes. Only the abstract could be read and no code was found (docs/techniques/spat.md,
docs/techniques/README.md, what could not be read), so
everything below the abstract's sentence is a READING: the saliency, its normalisation, the
reduction over classes, the mask, how the mask enters the step, the L2 analogue and every
default. The recipes built on it are labelled "-like"; do not claim the paper's numbers.

The reading (docs/techniques/spat.md, method), at every attack step on the current iterate ``x'``:

1. per-class input saliencies ``G_k = |∂ h_k(x') / ∂x'|`` for every class ``k``, where ``h`` is
   the model's raw output (``saliency_on = "logit"``; a hypersphere head outputs cosines, so
   these are cosine gradients), its softmax or its log-softmax (of ``s · outputs`` with ``s`` =
   ``artplug.attack_logit_scale``);
2. each ``G_k`` divided by its maximum over the example's elements, so every class map lies in
   [0, 1];
3. ``shared`` = the per-element reduction of the K maps (``min``: salient for every class,
   ``geomean``: a softer AND, ``mean``: salient on average; optionally per pixel with the
   channels summed first, and optionally divided by its per-example maximum);
4. option A (``mode = "mask"``): the steepest-ascent step of the threat's norm on the attack
   objective is multiplied elementwise by ``M = shared ** gamma`` (``mask_mode = "soft"``) or
   ``M = 1[shared >= tau]`` (``"hard"``), then (``keep_budget = true``, the default) rescaled
   per example to the unmasked step's budget, then projected. L-inf: the unmasked step moves
   each of the D elements by α, so the masked step gets the same total movement,
   ``α · D · (M ⊙ sign(g)) / Σ M`` (shared elements may move by more than α; the projection
   bounds the perturbation); L2: the same length α, ``α · M ⊙ g / ‖M ⊙ g‖₂``. The mask
   thus redirects PGD's step towards the shared elements instead of shrinking it.
   ``keep_budget = false`` is the behaviour before that change: ``α · sign(g) ⊙ M`` (L-inf)
   or ``α · M ⊙ g / ‖g‖₂`` (L2), a step that never exceeds α and that a uniform mask of 0.5
   halves — a weaker PGD (measured in docs/techniques/spat.md);
5. option B (``mode = "penalty"``): ascend ``L(x') − λ · Σ (1 − shared) ⊙ |x' − x|`` with
   ``shared`` held fixed within the step (differentiating through the saliency would need
   second derivatives), i.e. step along ``∇L − λ (1 − shared) ⊙ sign(x' − x)``.

The attack objective ``L`` (``loss``): ``"ce"`` = cross-entropy on ``s · outputs`` from a
uniform random start (PGD-AT, and HE with ``s`` from the hypersphere head); ``"kl"`` =
TRADES' ``KL(softmax(s f(x)) ‖ softmax(s f(x')))`` from ``x + init_std · N(0, I)`` (the KL
gradient vanishes at ``x' = x``), the ``trades-kl`` attack's math with the mask on the KL
gradient.

Batching: the K saliencies and the objective's gradient come from ONE forward and ONE batched
backward (``torch.autograd.grad(..., is_grads_batched=True)``, which vmaps the backward over
K + 1 output directions). Each direction is a one-hot on one output column summed over the
batch; since examples are independent in the forward, ``∂ Σ_i h_ik / ∂x_j = ∂ h_jk / ∂x_j``
gives every example's own saliency. BatchNorm in train mode couples the examples of a batch
and breaks this identity, so ``spat`` requires ``[perturbation] model_mode = "eval"`` (the
default; ``check_recipe`` rejects ``"train"``).

Cost per attack step: one forward and one backward batched over K + 1 directions (about K + 1
backward passes of work, vectorised; ``directions_per_pass`` bounds its memory).

Defaults (readings, untuned): ``reduce = "mean"``, soft mask with ``gamma = 1``, logit
saliencies, per element, no renormalisation of the shared map, and ``keep_budget = true`` (the
masked step is rescaled to the full step size). ``min``, the most literal "shared by all
classes", makes the shared map so small (median about 0.01 on a PGD-trained digits model) that
a soft mask without ``keep_budget`` nearly stops the attack; docs/techniques/spat.md gives the
measurements (benchmarks/spat_attack_strength.py compares the attack with PGD).
With a mask of ones (hard mask, ``tau = 0``) the attack is exactly ``pgd`` (``loss = "ce"``)
or ``trades-kl`` (``loss = "kl"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

import artplug

# Guards the division by a saliency map's maximum when the map is all zeros.
_TINY = 1e-30

SaliencyOn = Literal["logit", "prob", "log_prob"]
Reduce = Literal["min", "mean", "geomean"]


def _per_example_max(t: Tensor) -> Tensor:
    """Maximum of each example over all but the first dimension, shaped to broadcast."""
    return t.flatten(1).amax(dim=1).view(-1, *([1] * (t.dim() - 1)))


def saliency_heads(outputs: Tensor, saliency_on: SaliencyOn, scale: float) -> Tensor:
    """The per-class quantities ``h`` whose input gradients are the saliencies, ``(N, K)``.

    ``"logit"``: the raw outputs (cosines under a hypersphere head; their scale cancels in the
    per-class normalisation); ``"prob"``: ``softmax(scale · outputs)``; ``"log_prob"``:
    ``log_softmax(scale · outputs)``.
    """
    outputs = artplug.full_precision(outputs)
    if saliency_on == "logit":
        return outputs
    if saliency_on == "prob":
        return F.softmax(scale * outputs, dim=1)
    return F.log_softmax(scale * outputs, dim=1)


def class_saliencies_and_gradient(
    heads: Tensor, objective: Tensor, x_adv: Tensor, directions_per_pass: int = 0
) -> tuple[Tensor, Tensor]:
    """``|∂ Σ_i heads[i, k] / ∂x_adv|`` for every k, and ``∂ Σ_i objective[i] / ∂x_adv``.

    ``heads`` is ``(N, K)`` and ``objective`` ``(N,)``, both computed from ``x_adv`` (which
    requires grad). Returns the saliencies ``(K, *x_adv.shape)`` and the gradient
    ``x_adv.shape``. All K + 1 directions go through one backward vectorised over the
    directions (``is_grads_batched``); ``directions_per_pass > 0`` splits them into groups of
    that size to bound memory (a loop over groups of directions, never over examples). When
    examples are independent in the forward (eval-mode BatchNorm), row j of each result is
    example j's own gradient.
    """
    stacked = torch.cat([heads, objective.unsqueeze(1).to(heads.dtype)], dim=1)
    count = stacked.shape[1]
    # Direction d is the one-hot on column d for every example: the gradient of the column's
    # sum over the batch.
    directions = torch.eye(count, dtype=stacked.dtype, device=stacked.device)
    directions = directions.unsqueeze(1).expand(count, stacked.shape[0], count)
    size = count if directions_per_pass <= 0 else directions_per_pass
    groups = directions.split(size)
    parts = []
    for index, group in enumerate(groups):
        (part,) = torch.autograd.grad(
            stacked,
            x_adv,
            grad_outputs=group,
            is_grads_batched=True,
            retain_graph=index < len(groups) - 1,
        )
        parts.append(part)
    grads = torch.cat(parts)
    return grads[:-1].abs(), grads[-1]


def shared_map(
    saliencies: Tensor, reduce: Reduce, granularity: Literal["element", "pixel"] = "element"
) -> Tensor:
    """The class-shared saliency of every element (or pixel), in [0, 1], shape of one batch.

    ``saliencies`` is ``(K, N, C, ...)`` of non-negative values. With ``granularity =
    "pixel"`` the channels are summed first (the map is then ``(N, 1, ...)`` and broadcasts over
    channels). Each class map is divided by its maximum over the example (all-zero maps stay
    zero); the K maps are then reduced elementwise: ``min``, arithmetic ``mean`` or geometric
    mean ``(Π_k G_k)^(1/K)`` (zero as soon as one class map is zero).
    """
    if granularity == "pixel":
        saliencies = saliencies.sum(dim=2, keepdim=True)
    classes = saliencies.shape[0]
    flat_max = saliencies.flatten(2).amax(dim=2)
    normalised = saliencies / flat_max.clamp_min(_TINY).view(
        *flat_max.shape, *([1] * (saliencies.dim() - 2))
    )
    if reduce == "min":
        return normalised.amin(dim=0)
    if reduce == "mean":
        return normalised.mean(dim=0)
    # log(0) = -inf and exp(-inf) = 0: an exact zero in any class gives zero, without NaN
    # (all values are in [0, 1], so no inf - inf can occur).
    return torch.exp(torch.log(normalised).sum(dim=0) / classes)


def step_mask(
    shared: Tensor, mask_mode: Literal["soft", "hard"], gamma: float, tau: float
) -> Tensor:
    """The step mask ``M``: ``shared ** gamma`` (soft) or ``1[shared >= tau]`` (hard)."""
    if mask_mode == "soft":
        return shared.pow(gamma)
    return (shared >= tau).to(shared.dtype)


def linf_room(x_adv: Tensor, x: Tensor, eps: float, direction: Tensor) -> Tensor:
    """How far each element of ``x_adv`` can still move along ``sign(direction)``, ``>= 0``.

    The feasible set is the L-inf ball of radius ``eps`` around ``x`` intersected with [0, 1];
    an element moving up has ``min(x + eps, 1) - x_adv`` left, one moving down
    ``x_adv - max(x - eps, 0)``; an element with a zero direction does not move (room 0).
    """
    upper = (x + eps).clamp(max=1.0) - x_adv
    lower = x_adv - (x - eps).clamp(min=0.0)
    room = torch.where(direction > 0, upper, torch.where(direction < 0, lower, 0.0))
    return room.clamp_min(0.0)


def _factor_for_movement(magnitude: Tensor, room: Tensor, target: Tensor) -> Tensor:
    """Per row, the ``c >= 0`` with ``Σ min(c · magnitude, room) = target``, ``(N,)``.

    ``magnitude`` and ``room`` are ``(N, D)`` and non-negative. The moved total is piecewise
    linear and non-decreasing in ``c`` with breakpoints ``room / magnitude``, where an element
    saturates; sorting them gives the exact solution (no bisection). Where even saturating every
    element with a non-zero magnitude moves less than ``target``, ``c`` is the largest finite
    breakpoint (everything the step can reach is reached).
    """
    moving = magnitude > 0
    # Elements that never move have no breakpoint: +inf sorts them last.
    breakpoints = torch.where(moving, room / magnitude.where(moving, 1.0), torch.inf)
    breakpoints, order = breakpoints.sort(dim=1)
    room_sorted = room.gather(1, order).where(breakpoints.isfinite(), 0.0)
    magnitude_sorted = magnitude.gather(1, order)
    # At c = breakpoints[k]: elements before k are saturated (their room), the rest move c·|s|.
    saturated_before = room_sorted.cumsum(dim=1) - room_sorted
    magnitude_from = magnitude_sorted.flip(1).cumsum(dim=1).flip(1)
    moved_at = saturated_before + breakpoints.where(breakpoints.isfinite(), 0.0) * magnitude_from
    reached = (moved_at >= target.unsqueeze(1)) & breakpoints.isfinite()
    # The first breakpoint at which the target is reached bounds the segment that holds c.
    first = reached.to(torch.int8).argmax(dim=1, keepdim=True)
    found = reached.any(dim=1)
    before = saturated_before.gather(1, first).squeeze(1)
    rest = magnitude_from.gather(1, first).squeeze(1)
    factor = (target - before) / rest.clamp_min(_TINY)
    largest = breakpoints.where(breakpoints.isfinite(), 0.0).amax(dim=1)
    return torch.where(found, factor, largest).clamp_min(0.0)


def keep_step_budget(
    step: Tensor,
    step_size: float,
    norm: str,
    room: Tensor | None = None,
) -> Tensor:
    """The masked ``step`` rescaled per example to the unmasked step's budget.

    L-inf: the unmasked step ``step_size · sign(g)`` moves each element by ``step_size``, as far
    as the ball and [0, 1] let it: a total movement of ``Σ min(step_size, room)`` with ``room``
    from :func:`linf_room` (computed along ``sign(g)``; elements with ``g = 0`` have room 0).
    The masked step is multiplied by the factor ``c`` for which it moves the same total after
    the projection, ``Σ min(c · |step|, room)``: the mask redistributes PGD's movement towards
    the shared elements instead of removing any of it, and movement that the projection would
    clip away on a saturated element goes to the others. Without ``room`` (unbounded room,
    e.g. a ball so wide that nothing saturates) this is ``step · D · step_size / Σ|step|``:
    the same total ``D · step_size``.
    L2: the step is rescaled to L2 length ``step_size`` (``step_size · M ⊙ g / ‖M ⊙ g‖₂`` for
    the masked unit step), the unmasked step's length. An all-zero step stays zero.
    """
    flat = step.flatten(1)
    if norm == "linf" and room is not None:
        magnitude = flat.abs()
        room_flat = room.flatten(1)
        # The unmasked step's movement: every element with room moves min(α, room).
        target = room_flat.clamp(max=step_size).sum(dim=1)
        factor = _factor_for_movement(magnitude, room_flat, target)
        return step * factor.view(-1, *([1] * (step.dim() - 1)))
    # L-inf without room: the unmasked step's mean |element| is step_size; L2: its length is
    # step_size.
    size = flat.abs().mean(dim=1) if norm == "linf" else flat.norm(dim=1)
    # Where the size is zero the step is zero too, so any finite divisor leaves it zero.
    factor = step_size / size.clamp_min(_TINY)
    return step * factor.view(-1, *([1] * (step.dim() - 1)))


def penalty_objective(
    objective: Tensor, shared: Tensor, x_adv: Tensor, x: Tensor, lam: float
) -> Tensor:
    """Option B's per-example value ``L_i − λ · Σ (1 − shared_i) ⊙ |x'_i − x_i|``, ``(N,)``."""
    penalty = ((1.0 - shared) * (x_adv - x).abs()).flatten(1).sum(dim=1)
    return objective - lam * penalty


def penalty_direction(grad: Tensor, shared: Tensor, x_adv: Tensor, x: Tensor, lam: float) -> Tensor:
    """Ascent direction of :func:`penalty_objective` with ``shared`` held fixed.

    ``∇L − λ (1 − shared) ⊙ sign(x' − x)``; at ``x' = x`` the subgradient 0 is used.
    """
    return grad - lam * (1.0 - shared) * (x_adv - x).sign()


class SPAT:
    """SPAT-like attack (Lee et al. 2020, a reading): PGD steered to pixels shared by all classes.

    Every step computes per-class input saliencies on the current iterate (one forward, one
    backward batched over the K classes and the objective), reduces them to a class-shared map
    in [0, 1], and either multiplies the steepest-ascent step by a mask of that map and
    rescales it to the unmasked step's budget (``mode = "mask"``, ``keep_budget``) or ascends
    the objective minus a penalty on changing non-shared elements (``mode = "penalty"``); then
    projects onto the ball and [0, 1]. The objective is cross-entropy (``loss = "ce"``,
    PGD-AT/HE) or TRADES' KL (``loss = "kl"``), on ``attack_logit_scale · outputs``. See the
    module docstring for the formulas; every choice past the abstract is a READING
    (docs/techniques/spat.md) exposed as a parameter.

    ``step_size = None``: ``2.5 · eps / steps`` for ``"ce"`` (pgd's rule, 2/255 at 8/255 and 10
    steps) and ``eps · 0.007 / 0.031`` for ``"kl"`` (trades-kl's rule), from the step's
    training eps; an explicit step is not scaled by an eps warm-up.
    """

    name = "spat"
    paper = (
        'W. Lee, H. Lee, S. Lee, "Semantics-Preserving Adversarial Training", '
        "arXiv:2009.10978 (2020); a parametrised reading of the abstract"
    )

    class Params(artplug.Params):
        """Parameters of the ``spat`` perturbation."""

        steps: int = Field(10, ge=1, description="gradient steps")
        step_size: float | None = Field(
            None,
            gt=0,
            description="step length in pixel units; None means 2.5 * eps / steps (loss ce) "
            "or eps * 0.007 / 0.031 (loss kl)",
        )
        random_start: bool = Field(
            True,
            description="ce: start uniformly in the ball (true) or at x (false); kl: must be "
            "true (start x + init_std * N(0, I))",
        )
        init_std: float = Field(
            0.001, gt=0, description="std of the Gaussian start of the kl objective"
        )
        loss: Literal["ce", "kl"] = Field(
            "ce",
            description="attack objective: cross-entropy on s * outputs (PGD-AT, HE) or "
            "TRADES' KL(p(x) || p(x')) (with the trades loss)",
        )
        mode: Literal["mask", "penalty"] = Field(
            "mask",
            description="mask: multiply the ascent step by M(shared) (option A); penalty: "
            "ascend L - lam * sum (1 - shared) |x' - x| (option B)",
        )
        saliency_on: SaliencyOn = Field(
            "logit",
            description="per-class saliency of the raw outputs (cosines under HE), of "
            "softmax(s * outputs) or of log_softmax(s * outputs)",
        )
        reduce: Reduce = Field(
            "mean",
            description="how the K normalised class maps become the shared map (min: salient "
            "for every class; geomean; mean)",
        )
        renormalize: bool = Field(
            False,
            description="divide the shared map by its per-example maximum, so the most shared "
            "element gets the full step",
        )
        keep_budget: bool = Field(
            True,
            description="mode = mask: rescale the masked step to the unmasked step's budget "
            "(L-inf: the same total movement, step_size per element on average; L2: length "
            "step_size), so the mask redirects the step; false: the mask shrinks the step "
            "(the behaviour before this option, a weaker PGD)",
        )
        granularity: Literal["element", "pixel"] = Field(
            "element",
            description="saliency per input element, or per pixel (channels summed, one mask "
            "value for all channels of a pixel)",
        )
        mask_mode: Literal["soft", "hard"] = Field(
            "soft", description="soft: M = shared ** gamma; hard: M = 1[shared >= tau]"
        )
        gamma: float = Field(1.0, ge=0, description="exponent of the soft mask")
        tau: float = Field(0.5, ge=0, le=1, description="threshold of the hard mask")
        lam: float = Field(
            0.01, ge=0, description="penalty weight lambda of mode = penalty (per element)"
        )
        directions_per_pass: int = Field(
            0,
            ge=0,
            description="output directions (K classes + objective) per batched backward; 0 = "
            "all in one pass; smaller values save memory",
        )

        @model_validator(mode="after")
        def _kl_needs_a_random_start(self) -> Self:
            # At x' = x the KL and its gradient vanish; from the clean point the first step
            # would follow floating-point round-off (the reason trades-kl has init_std > 0).
            if self.loss == "kl" and not self.random_start:
                raise ValueError(
                    'loss = "kl" needs random_start = true: the KL gradient is zero at x, so '
                    "the attack starts at x + init_std * N(0, I)"
                )
            return self

    def __init__(self, params: Params) -> None:
        self.params = params

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return the SPAT-like adversarial batch (detached, in [0, 1], inside the ball)."""
        # Read params at call time: schedules replace self.params between steps (with a copy
        # the engine has validated, so every field has its declared type).
        params = self.params
        threat = state.threat
        x = x.detach()
        if threat.eps == 0:
            # A Python float: no host sync. The ball is the single point x.
            return x
        steps = params.steps
        kl = params.loss == "kl"
        if params.step_size is not None:
            step_size = params.step_size
        elif kl:
            step_size = threat.eps * artplug.TRADES_STEP_RATIO
        else:
            step_size = 2.5 * threat.eps / steps
        scale = artplug.attack_logit_scale(model)
        with torch.enable_grad():
            if kl:
                # The KL objective is trades-kl's own math, from artplug (not the trades plugin).
                log_p, x_adv = artplug.kl_attack_start(model, x, threat, scale, params.init_std)
            elif bool(params.random_start):
                x_adv = artplug.random_start(x, threat)
            else:
                x_adv = x
            for _ in range(steps):
                x_adv = x_adv.detach().requires_grad_(True)
                outputs = model(x_adv)
                logits = scale * artplug.full_precision(outputs)
                if kl:
                    objective = artplug.kl_terms(log_p, logits).sum(dim=1)
                else:
                    objective = F.cross_entropy(logits, y, reduction="none")
                heads = saliency_heads(outputs, params.saliency_on, scale)
                saliencies, grad = class_saliencies_and_gradient(
                    heads, objective, x_adv, params.directions_per_pass
                )
                x_adv = x_adv.detach()
                shared = shared_map(saliencies, params.reduce, params.granularity).to(x.dtype)
                if bool(params.renormalize):
                    shared = shared / _per_example_max(shared).clamp_min(_TINY)
                grad = grad.to(x.dtype)
                if params.mode == "mask":
                    mask = step_mask(shared, params.mask_mode, params.gamma, params.tau)
                    step = mask * artplug.ascent_step(grad, step_size, threat.norm)
                    if bool(params.keep_budget):
                        # Without this the soft mask (median ~0.1 with reduce = "mean") shrinks
                        # most steps to a tenth: a weaker PGD rather than a redirected one.
                        # (Rescaling to max|step| = α, the L-inf size, is not enough: measured
                        # in docs/techniques/spat.md, it leaves most elements at a tenth too.)
                        # The L-inf budget is counted after the projection: a budget of raw
                        # movement (D·α) is partly clipped away on saturated elements, which
                        # left the attack slightly weaker than PGD.
                        room = (
                            linf_room(x_adv, x, threat.eps, grad) if threat.norm == "linf" else None
                        )
                        step = keep_step_budget(step, step_size, threat.norm, room)
                else:
                    direction = penalty_direction(grad, shared, x_adv, x, params.lam)
                    step = artplug.ascent_step(direction, step_size, threat.norm)
                x_adv = artplug.project(x_adv + step, x, threat)
        return x_adv.detach()

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Reasons why this recipe combines ``spat`` wrongly (empty when it is fine)."""
        reasons = []
        if recipe.model_mode == "train":
            reasons.append(
                'spat needs [perturbation] model_mode = "eval": its batched per-class '
                "saliencies take the gradient of each output summed over the batch, which is "
                "each example's own gradient only when examples are independent; BatchNorm in "
                "train mode couples them"
            )
        if "trades" in recipe.losses and params.loss != "kl":
            reasons.append(
                'with the trades loss set loss = "kl": SPAT+TRADES masks the gradient of '
                "TRADES' KL attack (docs/techniques/spat.md, interactions, "
                "docs/techniques/README.md, combinations), not of cross-entropy"
            )
        return reasons


@artplug.hookimpl
def register_perturbations(register: artplug.Register) -> None:
    """Register the ``spat`` perturbation."""
    register(SPAT)
