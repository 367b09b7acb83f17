"""Tests of plugins/spat.py: the ``spat`` perturbation (a reading of SPAT, Lee et al. 2020).

The mask is checked on a hand-made linear model ``z = W x`` (no bias): its per-class input
gradients are the rows ``W_k`` whatever ``x`` is, so the saliencies, their normalisation, the
three reductions, both masks and the masked step are written out by hand below. The batched
per-class gradients are compared with a per-example, per-class loop; ``spat`` with a mask of
ones is compared with the independent ``pgd`` and ``trades-kl`` plugins.
"""

from __future__ import annotations

import math
from typing import Any

import pluggy
import pytest
import torch
import torch.nn.functional as F
from artplug_plugins import spat
from artplug_plugins.pgd_at import PGD
from artplug_plugins.spat import (
    SPAT,
    class_saliencies_and_gradient,
    keep_step_budget,
    linf_room,
    penalty_direction,
    penalty_objective,
    saliency_heads,
    shared_map,
    step_mask,
)
from artplug_plugins.trades import TradesKL
from pydantic import ValidationError
from torch import Tensor, nn

import artplug
import artplug.hookspecs
from artplug.engine import build
from artplug.recipe import resolve
from artplug.registry import Registry
from artplug.testing import check_perturbation, digits_recipe, tiny_batch, tiny_model
from artplug.workflows import train_and_evaluate

# ---------------------------------------------------------------- the hand-made example

SHAPE = (1, 2, 2)  # C, H, W: four input elements
# Rows W_k; their absolute values divided by the row maximum (4, 2, 3) are
#   class 0: [1, 1/2, 1/4, 0], class 1: [1/2, 1/2, 1/2, 1], class 2: [1, 1, 0, 1/2].
W = torch.tensor(
    [[4.0, -2.0, 1.0, 0.0], [1.0, 1.0, -1.0, 2.0], [-3.0, 3.0, 0.0, 1.5]], dtype=torch.float64
)
NORMALISED = [[1.0, 0.5, 0.25, 0.0], [0.5, 0.5, 0.5, 1.0], [1.0, 1.0, 0.0, 0.5]]
SHARED_MIN = [0.5, 0.5, 0.0, 0.0]
SHARED_MEAN = [2.5 / 3, 2.0 / 3, 0.75 / 3, 1.5 / 3]
SHARED_GEOMEAN = [0.5 ** (1 / 3), 0.25 ** (1 / 3), 0.0, 0.0]


