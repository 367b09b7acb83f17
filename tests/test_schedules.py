"""Tests of plugins/schedules.py: exact values at chosen points, purity, validation."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pluggy
import pytest
from artplug_plugins import schedules
from artplug_plugins.schedules import CosineLR, CyclicLR, LinearEpsWarmup, PiecewiseLR
from pydantic import ValidationError

import artplug
import artplug.hookspecs
from artplug.registry import Registry

ALL: list[type[Any]] = [PiecewiseLR, CosineLR, CyclicLR, LinearEpsWarmup]


def at(step: int, steps_per_epoch: int = 10, total_steps: int = 100) -> artplug.Progress:
    return artplug.Progress(
        epoch=step // steps_per_epoch,
        step=step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )


def make(cls: type[Any], **params: Any) -> Any:
    return cls(cls.Params(**params))


def lr(schedule: Any, progress: artplug.Progress) -> float:
    return schedule.values(progress)["lr_scale"]


# ---------------------------------------------------------------- piecewise-lr


def test_piecewise_default_is_bag_of_tricks_decay_at_epochs_100_and_105() -> None:
    s = make(PiecewiseLR)
    assert s.params.milestones == [100.0, 105.0] and s.params.factor == 0.1
    total = 110 * 10
    assert lr(s, at(0, total_steps=total)) == 1.0
    assert lr(s, at(999, total_steps=total)) == 1.0  # epoch 99.9
    assert lr(s, at(1000, total_steps=total)) == pytest.approx(0.1)  # epoch 100.0
    assert lr(s, at(1049, total_steps=total)) == pytest.approx(0.1)  # epoch 104.9
    assert lr(s, at(1050, total_steps=total)) == pytest.approx(0.01)  # epoch 105.0
    assert lr(s, at(1099, total_steps=total)) == pytest.approx(0.01)


def test_piecewise_uses_the_fractional_epoch() -> None:
    s = make(PiecewiseLR, milestones=[0.5, 1.5], factor=0.5)
    assert [lr(s, at(step)) for step in (0, 4, 5, 14, 15, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert lr(make(PiecewiseLR, milestones=[]), at(50)) == 1.0


# ---------------------------------------------------------------- cosine-lr


def test_cosine_with_warmup() -> None:
    s = make(CosineLR, warmup_epochs=2.0, final_scale=0.1)
    assert lr(s, at(0)) == 0.0
    assert lr(s, at(10)) == pytest.approx(0.5)  # half of the warm-up (epoch 1 of 2)
    assert lr(s, at(20)) == pytest.approx(1.0)  # warm-up ends: cosine starts at 1
    assert lr(s, at(60)) == pytest.approx(0.55)  # cosine mid-point: (1 + 0.1) / 2
    assert lr(s, at(100)) == pytest.approx(0.1)  # end of training
    t = (99 - 20) / 80
    assert lr(s, at(99)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def test_cosine_without_warmup_and_with_warmup_covering_the_run() -> None:
    s = make(CosineLR)
    assert lr(s, at(0)) == 1.0
    assert lr(s, at(25)) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr(s, at(50)) == pytest.approx(0.5)
    assert lr(s, at(100)) == pytest.approx(0.0, abs=1e-12)
    whole = make(CosineLR, warmup_epochs=10.0)  # 10 epochs x 10 steps = the whole run
    assert lr(whole, at(50)) == pytest.approx(0.5)
    assert lr(whole, at(100)) == 1.0


def test_cosine_is_continuous_and_non_increasing_after_warmup() -> None:
    s = make(CosineLR, warmup_epochs=0.55, final_scale=0.0)  # fractional warm-up in steps
    scales = [lr(s, at(step)) for step in range(101)]
    assert scales[0] == 0.0
    assert max(scales) <= 1.0
    after = scales[6:]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after))


# ---------------------------------------------------------------- cyclic-lr


def test_cyclic_default_is_fastat_triangle() -> None:
    s = make(CyclicLR)
    assert [lr(s, at(step)) for step in (0, 25, 50, 75, 100)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.5, 0.0]
    )


def test_cyclic_with_early_peak_and_nonzero_ends() -> None:
    s = make(CyclicLR, peak_at=0.4, start_scale=0.2, end_scale=0.1)
    assert lr(s, at(0)) == pytest.approx(0.2)
    assert lr(s, at(20)) == pytest.approx(0.6)  # half-way up
    assert lr(s, at(40)) == pytest.approx(1.0)
    assert lr(s, at(70)) == pytest.approx(0.55)  # half-way down
    assert lr(s, at(100)) == pytest.approx(0.1)


# ---------------------------------------------------------------- linear-eps-warmup


def test_eps_warmup_values() -> None:
    s = make(LinearEpsWarmup)
    assert (s.params.warmup_epochs, s.params.start_scale) == (5.0, 0.0)

    def eps(schedule: Any, step: int) -> float:
        return schedule.values(at(step))["threat.eps_scale"]

    assert eps(s, 0) == 0.0
    assert eps(s, 25) == pytest.approx(0.5)  # epoch 2.5 of 5
    assert eps(s, 50) == 1.0
    assert eps(s, 70) == 1.0
    started = make(LinearEpsWarmup, warmup_epochs=2.0, start_scale=0.2)
    assert eps(started, 0) == pytest.approx(0.2)
    assert eps(started, 10) == pytest.approx(0.6)
    assert eps(started, 20) == 1.0


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize("cls", ALL)
def test_values_are_a_pure_function_of_progress_with_exactly_the_knobs(cls: type[Any]) -> None:
    s = make(cls)
    points = [at(step, steps_per_epoch=7, total_steps=1000) for step in range(0, 1001, 37)]
    forward = [s.values(p) for p in points]
    shuffled = list(range(len(points)))
    random.Random(0).shuffle(shuffled)
    again = {i: s.values(points[i]) for i in shuffled}
    assert forward == [again[i] for i in range(len(points))]
    assert all(set(v) == set(s.knobs()) for v in forward)
    assert all(isinstance(x, float) and math.isfinite(x) for v in forward for x in v.values())


def test_knob_names() -> None:
    for cls in (PiecewiseLR, CosineLR):
        assert make(cls).knobs() == frozenset({"lr_scale"})
    # cyclic-lr also cycles the momentum, as torch's CyclicLR does by default.
    assert make(CyclicLR).knobs() == frozenset({"lr_scale", "momentum"})
    assert make(CyclicLR, cycle_momentum=False).knobs() == frozenset({"lr_scale"})
    assert make(LinearEpsWarmup).knobs() == frozenset({"threat.eps_scale"})


@pytest.mark.parametrize(
    "cls, bad",
    [
        (PiecewiseLR, {"milestones": [105.0, 100.0]}),
        (PiecewiseLR, {"milestones": [100.0, 100.0]}),
        (PiecewiseLR, {"milestones": [-1.0, 5.0]}),
        (PiecewiseLR, {"factor": 0.0}),
        (PiecewiseLR, {"factor": 10.0}),
        (CosineLR, {"warmup_epochs": -1.0}),
        (CosineLR, {"final_scale": 1.5}),
        (CyclicLR, {"peak_at": 0.0}),
        (CyclicLR, {"peak_at": 1.0}),
        (CyclicLR, {"peak_at": 1.2}),
        (CyclicLR, {"start_scale": -0.1}),
        (LinearEpsWarmup, {"warmup_epochs": 0.0}),
        (LinearEpsWarmup, {"warmup_epochs": -2.0}),
        (LinearEpsWarmup, {"start_scale": 1.5}),
        (LinearEpsWarmup, {"warmup": 5.0}),
    ],
)
def test_invalid_params_are_rejected(cls: type[Any], bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        cls.Params(**bad)


def test_milestone_message_is_clear() -> None:
    with pytest.raises(ValidationError, match="strictly increasing"):
        PiecewiseLR.Params(milestones=[105.0, 100.0])


@pytest.mark.parametrize("cls", ALL)
def test_registry_accepts_the_class_shape(cls: type[Any]) -> None:
    registry = Registry("schedule")
    registry.add(cls, plugin="test")
    assert registry.get(cls.name).description


def test_hookimpl_registers_all_schedules() -> None:
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(schedules, name="schedules")
    pm.check_pending()
    registry = Registry("schedule")
    pm.hook.register_schedules(register=lambda cls: registry.add(cls, "schedules"))
    assert registry.names() == ["cosine-lr", "cyclic-lr", "linear-eps-warmup", "piecewise-lr"]
