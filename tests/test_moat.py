"""Tests of plugins/moat.py: the ``moat`` stages against their formulas, and ``moat-stages``.

The attacks run on the toy linear model, whose cross-entropy input gradient has a closed form
(``toy.ce_input_grad``), and are compared with independent loops written here.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pluggy
import pytest
import torch
import toy
from artplug_plugins import moat
from artplug_plugins.moat import MOAT, MOATStages
from pydantic import ValidationError
from torch import Tensor, nn
from toy import ce_input_grad

import artplug
import artplug.hookspecs
from artplug.engine import build, fit
from artplug.errors import RecipeError
from artplug.recipe import resolve
from artplug.registry import Registry
from artplug.testing import digits_recipe

SHAPE = (2, 3, 3)


class Counting(nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.inner(x)


def linear_model(classes: int = 4) -> nn.Module:
    return toy.linear_model(SHAPE, classes)


def batch(n: int = 8, classes: int = 4) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, *SHAPE, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=gen)


def state(model: nn.Module, eps: float, norm: str = "linf") -> artplug.StepState:
    return artplug.StepState(
        progress=artplug.Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100),
        knobs={},
        model=model,
        threat=artplug.Threat(norm, eps),  # type: ignore[arg-type]
    )


def make(**params: Any) -> MOAT:
    return MOAT(MOAT.Params(**params))


def ascent(grad: Tensor, size: float, norm: str) -> Tensor:
    """Steepest ascent written out: sign for L-inf, per-example unit L2 direction for L2."""
    if norm == "linf":
        return size * grad.sign()
    return size * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def reference_attack(
    model: nn.Module, x: Tensor, y: Tensor, threat: artplug.Threat, steps: int, size: float
) -> Tensor:
    """Uniform random start, then ``steps`` projected ascent steps on the closed-form gradient."""
    x_adv = artplug.random_start(x, threat)
    for _ in range(steps):
        x_adv = artplug.project(
            x_adv + ascent(ce_input_grad(model, x_adv, y), size, threat.norm), x, threat
        )
    return x_adv


# ---------------------------------------------------------------- the perturbation


def test_stage_0_returns_the_clean_batch_without_a_forward_pass() -> None:
    model = Counting(linear_model())
    x, y = batch()
    out = make(stage=0).generate(model, x, y, state(model, 0.1))
    assert torch.equal(out, x) and not out.requires_grad
    assert model.calls == 0


@pytest.mark.parametrize("step_size", [None, 0.07])
def test_stage_1_is_fgsm_from_the_seeded_uniform_start(step_size: float | None) -> None:
    model = linear_model()
    x, y = batch()
    eps = 0.1
    s = state(model, eps)
    torch.manual_seed(11)
    out = make(stage=1, single_step_size=step_size).generate(model, x, y, s)
    torch.manual_seed(11)
    x0 = artplug.random_start(x, s.threat)
    assert not torch.equal(x0, x)
    alpha = 1.25 * eps if step_size is None else step_size
    expected = artplug.project(x0 + alpha * ce_input_grad(model, x0, y).sign(), x, s.threat)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_stage_2_is_k_pgd_steps_of_eps_over_4(norm: str, eps: float) -> None:
    model = Counting(linear_model())
    x, y = batch()
    s = state(model, eps, norm)
    torch.manual_seed(5)
    out = make(stage=2, multi_steps=6).generate(model, x, y, s)
    assert model.calls == 6
    torch.manual_seed(5)
    expected = reference_attack(model.inner, x, y, s.threat, steps=6, size=eps / 4)
    torch.testing.assert_close(out, expected)
    assert not out.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_stage_2_defaults_and_explicit_step() -> None:
    assert (MOAT.Params().stage, MOAT.Params().multi_steps) == (2, 10)
    model = linear_model()
    x, y = batch()
    s = state(model, 0.2)
    torch.manual_seed(3)
    out = make(multi_steps=3, multi_step_size=0.01).generate(model, x, y, s)
    torch.manual_seed(3)
    expected = reference_attack(model, x, y, s.threat, steps=3, size=0.01)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("fraction, n, clean_rows", [(0.25, 8, 2), (0.3, 10, 3), (0.05, 8, 0)])
def test_clean_fraction_keeps_the_first_rows_clean(
    stage: int, fraction: float, n: int, clean_rows: int
) -> None:
    assert clean_rows == math.floor(fraction * n)
    model = linear_model()
    x, y = batch(n)
    s = state(model, 0.1)
    torch.manual_seed(9)
    out = make(stage=stage, multi_steps=2, clean_fraction=fraction).generate(model, x, y, s)
    assert torch.equal(out[:clean_rows], x[:clean_rows])
    # The other rows are the attack of those rows alone, from the same seeded start.
    torch.manual_seed(9)
    steps, size = (1, 1.25 * 0.1) if stage == 1 else (2, 0.1 / 4)
    rest = reference_attack(model, x[clean_rows:], y[clean_rows:], s.threat, steps, size)
    torch.testing.assert_close(out[clean_rows:], rest)
    assert not torch.equal(out[clean_rows:], x[clean_rows:])


def test_stage_is_read_at_call_time_from_a_float_knob() -> None:
    model = Counting(linear_model())
    x, y = batch()
    s = state(model, 0.1)
    technique = make()
    technique.params = technique.params.model_copy(update={"stage": 0.0})
    assert torch.equal(technique.generate(model, x, y, s), x)
    technique.params = technique.params.model_copy(update={"stage": 1.0})
    technique.generate(model, x, y, s)
    assert model.calls == 1  # single step: one forward


def test_zero_eps_returns_x() -> None:
    model = linear_model()
    x, y = batch()
    assert torch.equal(make(stage=2).generate(model, x, y, state(model, 0.0)), x)


@pytest.mark.parametrize(
    "bad",
    [
        {"stage": 3},
        {"stage": -1},
        {"single_step_size": 0.0},
        {"multi_steps": 0},
        {"multi_step_size": -1.0},
        {"clean_fraction": 1.0},
        {"clean_fraction": -0.1},
        {"steps": 10},
    ],
)
def test_perturbation_params_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        MOAT.Params(**bad)


# ---------------------------------------------------------------- the schedule


def stages(schedule: MOATStages, steps: list[int], per_epoch: int = 10) -> list[float]:
    total = 100 * per_epoch
    return [
        schedule.values(artplug.Progress(s // per_epoch, s, per_epoch, total))["perturbation.stage"]
        for s in steps
    ]


def test_default_cycle_is_1_clean_3_single_1_multi_epochs() -> None:
    schedule = MOATStages(MOATStages.Params())
    p = schedule.params
    assert (p.clean_epochs, p.single_step_epochs, p.multi_step_epochs) == (1.0, 3.0, 1.0)
    assert p.order == ["clean", "single", "multi"]
    # epoch_float = step / 10; boundaries belong to the later stage; the cycle is 5 epochs.
    points = [0, 9, 10, 39, 40, 49, 50, 59, 60, 90, 100, 105]
    assert stages(schedule, points) == [0, 0, 1, 1, 2, 2, 0, 0, 1, 2, 0, 0]


def test_custom_order_lengths_and_a_skipped_stage() -> None:
    schedule = MOATStages(
        MOATStages.Params(
            clean_epochs=1.0,
            single_step_epochs=2.0,
            multi_step_epochs=0.5,
            order=["multi", "clean", "single"],
        )
    )
    # cycle 3.5: [0, 0.5) multi, [0.5, 1.5) clean, [1.5, 3.5) single
    points = [0, 4, 5, 14, 15, 34, 35, 39, 40]
    assert stages(schedule, points) == [2, 2, 0, 0, 1, 1, 2, 2, 0]
    no_clean = MOATStages(MOATStages.Params(clean_epochs=0.0))
    assert stages(no_clean, [0, 29, 30, 39, 40]) == [1, 1, 2, 2, 1]


def test_fractional_boundaries_are_exact() -> None:
    # 0.1 + 0.2 != 0.3 in floats; the boundary must still fall at epoch 0.3 exactly.
    schedule = MOATStages(
        MOATStages.Params(clean_epochs=0.1, single_step_epochs=0.2, multi_step_epochs=0.3)
    )
    assert stages(schedule, [0, 1, 2, 3, 5, 6, 7, 8, 9]) == [0, 1, 1, 2, 2, 0, 1, 1, 2]
    assert schedule.stage_at(0.3) == 2 and schedule.stage_at(0.6) == 0


def test_schedule_is_pure_and_sets_only_the_stage_knob() -> None:
    schedule = MOATStages(MOATStages.Params())
    assert schedule.knobs() == frozenset({"perturbation.stage"})
    points = [artplug.Progress(s // 7, s, 7, 700) for s in range(0, 700, 3)]
    forward = [schedule.values(p) for p in points]
    order = list(range(len(points)))
    random.Random(0).shuffle(order)
    other = MOATStages(MOATStages.Params())
    assert all(other.values(points[i]) == forward[i] for i in order)
    for values in forward:
        assert set(values) == {"perturbation.stage"}
        assert isinstance(values["perturbation.stage"], float)
        assert values["perturbation.stage"] in (0.0, 1.0, 2.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"order": ["clean", "clean", "multi"]},
        {"order": ["clean", "single"]},
        {"order": ["clean", "single", "multi", "clean"]},
        {"order": ["clean", "single", "pgd"]},
        {"clean_epochs": -1.0},
        {"clean_epochs": 0.0, "single_step_epochs": 0.0, "multi_step_epochs": 0.0},
        {"multi_step_epochs": float("inf")},
        {"epochs": 3.0},
    ],
)
def test_schedule_params_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        MOATStages.Params(**bad)


def test_permutation_message_is_clear() -> None:
    with pytest.raises(ValidationError, match="exactly once"):
        MOATStages.Params(order=["clean", "clean", "multi"])


# ---------------------------------------------------------------- recipes and the engine


def test_check_recipe_needs_the_moat_perturbation(plugin_set) -> None:
    view = artplug.RecipeView(
        transforms=(),
        perturbation="pgd",
        losses=("cross-entropy",),
        schedules=("moat-stages",),
        threat=artplug.Threat("linf", 0.1),
    )
    (reason,) = MOATStages.check_recipe(MOATStages.Params(), view)
    assert reason == (
        'moat-stages switches the moat perturbation\'s stage; set [perturbation] use = "moat"'
    )
    raw = digits_recipe(schedule=[{"use": "moat-stages"}])  # perturbation: pgd
    with pytest.raises(RecipeError, match=r"schedule\[0\] \(moat-stages\): moat-stages switches"):
        resolve(raw, plugin_set.registries)


def test_two_engine_steps_with_moat_and_its_schedule(plugin_set, tmp_path) -> None:
    raw = digits_recipe(
        perturbation={"use": "moat", "multi_steps": 2, "clean_fraction": 0.25},
        loss=[{"use": "cross-entropy"}],
        schedule=[{"use": "moat-stages", "order": ["single", "multi", "clean"]}],
    )
    c = build(resolve(raw, plugin_set.registries))
    result = fit(c, run_dir=tmp_path / "x", max_steps=2)
    assert isinstance(c.perturbation, MOAT)
    assert c.perturbation.params.stage == 1  # the knob replaced the default stage 2
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    knob_values = [json.loads(line).get("knob/perturbation.stage") for line in lines]
    assert [v for v in knob_values if v is not None] == [1.0, 1.0]
    assert math.isfinite(result.history[-1]["epoch/train_loss"])


def test_registration_through_pluggy() -> None:
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(moat, name="moat")
    pm.check_pending()
    perturbations, schedules = Registry("perturbation"), Registry("schedule")
    pm.hook.register_perturbations(register=lambda cls: perturbations.add(cls, "moat"))
    pm.hook.register_schedules(register=lambda cls: schedules.add(cls, "moat"))
    assert perturbations.names() == ["moat"] and schedules.names() == ["moat-stages"]
    assert perturbations.get("moat").description.startswith("MOAT")