def hand_model(weight: Tensor = W) -> nn.Module:
    """``z = W x`` on flattened 1x2x2 inputs, float64, eval mode."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return nn.Sequential(nn.Flatten(), linear).eval()


def hand_batch(n: int = 3, low: float = 0.3, high: float = 0.7) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = low + (high - low) * torch.rand(n, *SHAPE, generator=gen, dtype=torch.float64)
    return x, torch.arange(n) % W.shape[0]


def as_batch(values: list[float], n: int) -> Tensor:
    """One map of the 1x2x2 shape, repeated for ``n`` examples."""
    return torch.tensor(values, dtype=torch.float64).view(1, *SHAPE).expand(n, *SHAPE)


def ce_grad(x: Tensor, y: Tensor, scale: float = 1.0) -> Tensor:
    """Closed-form ∇_x Σ_i CE(s W x_i, y_i) = s (softmax(s W x) − onehot(y)) W."""
    probs = torch.softmax(scale * x.flatten(1) @ W.T, dim=1)
    onehot = F.one_hot(y, W.shape[0]).to(probs.dtype)
    return (scale * (probs - onehot) @ W).view_as(x)


def step_state(model: nn.Module, eps: float, norm: str = "linf") -> artplug.StepState:
    return artplug.StepState(
        progress=artplug.Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100),
        knobs={},
        model=model,
        threat=artplug.Threat(norm, eps),  # type: ignore[arg-type]
    )


def attack(**params: Any) -> SPAT:
    return SPAT(SPAT.Params(**params))


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def saliencies_of(model: nn.Module, x: Tensor, y: Tensor, on: str = "logit", scale: float = 1.0):
    x_adv = x.clone().requires_grad_(True)
    outputs = model(x_adv)
    objective = F.cross_entropy(scale * outputs, y, reduction="none")
    return class_saliencies_and_gradient(
        saliency_heads(outputs, on, scale),  # type: ignore[arg-type]
        objective,
        x_adv,
    )


# ---------------------------------------------------------------- saliency, reduction, mask


def test_saliencies_of_the_linear_model_are_the_absolute_weight_rows() -> None:
    x, y = hand_batch()
    saliencies, grad = saliencies_of(hand_model(), x, y)
    assert saliencies.shape == (3, 3, *SHAPE)
    for k in range(3):
        torch.testing.assert_close(saliencies[k], W[k].abs().view(1, *SHAPE).expand_as(x))
    torch.testing.assert_close(grad, ce_grad(x, y))


@pytest.mark.parametrize(
    ("reduce", "expected"),
    [("min", SHARED_MIN), ("mean", SHARED_MEAN), ("geomean", SHARED_GEOMEAN)],
)
def test_shared_map_normalises_each_class_by_its_max_then_reduces(reduce, expected) -> None:
    x, y = hand_batch()
    saliencies, _ = saliencies_of(hand_model(), x, y)
    shared = shared_map(saliencies, reduce)
    torch.testing.assert_close(shared, as_batch(expected, 3))
    # The normalisation is per class and per example: scaling one class map or one example
    # changes nothing.
    scaled = saliencies.clone()
    scaled[1] *= 7.0
    scaled[:, 2] *= 0.01
    torch.testing.assert_close(shared_map(scaled, reduce), shared)


def test_shared_map_per_pixel_sums_the_channels_first() -> None:
    # 2 classes, 1 example, 2 channels of 1x2 pixels: (K, N, C, H, W) = (2, 1, 2, 1, 2).
    saliencies = torch.tensor(
        [[[[[1.0, 3.0]], [[1.0, 1.0]]]], [[[[2.0, 0.0]], [[2.0, 4.0]]]]], dtype=torch.float64
    )
    # Channel sums: class 0 [2, 4] -> [1/2, 1]; class 1 [4, 4] -> [1, 1].
    pixel = shared_map(saliencies, "min", "pixel")
    assert pixel.shape == (1, 1, 1, 2)
    torch.testing.assert_close(pixel, torch.tensor([[[[0.5, 1.0]]]], dtype=torch.float64))
    element = shared_map(saliencies, "min", "element")
    # Per element: class 0 / 3 = [[1/3, 1], [1/3, 1/3]]; class 1 / 4 = [[1/2, 0], [1/2, 1]].
    expected = torch.tensor([[[[1 / 3, 0.0]], [[1 / 3, 1 / 3]]]], dtype=torch.float64)
    torch.testing.assert_close(element, expected)


def test_all_zero_class_map_and_geomean_zeros_give_no_nan() -> None:
    weight = W.clone()
    weight[1] = 0.0  # a class whose output ignores the input
    x, y = hand_batch()
    saliencies, _ = saliencies_of(hand_model(weight), x, y)
    for reduce in ("min", "mean", "geomean"):
        shared = shared_map(saliencies, reduce)  # type: ignore[arg-type]
        assert torch.isfinite(shared).all()
    torch.testing.assert_close(
        shared_map(saliencies, "mean"),
        as_batch([(1 + 0 + 1) / 3, (0.5 + 0 + 1) / 3, 0.25 / 3, 0.5 / 3], 3),
    )
    torch.testing.assert_close(shared_map(saliencies, "geomean"), torch.zeros_like(x))


def test_prob_and_log_prob_saliencies_match_the_softmax_jacobian() -> None:
    # ∂ softmax(s z)_k / ∂x = s p_k (W_k − p W) and ∂ log_softmax(s z)_k / ∂x = s (W_k − p W).
    x, y = hand_batch()
    scale = 15.0
    probs = torch.softmax(scale * x.flatten(1) @ W.T, dim=1)  # (N, K)
    centred = W.unsqueeze(0) - (probs @ W).unsqueeze(1)  # (N, K, D)
    log_prob = (scale * centred).abs()
    prob = (scale * probs.unsqueeze(2) * centred).abs()
    for on, expected in (("log_prob", log_prob), ("prob", prob)):
        saliencies, _ = saliencies_of(hand_model(), x, y, on, scale)
        torch.testing.assert_close(saliencies, expected.transpose(0, 1).reshape(3, 3, *SHAPE))


def test_logit_saliency_ignores_the_attack_scale() -> None:
    # Under HE the model outputs cosines; "logit" saliencies are on the raw outputs.
    outputs = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(saliency_heads(outputs, "logit", 10.0), outputs)
    torch.testing.assert_close(
        saliency_heads(outputs, "prob", 10.0), torch.softmax(10 * outputs, dim=1)
    )


def test_soft_and_hard_masks() -> None:
    shared = as_batch(SHARED_MEAN, 2)
    torch.testing.assert_close(
        step_mask(shared, "soft", 2.0, 0.5), as_batch([v * v for v in SHARED_MEAN], 2)
    )
    torch.testing.assert_close(step_mask(shared, "soft", 1.0, 0.5), shared)
    torch.testing.assert_close(step_mask(shared, "hard", 1.0, 0.5), as_batch([1, 1, 0, 1], 2))
    torch.testing.assert_close(step_mask(shared, "hard", 1.0, 0.0), torch.ones_like(shared))
    # At the threshold the element counts as shared (>=).
    torch.testing.assert_close(step_mask(shared, "hard", 1.0, 2.0 / 3), as_batch([1, 1, 0, 0], 2))


# ---------------------------------------------------------------- the masked step by hand


def budget(mask: list[float], n: int = 3) -> Tensor:
    """The L-inf keep_budget factor: D / Σ M, the unmasked step's total movement D·α over ours."""
    total = sum(abs(v) for v in mask)
    return as_batch([v * len(mask) / total for v in mask], n)


