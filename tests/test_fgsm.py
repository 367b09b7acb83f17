"""Tests of plugins/fgsm.py: FGSM and FastAT's FGSM-RS against their formulas.

A linear model ``f(x) = W x + b`` has the closed-form cross-entropy input gradient
``(softmax(f(x)) - onehot(y)) @ W``, so each result is compared with the formula.
"""

from __future__ import annotations

import math

import pluggy
import pytest
import torch
import toy
from artplug_plugins import fgsm
from artplug_plugins.fgsm import FGSM
from pydantic import ValidationError
from torch import Tensor, nn
from toy import ce_input_grad

import artplug
import artplug.hookspecs
from artplug.registry import Registry

SHAPE = (3, 2, 2)
DIM = math.prod(SHAPE)
EPS = 8 / 255


def linear_model(classes: int = 4, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The toy linear model on this file's input shape."""
    return toy.linear_model(SHAPE, classes, 0, dtype)


def batch(
    low: float = 0.0, high: float = 1.0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = low + (high - low) * torch.rand(8, *SHAPE, generator=gen, dtype=dtype)
    return x, torch.randint(0, 4, (8,), generator=gen)


def step_state(model: nn.Module, eps: float = EPS, norm: str = "linf") -> artplug.StepState:
    return artplug.StepState(
        progress=artplug.Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100),
        knobs={},
        model=model,
        threat=artplug.Threat(norm, eps),  # type: ignore[arg-type]
    )


def attack(**params: object) -> FGSM:
    return FGSM(FGSM.Params(**params))


def test_fgsm_without_random_start_is_x_plus_eps_sign_grad_clipped() -> None:
    model = linear_model()
    x, y = batch()
    out = attack().generate(model, x, y, step_state(model))
    expected = (x + EPS * ce_input_grad(model, x, y).sign()).clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_fgsm_random_start_steps_1_25_eps_from_the_seeded_start() -> None:
    model = linear_model()
    x, y = batch()
    threat = artplug.Threat("linf", EPS)
    torch.manual_seed(5)
    out = attack(random_start=True).generate(model, x, y, step_state(model))
    torch.manual_seed(5)
    x0 = artplug.random_start(x, threat)
    expected = artplug.project(x0 + 1.25 * EPS * ce_input_grad(model, x0, y).sign(), x, threat)
    assert torch.equal(out, expected)
    # The start matters: the result is neither the plain FGSM point nor the start itself.
    assert not torch.equal(out, attack().generate(model, x, y, step_state(model)))
    assert not torch.equal(out, x0)


@pytest.mark.parametrize("random_start", [False, True])
def test_fgsm_step_size_override(random_start: bool) -> None:
    model = linear_model()
    x, y = batch()
    threat = artplug.Threat("linf", EPS)
    torch.manual_seed(9)
    out = attack(random_start=random_start, step_size=EPS / 2).generate(
        model, x, y, step_state(model)
    )
    torch.manual_seed(9)
    x0 = artplug.random_start(x, threat) if random_start else x
    expected = artplug.project(x0 + EPS / 2 * ce_input_grad(model, x0, y).sign(), x, threat)
    assert torch.equal(out, expected)
    if not random_start:
        # Half of eps from x never hits the ball's edge.
        assert (out - x).abs().max() <= EPS / 2 + 1e-15


def test_fgsm_l2_takes_a_normalised_gradient_step_of_length_eps() -> None:
    model = linear_model()
    x, y = batch(low=0.3, high=0.7)  # the box never clips
    eps = 0.5
    out = attack().generate(model, x, y, step_state(model, eps, "l2"))
    grad = ce_input_grad(model, x, y)
    expected = x + eps * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_eps_zero_returns_x_exactly(random_start: bool, norm: str) -> None:
    model = linear_model()
    x, y = batch()
    out = attack(random_start=random_start).generate(model, x, y, step_state(model, 0.0, norm))
    assert torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("random_start", [False, True])
def test_fgsm_output_contract(dtype: torch.dtype, random_start: bool) -> None:
    model = linear_model(dtype=dtype)
    x, y = batch(dtype=dtype)
    out = attack(random_start=random_start).generate(model, x, y, step_state(model))
    assert not out.requires_grad
    assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() <= EPS + 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_fgsm_works_under_no_grad_and_reads_params_at_call_time() -> None:
    model = linear_model()
    x, y = batch(low=0.3, high=0.7)
    technique = attack()
    with torch.no_grad():
        quiet = technique.generate(model, x, y, step_state(model))
    assert torch.equal(quiet, technique.generate(model, x, y, step_state(model)))
    # A schedule can change the step through the engine's params replacement.
    technique.params = technique.params.model_copy(update={"step_size": EPS / 4})
    out = technique.generate(model, x, y, step_state(model))
    torch.testing.assert_close((out - x).abs(), torch.full_like(x, EPS / 4))


def test_fgsm_params_defaults_and_validation() -> None:
    params = FGSM.Params()
    assert (params.random_start, params.step_size) == (False, None)
    for bad in ({"step_size": 0.0}, {"step_size": -1.0}, {"random_init": True}):
        with pytest.raises(ValidationError):
            FGSM.Params(**bad)  # type: ignore[arg-type]


def test_fgsm_registers() -> None:
    registry = Registry("perturbation")
    registry.add(FGSM, plugin="test")
    assert registry.get("fgsm").description
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(fgsm, name="fgsm")
    pm.check_pending()
    via_hook = Registry("perturbation")
    pm.hook.register_perturbations(register=lambda cls: via_hook.add(cls, "fgsm"))
    assert via_hook.names() == ["fgsm"]
