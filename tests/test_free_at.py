"""Tests of plugins/free_at.py: the ``free`` perturbation against FreeAT's update formulas.

FreeAT's δ update needs no model: ``after_backward`` is fed a fixed gradient, and what the next
``generate`` returns is compared with ``project(x + δ)`` for the δ the formula predicts.
"""

from __future__ import annotations

import copy
import math

import pluggy
import pytest
import torch
import toy
from artplug_plugins import free_at
from artplug_plugins.free_at import FreeAT
from pydantic import ValidationError
from torch import Tensor

import artplug
import artplug.hookspecs
from artplug.engine import build, train_step
from artplug.errors import RecipeError
from artplug.kinds import Progress
from artplug.recipe import resolve
from artplug.registry import Registry
from artplug.testing import digits_recipe

SHAPE = (2, 3, 3)
MODEL = toy.linear_model(SHAPE)  # generate runs no forward; any module will do


def batch(n: int = 8, seed: int = 1, low: float = 0.0, high: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, *SHAPE, generator=gen, dtype=torch.float64)


def grad_like(x: Tensor, seed: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=x.dtype)


def state(eps: float, norm: str = "linf") -> artplug.StepState:
    return artplug.StepState(
        progress=Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100),
        knobs={},
        model=MODEL,
        threat=artplug.Threat(norm, eps),  # type: ignore[arg-type]
    )


def free(**params: object) -> FreeAT:
    return FreeAT(FreeAT.Params(**params))


def labels(x: Tensor) -> Tensor:
    return torch.zeros(len(x), dtype=torch.long)


def generate(technique: FreeAT, x: Tensor, s: artplug.StepState) -> Tensor:
    return technique.generate(MODEL, x, labels(x), s)


def unit_l2(g: Tensor) -> Tensor:
    return g / g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))


# ---------------------------------------------------------------- generate / after_backward


def test_first_batch_is_clean_and_the_result_is_a_fresh_detached_leaf() -> None:
    x = batch()
    out = generate(free(), x, state(0.1))
    assert torch.equal(out, x)
    assert not out.requires_grad and out.is_leaf
    # The engine sets requires_grad on the result: that must not reach the batch itself.
    out.requires_grad_(True)
    assert not x.requires_grad
    assert out.data_ptr() != x.data_ptr()
    again = generate(free(), x, state(0.1))
    assert again is not out and not again.requires_grad


@pytest.mark.parametrize("step_size", [None, 0.03])
def test_delta_carries_over_to_the_next_minibatch(step_size: float | None) -> None:
    eps = 0.1
    s = state(eps)
    technique = free(step_size=step_size)
    x1, x2 = batch(seed=1), batch(seed=5)
    generate(technique, x1, s)
    g = grad_like(x1)
    technique.after_backward(g, s)
    out = generate(technique, x2, s)
    step = eps if step_size is None else step_size  # FreeAT: the δ step is eps by default
    expected = artplug.project(x2 + step * g.sign(), x2, s.threat)
    assert torch.equal(out, expected)


def test_repeated_updates_accumulate_and_are_clipped_at_eps() -> None:
    eps = 0.05
    s = state(eps)
    technique = free(step_size=0.4 * eps)
    x = batch(low=0.3, high=0.7)  # the [0, 1] box never clips: out - x is δ itself
    g = grad_like(x)
    generate(technique, x, s)
    observed = []
    for _ in range(3):
        technique.after_backward(g, s)
        observed.append(generate(technique, x, s) - x)
    for delta, size in zip(observed, (0.4 * eps, 0.8 * eps, eps), strict=True):
        torch.testing.assert_close(delta, size * g.sign())
    technique.after_backward(-g, s)  # from the clip at eps one step back: 0.6 eps
    torch.testing.assert_close(generate(technique, x, s) - x, 0.6 * eps * g.sign())


def test_l2_updates_are_normalised_and_kept_in_the_ball() -> None:
    eps = 0.5
    s = state(eps, "l2")
    technique = free(step_size=0.4 * eps)
    x = batch(low=0.3, high=0.7)
    g = grad_like(x)
    generate(technique, x, s)
    technique.after_backward(g, s)
    torch.testing.assert_close(generate(technique, x, s) - x, 0.4 * eps * unit_l2(g))
    technique.after_backward(g, s)
    technique.after_backward(g, s)  # 1.2 eps along g: rescaled onto the sphere
    delta = generate(technique, x, s) - x
    torch.testing.assert_close(delta, eps * unit_l2(g))
    norms = delta.flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-9).all()