@pytest.mark.parametrize(
    ("params", "mask"),
    [
        ({"reduce": "mean"}, SHARED_MEAN),
        ({"reduce": "min", "mask_mode": "soft", "gamma": 0.5}, [math.sqrt(v) for v in SHARED_MIN]),
        ({"reduce": "geomean"}, SHARED_GEOMEAN),
        ({"reduce": "mean", "mask_mode": "hard", "tau": 0.5}, [1, 1, 0, 1]),
        ({"reduce": "min", "renormalize": True}, [1, 1, 0, 0]),
    ],
)
def test_one_linf_step_keeps_the_total_movement_of_the_unmasked_step(
    params: dict, mask: list[float]
) -> None:
    # keep_budget (default): α · D · M ⊙ sign(g) / Σ M, so Σ|step| = D · α, as for PGD's step.
    model = hand_model()
    x, y = hand_batch()
    eps, alpha = 1.0, 0.04  # a wide ball: the projection does not bind
    out = attack(steps=1, step_size=alpha, random_start=False, **params).generate(
        model, x, y, step_state(model, eps)
    )
    expected = x + alpha * ce_grad(x, y).sign() * budget(mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    total = (out - x).abs().flatten(1).sum(dim=1)
    torch.testing.assert_close(total, torch.full_like(total, 4 * alpha), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("params", "mask"),
    [
        ({"reduce": "mean"}, SHARED_MEAN),
        ({"reduce": "min", "mask_mode": "soft", "gamma": 0.5}, [math.sqrt(v) for v in SHARED_MIN]),
        ({"reduce": "geomean"}, SHARED_GEOMEAN),
        ({"reduce": "mean", "mask_mode": "hard", "tau": 0.5}, [1, 1, 0, 1]),
        ({"reduce": "min", "renormalize": True}, [1, 1, 0, 0]),
    ],
)
def test_without_keep_budget_one_linf_step_is_alpha_sign_times_mask(
    params: dict, mask: list[float]
) -> None:
    # The behaviour before keep_budget: the mask shrinks the step.
    model = hand_model()
    x, y = hand_batch()
    eps, alpha = 0.1, 0.04
    out = attack(
        steps=1, step_size=alpha, random_start=False, keep_budget=False, **params
    ).generate(model, x, y, step_state(model, eps))
    expected = x + alpha * ce_grad(x, y).sign() * as_batch(mask, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_keep_step_budget_on_fixed_tensors() -> None:
    step = torch.tensor([[0.5, -0.25, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # L-inf: mean |step| of example 0 is 0.25 -> factor 0.1 / 0.25 = 0.4; an all-zero step
    # stays zero (no NaN).
    torch.testing.assert_close(
        keep_step_budget(step, 0.1, "linf"),
        torch.tensor([[0.2, -0.1, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64),
    )
    # L2: ‖step_0‖ = sqrt(0.25 + 0.0625 + 0.0625) = sqrt(0.375).
    expected = step * (0.1 / math.sqrt(0.375))
    expected[1] = 0.0
    torch.testing.assert_close(keep_step_budget(step, 0.1, "l2"), expected)
    # A uniform mask changes nothing: the masked L-inf step is PGD's step again.
    uniform = 0.3 * torch.tensor([[1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(keep_step_budget(uniform, 0.1, "linf"), uniform / 3.0)


def test_one_l2_step_is_the_unit_step_of_the_masked_gradient() -> None:
    model = hand_model()
    x, y = hand_batch()
    eps, alpha = 5.0, 0.2
    out = attack(steps=1, step_size=alpha, random_start=False).generate(
        model, x, y, step_state(model, eps, "l2")
    )
    masked = as_batch(SHARED_MEAN, 3) * ce_grad(x, y)
    expected = x + alpha * masked / masked.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected)
    # The mask redirects the step; its length is alpha, as PGD's.
    torch.testing.assert_close((out - x).flatten(1).norm(dim=1), torch.full((3,), alpha).double())


def test_without_keep_budget_one_l2_step_is_the_mask_times_the_unit_l2_step() -> None:
    model = hand_model()
    x, y = hand_batch()
    eps, alpha = 0.5, 0.2
    out = attack(steps=1, step_size=alpha, random_start=False, keep_budget=False).generate(
        model, x, y, step_state(model, eps, "l2")
    )
    grad = ce_grad(x, y)
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = x + alpha * as_batch(SHARED_MEAN, 3) * unit
    torch.testing.assert_close(out, expected)
    # Shorter than alpha: the mask shrinks the step, it is not renormalised.
    assert ((out - x).flatten(1).norm(dim=1) < alpha - 1e-3).all()


def factor_by_bisection(magnitude: Tensor, room: Tensor, target: float) -> float:
    """``c`` with ``Σ min(c·magnitude, room) = target`` for one example, by bisection.

    An independent check of the exact sort-based solution in ``keep_step_budget``.
    """
    low, high = 0.0, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        if float(torch.minimum(middle * magnitude, room).sum()) >= target:
            high = middle
        else:
            low = middle
    return high


def test_keep_step_budget_counts_the_movement_after_projection() -> None:
    alpha = 0.1
    step = torch.tensor([[0.4, 0.2, 0.0, 0.2], [0.4, 0.0, 0.0, 0.0]], dtype=torch.float64)
    room = torch.tensor([[0.05, 0.3, 0.3, 0.3], [0.05, 0.3, 0.3, 0.3]], dtype=torch.float64)
    # Example 0: PGD's sign step moves 0.05 + 0.1 + 0.1 + 0.1 = 0.35 after projection. The
    # first element saturates at c = 0.125; beyond that 0.05 + 0.4 c = 0.35 gives c = 0.75.
    # Example 1: only the first element moves, so at most 0.05: c = 0.05 / 0.4 (saturated).
    out = keep_step_budget(step, alpha, "linf", room)
    expected = torch.tensor([[0.3, 0.15, 0.0, 0.15], [0.05, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    moved = torch.minimum(out.abs(), room).sum(dim=1)
    torch.testing.assert_close(moved[0], torch.tensor(0.35, dtype=torch.float64))


def test_keep_step_budget_with_room_matches_bisection_on_random_tensors() -> None:
    gen = torch.Generator().manual_seed(11)
    alpha = 0.05
    step = torch.rand(6, 1, 5, 5, generator=gen, dtype=torch.float64)
    step = step * (torch.rand(step.shape, generator=gen) > 0.3)  # some masked-out elements
    room = 0.1 * torch.rand(step.shape, generator=gen, dtype=torch.float64)
    room = room * (torch.rand(step.shape, generator=gen) > 0.2)  # some saturated elements
    out = keep_step_budget(step, alpha, "linf", room)
    for i in range(len(step)):
        target = float(room[i].clamp(max=alpha).sum())
        reachable = float(room[i][step[i] > 0].sum())
        moved = float(torch.minimum(out[i].abs(), room[i]).sum())
        assert moved == pytest.approx(min(target, reachable), abs=1e-12)
        if target < reachable:
            c = factor_by_bisection(step[i].abs(), room[i], target)
            torch.testing.assert_close(out[i], c * step[i], rtol=1e-9, atol=1e-12)


def test_linf_room_on_fixed_tensors() -> None:
    x = torch.tensor([[0.5, 0.95, 0.02, 0.5]], dtype=torch.float64)
    x_adv = torch.tensor([[0.55, 0.97, 0.0, 0.4]], dtype=torch.float64)
    direction = torch.tensor([[1.0, 1.0, -1.0, 0.0]], dtype=torch.float64)
    # up to min(x + 0.1, 1): 0.05, 0.03; down to max(x - 0.1, 0): 0.0; zero direction: 0.
    torch.testing.assert_close(
        linf_room(x_adv, x, 0.1, direction),
        torch.tensor([[0.05, 0.03, 0.0, 0.0]], dtype=torch.float64),
    )


@pytest.mark.parametrize("keep_budget", [True, False])
def test_two_steps_follow_the_hand_formula_with_projection(keep_budget: bool) -> None:
    model = hand_model()
    x, y = hand_batch(low=0.0, high=1.0)
    eps, alpha = 0.05, 0.04
    threat = artplug.Threat("linf", eps)
    kept = [1, 1, 0, 1]
    out = attack(
        steps=2,
        step_size=alpha,
        random_start=False,
        mask_mode="hard",
        tau=0.5,
        keep_budget=keep_budget,
    ).generate(model, x, y, step_state(model, eps))
    expected = x
    for _ in range(2):
        sign = ce_grad(expected, y).sign()
        step = alpha * sign * as_batch(kept, 3)
        if keep_budget:
            # Rescale each example's masked step so that, after the projection, it moves as
            # far in total as PGD's unmasked step would (found here by bisection).
            upper = (x + eps).clamp(max=1.0) - expected
            lower = expected - (x - eps).clamp(min=0.0)
            room = torch.where(sign > 0, upper, torch.where(sign < 0, lower, 0.0)).clamp_min(0)
            for i in range(len(x)):
                target = float(room[i].clamp(max=alpha).sum())
                reachable = float(room[i][step[i] != 0].sum())
                if target >= reachable:
                    step[i] = step[i] * 1e6  # every kept element saturates
                else:
                    step[i] = step[i] * factor_by_bisection(step[i].abs(), room[i], target)
        expected = artplug.project(expected + step, x, threat)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    # The third element is never shared (min over classes 0): it never moves.
    assert torch.equal(out[:, 0, 1, 0], x[:, 0, 1, 0])


def test_mask_uses_the_attack_logit_scale_for_the_cross_entropy() -> None:
    model = hand_model()
    setattr(model, "artplug_logit_scale", 1.0)  # noqa: B010
    setattr(model, "artplug_attack_logit_scale", 15.0)  # noqa: B010
    x, y = hand_batch()
    alpha = 0.03
    out = attack(
        steps=1, step_size=alpha, random_start=False, saliency_on="prob", keep_budget=False
    ).generate(model, x, y, step_state(model, 0.1))
    scale = 15.0
    probs = torch.softmax(scale * x.flatten(1) @ W.T, dim=1)
    centred = W.unsqueeze(0) - (probs @ W).unsqueeze(1)
    prob_saliency = (probs.unsqueeze(2) * centred).abs()  # (N, K, D); s cancels
    normalised = prob_saliency / prob_saliency.amax(dim=2, keepdim=True)
    mask = normalised.mean(dim=1).view_as(x)
    expected = x + alpha * ce_grad(x, y, scale).sign() * mask
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # The default keep_budget rescales each example's step by D / Σ M (here per example).
    out = attack(steps=1, step_size=alpha, random_start=False, saliency_on="prob").generate(
        model, x, y, step_state(model, 1.0)
    )
    factor = 4 / mask.flatten(1).sum(dim=1).view(-1, 1, 1, 1)
    expected = x + alpha * ce_grad(x, y, scale).sign() * mask * factor
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- penalty mode (option B)


def test_penalty_objective_on_fixed_tensors() -> None:
    objective = torch.tensor([2.0, 0.5], dtype=torch.float64)
    shared = torch.tensor([[0.0, 0.5, 1.0], [0.25, 1.0, 0.75]], dtype=torch.float64)
    x = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.4, 0.6]], dtype=torch.float64)
    x_adv = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.4]], dtype=torch.float64)
    # Example 0: 1*0.1 + 0.5*0.2 + 0*0.4 = 0.2; example 1: 0.75*0 + 0*0.1 + 0.25*0.2 = 0.05.
    value = penalty_objective(objective, shared, x_adv, x, lam=3.0)
    torch.testing.assert_close(value, torch.tensor([2.0 - 0.6, 0.5 - 0.15], dtype=torch.float64))
    direction = penalty_direction(torch.zeros_like(x), shared, x_adv, x, lam=3.0)
    expected = torch.tensor([[-3.0, 1.5, 0.0], [0.0, -0.0, 0.75]], dtype=torch.float64)
    torch.testing.assert_close(direction, expected)


def test_penalty_direction_is_the_gradient_of_the_objective_with_shared_fixed() -> None:
    model = hand_model()
    x, y = hand_batch()
    gen = torch.Generator().manual_seed(3)
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=gen, dtype=x.dtype)).requires_grad_(True)
    shared = as_batch(SHARED_MEAN, 3)
    value = penalty_objective(
        F.cross_entropy(model(x_adv), y, reduction="none"), shared, x_adv, x, 0.7
    ).sum()
    (grad,) = torch.autograd.grad(value, x_adv)
    direction = penalty_direction(ce_grad(x_adv.detach(), y), shared, x_adv.detach(), x, 0.7)
    torch.testing.assert_close(direction, grad)


def test_one_penalty_step_from_a_seeded_uniform_start() -> None:
    model = hand_model()
    x, y = hand_batch()
    eps, alpha, lam = 0.1, 0.03, 0.5
    threat = artplug.Threat("linf", eps)
    torch.manual_seed(21)
    out = attack(steps=1, step_size=alpha, mode="penalty", lam=lam, reduce="min").generate(
        model, x, y, step_state(model, eps)
    )
    torch.manual_seed(21)
    start = artplug.random_start(x, threat)
    penalty = lam * (1 - as_batch(SHARED_MIN, 3)) * (start - x).sign()
    expected = artplug.project(start + alpha * (ce_grad(start, y) - penalty).sign(), x, threat)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- batched vs a per-class loop


def reference_saliencies(model: nn.Module, x: Tensor, on: str, scale: float) -> Tensor:
    """|∂ h_k(x_i) / ∂x_i| by a loop over examples (each forwarded alone) and classes."""
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        heads = saliency_heads(model(xi), on, scale)  # type: ignore[arg-type]
        per_class = [
            torch.autograd.grad(heads[0, k], xi, retain_graph=True)[0][0].abs()
            for k in range(heads.shape[1])
        ]
        rows.append(torch.stack(per_class))
    return torch.stack(rows, dim=1)  # (K, N, ...)


@pytest.mark.parametrize("on", ["logit", "prob", "log_prob"])
def test_batched_saliencies_equal_a_per_example_per_class_loop(on: str) -> None:
    model = tiny_model().double().eval()  # small CNN with BatchNorm, eval mode
    x, y = tiny_batch(5)
    x = x.double()
    scale = 3.0
    expected = reference_saliencies(model, x, on, scale)
    saliencies, _ = saliencies_of(model, x, y, on, scale)
    torch.testing.assert_close(saliencies, expected)
    for reduce in ("min", "mean", "geomean"):
        torch.testing.assert_close(
            shared_map(saliencies, reduce),  # type: ignore[arg-type]
            shared_map(expected, reduce),  # type: ignore[arg-type]
        )
    # Splitting the 11 directions into groups of 4 gives the same result.
    x_adv = x.clone().requires_grad_(True)
    outputs = model(x_adv)
    grouped, grad = class_saliencies_and_gradient(
        saliency_heads(outputs, on, scale),  # type: ignore[arg-type]
        F.cross_entropy(scale * outputs, y, reduction="none"),
        x_adv,
        directions_per_pass=4,
    )
    torch.testing.assert_close(grouped, expected)
    x_ref = x.clone().requires_grad_(True)
    ce = F.cross_entropy(scale * model(x_ref), y, reduction="sum")
    torch.testing.assert_close(grad, torch.autograd.grad(ce, x_ref)[0])


def test_train_mode_batchnorm_couples_examples_hence_eval_mode_is_required() -> None:
    # Why check_recipe rejects model_mode = "train": the batched gradient of a summed output
    # is no longer each example's own gradient.
    model = tiny_model().double().train()
    x, y = tiny_batch(5)
    saliencies, _ = saliencies_of(model, x.double(), y)
    model.eval()
    own, _ = saliencies_of(model, x.double(), y)
    assert not torch.allclose(saliencies, own)


# ---------------------------------------------------------------- with a mask of ones it is PGD


def test_hard_mask_with_tau_zero_is_exactly_pgd() -> None:
    model = tiny_model().double().eval()
    x, y = tiny_batch(8)
    x = x.double()
    state = step_state(model, 0.1)
    torch.manual_seed(31)
    ours = attack(steps=3, mask_mode="hard", tau=0.0).generate(model, x, y, state)
    torch.manual_seed(31)
    reference = PGD(PGD.Params(steps=3)).generate(model, x, y, state)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    torch.manual_seed(31)
    penalty_free = attack(steps=3, mode="penalty", lam=0.0).generate(model, x, y, state)
    torch.testing.assert_close(penalty_free, reference, rtol=0, atol=1e-12)


def test_kl_loss_with_a_mask_of_ones_is_exactly_trades_kl() -> None:
    model = tiny_model().double().eval()
    setattr(model, "artplug_attack_logit_scale", 15.0)  # noqa: B010
    x, y = tiny_batch(8)
    x = x.double()
    state = step_state(model, 0.1)
    torch.manual_seed(32)
    ours = attack(steps=3, loss="kl", mask_mode="hard", tau=0.0).generate(model, x, y, state)
    torch.manual_seed(32)
    reference = TradesKL(TradesKL.Params(steps=3)).generate(model, x, y, state)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_kl_loss_masks_the_kl_gradient_from_the_gaussian_start() -> None:
    model = Recorder(hand_model())
    x, y = hand_batch()
    eps, alpha = 0.1, 0.03
    threat = artplug.Threat("linf", eps)
    torch.manual_seed(33)
    out = attack(steps=1, step_size=alpha, loss="kl", keep_budget=False).generate(
        model, x, y, step_state(model, eps)
    )
    torch.manual_seed(33)
    start = artplug.project(x + 0.001 * torch.randn_like(x), x, threat)
    # One clean forward (the fixed target), then the step's forward at the start.
    assert len(model.inputs) == 2 and torch.equal(model.inputs[1], start)
    p = torch.softmax(x.flatten(1) @ W.T, dim=1)
    q = torch.softmax(start.flatten(1) @ W.T, dim=1)
    kl_grad = ((q - p) @ W).view_as(x)
    expected = artplug.project(start + alpha * kl_grad.sign() * as_batch(SHARED_MEAN, 3), x, threat)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- contract, ball, box


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"mode": "penalty"},
        {"loss": "kl", "mask_mode": "hard"},
        {"reduce": "geomean", "granularity": "pixel", "saliency_on": "log_prob"},
        {"renormalize": True, "directions_per_pass": 3},
    ],
    ids=["default", "penalty", "kl-hard", "geomean-pixel", "renormalize-grouped"],
)
def test_contract(params: dict) -> None:
    check_perturbation(SPAT, params)


@pytest.mark.parametrize("norm, eps", [("linf", 0.3), ("l2", 1.0)])
@pytest.mark.parametrize("mode", ["mask", "penalty"])
def test_result_stays_in_ball_and_box_near_the_edges(norm: str, eps: float, mode: str) -> None:
    model = tiny_model().eval()
    x, y = tiny_batch(16)
    x = (x - 0.5).sign().clamp(min=0)  # every pixel at 0 or 1: the box binds
    out = attack(steps=4, step_size=eps, mode=mode, renormalize=True, lam=1e-4).generate(
        model, x, y, step_state(model, eps, norm)
    )
    assert out.min() >= 0 and out.max() <= 1
    delta = (out - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-5
    assert size.max() > 0.1 * eps  # it did move


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_returns_x_exactly(norm: str) -> None:
    model = hand_model()
    x, y = hand_batch()
    assert torch.equal(attack().generate(model, x, y, step_state(model, 0.0, norm)), x)


def test_detached_no_parameter_grad_and_works_under_no_grad() -> None:
    model = hand_model()
    x, y = hand_batch()
    x.requires_grad_(True)
    torch.manual_seed(41)
    with torch.no_grad():
        quiet = attack(steps=2).generate(model, x, y, step_state(model, 0.1))
    torch.manual_seed(41)
    loud = attack(steps=2).generate(model, x, y, step_state(model, 0.1))
    assert not quiet.requires_grad and quiet.dtype == x.dtype
    assert torch.equal(quiet, loud)
    assert all(p.grad is None for p in model.parameters())


def test_under_cpu_bf16_autocast() -> None:
    model = tiny_model().eval()
    x, y = tiny_batch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attack(steps=2).generate(model, x, y, step_state(model, 0.1))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - x).abs().max() <= 0.1 + 1e-6


def test_default_step_sizes_and_params_read_at_call_time() -> None:
    model = Recorder(hand_model())
    x, y = hand_batch()
    eps = 0.1
    technique = attack(steps=10, random_start=False, mask_mode="hard", tau=0.0)
    from artplug.engine import _update_params  # validated, as the engine does

    _update_params(technique, {"steps": 4.0})  # a knob's float
    technique.generate(model, x, y, step_state(model, eps))
    assert len(model.inputs) == 4
    # ce: 2.5 * eps / steps (pgd's rule); the first step from x is not projected.
    first = model.inputs[1] - model.inputs[0]
    torch.testing.assert_close(first, 2.5 * eps / 4 * ce_grad(x, y).sign())
    model.inputs.clear()
    attack(steps=3, loss="kl", mask_mode="hard", tau=0.0).generate(
        model, x, y, step_state(model, eps)
    )
    assert len(model.inputs) == 1 + 3
    step = (model.inputs[2] - model.inputs[1]).abs()
    torch.testing.assert_close(step, torch.full_like(step, eps * 0.007 / 0.031))


def test_params_defaults_and_validation() -> None:
    params = SPAT.Params()
    assert (params.steps, params.step_size, params.random_start, params.loss) == (
        10,
        None,
        True,
        "ce",
    )
    assert (params.mode, params.saliency_on, params.reduce, params.mask_mode) == (
        "mask",
        "logit",
        "mean",
        "soft",
    )
    assert (params.gamma, params.tau, params.renormalize, params.granularity) == (
        1.0,
        0.5,
        False,
        "element",
    )
    assert params.keep_budget is True  # the mask redirects the step (docs/techniques/spat.md)
    with pytest.raises(ValidationError, match="random_start = true"):
        SPAT.Params(loss="kl", random_start=False)
    for bad in (
        {"steps": 0},
        {"tau": 1.5},
        {"gamma": -1.0},
        {"lam": -0.1},
        {"reduce": "max"},
        {"saliency_on": "cos"},
        {"beta": 1.0},
    ):
        with pytest.raises(ValidationError):
            SPAT.Params(**bad)


# ---------------------------------------------------------------- recipe rules and training


def view(losses: tuple[str, ...], model_mode: str = "eval") -> artplug.RecipeView:
    return artplug.RecipeView(
        transforms=(),
        perturbation="spat",
        losses=losses,
        schedules=(),
        threat=artplug.Threat("linf", 0.031),
        model_mode=model_mode,
    )


def test_check_recipe_rules() -> None:
    assert not list(SPAT.check_recipe(SPAT.Params(), view(("cross-entropy",))))
    assert not list(SPAT.check_recipe(SPAT.Params(loss="kl"), view(("trades",))))
    (reason,) = SPAT.check_recipe(SPAT.Params(), view(("trades",)))
    assert 'loss = "kl"' in reason
    (reason,) = SPAT.check_recipe(SPAT.Params(), view(("cross-entropy",), "train"))
    assert 'model_mode = "eval"' in reason


def spat_recipe(perturbation: dict, losses: list[dict], transforms: list[dict] | None = None):
    raw = digits_recipe(
        data={"dataset": "digits", "batch_size": 32},
        perturbation={"use": "spat", "steps": 2, **perturbation},
        loss=losses,  # type: ignore[arg-type]
    )
    raw["eval"] = {"every_epochs": 0, "final_attacks": ["clean"], "test_examples": 16}
    raw["eval"]["sanity"] = False
    if transforms:
        raw["transform"] = transforms
    return raw


@pytest.mark.parametrize(
    ("perturbation", "losses", "transforms"),
    [
        ({}, [{"use": "cross-entropy"}], None),
        ({"loss": "kl"}, [{"use": "trades"}], None),
        ({"mode": "penalty"}, [{"use": "he-margin"}], [{"use": "hypersphere"}]),
    ],
    ids=["cross-entropy", "trades-kl", "hypersphere-he-margin"],
)
def test_two_step_training_run(plugin_set, run_tmp, perturbation, losses, transforms) -> None:
    recipe = resolve(spat_recipe(perturbation, losses, transforms), plugin_set.registries)
    components = build(recipe)
    before = [p.detach().clone() for p in components.model.parameters()]
    result = train_and_evaluate(components, run_dir=run_tmp / "run", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0
    after = list(components.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_resolve_rejects_ce_spat_with_trades_and_train_mode(plugin_set) -> None:
    with pytest.raises(artplug.RecipeError) as info:
        resolve(spat_recipe({}, [{"use": "trades"}]), plugin_set.registries)
    (problem,) = info.value.problems
    assert problem.startswith("perturbation (spat)") and 'loss = "kl"' in problem
    with pytest.raises(artplug.RecipeError) as info:
        resolve(
            spat_recipe({"model_mode": "train"}, [{"use": "cross-entropy"}]),
            plugin_set.registries,
        )
    (problem,) = info.value.problems
    assert problem.startswith("perturbation (spat)") and 'model_mode = "eval"' in problem


# ---------------------------------------------------------------- registration


def test_registry_accepts_the_class_shape() -> None:
    registry = Registry("perturbation")
    registry.add(SPAT, plugin="test")
    assert registry.get("spat").description


def test_hookimpl_registers_through_pluggy() -> None:
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(spat, name="spat")
    pm.check_pending()
    perturbations = Registry("perturbation")
    pm.hook.register_perturbations(register=lambda cls: perturbations.add(cls, "spat"))
    assert perturbations.names() == ["spat"]