def test_default_step_follows_the_steps_threat_under_an_eps_warmup() -> None:
    technique = free()
    x = batch(low=0.3, high=0.7)
    g = grad_like(x)
    small = state(0.1).threat.scaled(0.25)
    s = artplug.StepState(state(0.1).progress, {}, MODEL, small)
    generate(technique, x, s)
    technique.after_backward(g, s)
    torch.testing.assert_close(generate(technique, x, s) - x, 0.025 * g.sign())


def test_a_smaller_last_batch_uses_and_updates_only_the_first_rows() -> None:
    eps = 0.1
    s = state(eps)
    technique = free()
    big, small = batch(8, seed=1), batch(3, seed=9)
    generate(technique, big, s)
    g_big = grad_like(big)
    technique.after_backward(g_big, s)
    delta = eps * g_big.sign()
    out = generate(technique, small, s)
    assert out.shape == small.shape
    assert torch.equal(out, artplug.project(small + delta[:3], small, s.threat))
    g_small = grad_like(small, seed=4)
    technique.after_backward(g_small, s)
    delta[:3] = (delta[:3] + eps * g_small.sign()).clamp(-eps, eps)
    assert torch.equal(generate(technique, big, s), artplug.project(big + delta, big, s.threat))


def test_a_larger_batch_or_another_shape_starts_its_new_rows_at_zero() -> None:
    eps = 0.1
    s = state(eps)
    technique = free()
    small = batch(3, low=0.3, high=0.7)
    generate(technique, small, s)
    g = grad_like(small)
    technique.after_backward(g, s)
    big = batch(5, low=0.3, high=0.7)
    delta = generate(technique, big, s) - big
    torch.testing.assert_close(delta[:3], eps * g.sign())
    assert torch.equal(delta[3:], torch.zeros_like(delta[3:]))
    other = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    assert torch.equal(generate(technique, other, s), other)


def test_missing_or_non_finite_gradient_leaves_delta_unchanged() -> None:
    s = state(0.1)
    technique = free()
    x = batch(low=0.3, high=0.7)
    g = grad_like(x)
    generate(technique, x, s)
    technique.after_backward(g, s)
    before = generate(technique, x, s)
    technique.after_backward(None, s)  # no loss term used the adversarial forward
    bad = g.clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[1, 0, 0, 0] = float("inf")
    technique.after_backward(bad, s)  # an fp16 overflow step (the scaler skips it)
    assert torch.equal(generate(technique, x, s), before)


def test_state_dict_round_trip_reproduces_the_next_generate() -> None:
    s = state(0.1)
    technique = free(step_size=0.03)
    assert technique.state_dict() == {"delta": None}
    x1, x2 = batch(seed=1), batch(seed=3)
    generate(technique, x1, s)
    technique.after_backward(grad_like(x1), s)
    generate(technique, x1, s)
    technique.after_backward(grad_like(x1, seed=7), s)
    saved = copy.deepcopy(technique.state_dict())
    assert saved["delta"].device.type == "cpu"
    restored = free(step_size=0.03)
    restored.load_state_dict(saved)
    assert torch.equal(restored.generate(MODEL, x2, labels(x2), s), generate(technique, x2, s))
    # The state dict is a copy: later updates do not change what was saved.
    snapshot = saved["delta"].clone()
    technique.after_backward(grad_like(x2, seed=8), s)
    assert not torch.equal(technique.state_dict()["delta"], snapshot)
    assert torch.equal(saved["delta"], snapshot)
    # An empty state (checkpoint before the first batch) means δ = 0.
    empty = free()
    empty.load_state_dict({"delta": None})
    assert torch.equal(generate(empty, x2, s), x2)


def test_restored_delta_moves_to_the_batch_dtype() -> None:
    s = state(0.1)
    technique = free()
    technique.load_state_dict({"delta": torch.full((8, *SHAPE), 0.05, dtype=torch.float32)})
    x = batch(low=0.3, high=0.7)
    out = generate(technique, x, s)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out - x, torch.full_like(x, 0.05))


def test_replays_follow_params_including_the_engines_params_swap() -> None:
    assert FreeAT.Params().replays == 8 and FreeAT.Params().step_size is None
    assert FreeAT.replays == 8  # on the class: the default (registry and contract checks)
    technique = free(replays=3)
    assert technique.replays == 3
    # The engine's knob update: the float knob 5.0 is coerced and validated into the int 5.
    from artplug.engine import _update_params

    _update_params(technique, {"replays": 5.0})
    assert technique.replays == 5 and isinstance(technique.replays, int)


def test_params_validation() -> None:
    for bad in ({"replays": 0}, {"step_size": 0.0}, {"step_size": -0.1}, {"replay": 4}):
        with pytest.raises(ValidationError):
            FreeAT.Params(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- recipe checks


def view(losses: tuple[str, ...], model_mode: str = "eval") -> artplug.RecipeView:
    return artplug.RecipeView(
        transforms=(),
        perturbation="free",
        losses=losses,
        schedules=(),
        threat=artplug.Threat("linf", 0.1),
        model_mode=model_mode,
    )


def test_check_recipe_rejects_trades_only() -> None:
    params = FreeAT.Params()
    assert list(FreeAT.check_recipe(params, view(("cross-entropy",)))) == []
    assert list(FreeAT.check_recipe(params, view(("he-margin",), "train"))) == []
    (reason,) = FreeAT.check_recipe(params, view(("cross-entropy", "trades")))
    assert "trades" in reason and "attack" in reason


def test_recipe_with_free_and_trades_is_rejected(plugin_set) -> None:
    if "trades" not in plugin_set.registries.loss:
        pytest.skip("the trades loss term is not registered yet")
    raw = digits_recipe(perturbation={"use": "free"}, loss=[{"use": "trades"}])
    reason = r"perturbation \(free\): cannot be combined with the trades loss"
    with pytest.raises(RecipeError, match=reason):
        resolve(raw, plugin_set.registries)


# ---------------------------------------------------------------- engine


def test_engine_replays_each_minibatch_and_updates_delta_every_replay(
    plugin_set, monkeypatch
) -> None:
    replays = 3
    raw = digits_recipe(perturbation={"use": "free", "replays": replays})
    c = build(resolve(raw, plugin_set.registries))
    technique = c.perturbation
    assert isinstance(technique, FreeAT)
    steps: list[int] = []
    deltas: list[Tensor] = []
    optimizer_step = c.optimizer.step
    after_backward = technique.after_backward

    def counting_step() -> None:
        steps.append(1)
        optimizer_step()

    def recording_after_backward(grad: Tensor | None, s: artplug.StepState) -> None:
        assert grad is not None and grad.shape == x.shape
        after_backward(grad, s)
        deltas.append(technique.state_dict()["delta"])

    monkeypatch.setattr(c.optimizer, "step", counting_step)
    monkeypatch.setattr(technique, "after_backward", recording_after_backward)
    x, y = next(iter(c.train_loader))
    train_step(c, x, y, Progress(0, 0, len(c.train_loader), len(c.train_loader)))
    assert len(steps) == replays
    assert len(deltas) == replays
    eps = c.threat.eps
    previous = torch.zeros_like(deltas[0])
    for delta in deltas:
        assert not torch.equal(delta, previous)  # every replay moved δ ...
        assert delta.abs().max() <= eps + 1e-6  # ... and kept it in the ball
        previous = delta
    assert deltas[-1].abs().sum() > 0
    # After the first step of eps from 0, every pixel of δ sits at ±eps or was not moved.
    first = deltas[0].abs()
    assert torch.all((first == 0) | torch.isclose(first, torch.tensor(eps)))
    assert not x.requires_grad
    assert math.isfinite(float(deltas[-1].sum()))


# ---------------------------------------------------------------- registration


def test_registration_through_pluggy() -> None:
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(free_at, name="free_at")
    pm.check_pending()
    registry = Registry("perturbation")
    pm.hook.register_perturbations(register=lambda cls: registry.add(cls, "free_at"))
    assert registry.names() == ["free"]
    assert registry.get("free").description.startswith("FreeAT")
