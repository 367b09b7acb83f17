"""Tests of plugins/moat.py: the ``moat`` stages against their formulas, and ``moat-stages``.

The attacks run on the toy linear model, whose cross-entropy input gradient has a closed form
(``toy.ce_input_grad``), and are compared with independent loops written here.
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from typing import Any

import pluggy
import pytest
import torch
import toy
from artplug_plugins import moat
from artplug_plugins.moat import MOAT, MOATStages
from artplug_plugins.slat import LatentSites, Slat, latent_sites
from artplug_plugins.spat import SPAT
from pydantic import ValidationError
from torch import Tensor, nn
from toy import ce_input_grad

import artplug
import artplug.hookspecs
import artplug.testing
from artplug.engine import build, train_step
from artplug.errors import RecipeError
from artplug.phase import running
from artplug.recipe import resolve
from artplug.registry import Registry
from artplug.testing import check_perturbation, digits_recipe, tiny_batch, tiny_model
from artplug.workflows import train_and_evaluate

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
    from artplug.engine import _update_params  # validated, as the engine does

    _update_params(technique, {"stage": 0.0})
    assert torch.equal(technique.generate(model, x, y, s), x)
    from artplug.engine import _update_params  # validated, as the engine does

    _update_params(technique, {"stage": 1.0})
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
        {"single_attack": "fgsm"},
        {"multi_attack": "apgd"},
    ],
)
def test_perturbation_params_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        MOAT.Params(**bad)


# ---------------------------------------------------------------- delegated stages (SLAT, SPAT)


def sited_model() -> nn.Module:
    """The digits small-cnn with SLAT's default sites (layer1, layer2), in eval mode."""
    model = LatentSites(LatentSites.Params()).apply(tiny_model())
    return model.eval()


def deltas(model: nn.Module) -> list[Tensor | None]:
    return [None if s.delta is None else s.delta.clone() for s in latent_sites(model)]


def test_stage_1_with_slat_is_slat_called_directly() -> None:
    model = sited_model()
    x, y = tiny_batch()
    s = state(model, 0.1)
    sub = {"alpha": 0.7, "latent_eps": 0.05, "latent_multiplier": 0.5}
    torch.manual_seed(4)
    out = make(stage=1, single_attack="slat", slat=sub).generate(model, x, y, s)
    moat_deltas = deltas(model)
    torch.manual_seed(4)
    expected = Slat(Slat.Params(**sub)).generate(model, x, y, s)
    assert torch.equal(out, expected) and not out.requires_grad
    assert len(moat_deltas) == 2
    for got, want in zip(moat_deltas, deltas(model), strict=True):
        assert got is not None and want is not None and torch.equal(got, want)
        # min(0.5, 1) * 0.05 * sign(g): the sub-table's parameters reached SLAT.
        assert torch.all((got == 0) | ((got.abs() - 0.025).abs() < 1e-7))
    # SLAT has no random start: its input step is alpha * eps * sign(g) from x itself, which
    # FGSM-RS (the default single attack, from a random point, step 1.25 eps) is not.
    assert torch.allclose((out - x).abs().amax(), torch.tensor(0.07))
    torch.manual_seed(4)
    fgsm_rs = make(stage=1).generate(model, x, y, s)
    assert not torch.equal(fgsm_rs, out)
    assert all(site.delta is None for site in latent_sites(model))


def test_slat_stage_takes_latent_steps_at_eps_0_as_slat_does() -> None:
    model = sited_model()
    x, y = tiny_batch()
    out = make(stage=1, single_attack="slat").generate(model, x, y, state(model, 0.0))
    assert torch.equal(out, x)
    assert all(site.delta is not None for site in latent_sites(model))


def test_slat_stage_with_a_clean_fraction_gives_clean_rows_a_zero_latent_step() -> None:
    model = sited_model()
    x, y = tiny_batch(10)
    s = state(model, 0.1)
    out = make(stage=1, single_attack="slat", clean_fraction=0.3).generate(model, x, y, s)
    padded = deltas(model)
    assert torch.equal(out[:3], x[:3])
    # The attacked rows are SLAT on those rows alone (eval-mode BN: rows are independent).
    rest = Slat(Slat.Params()).generate(model, x[3:], y[3:], s)
    torch.testing.assert_close(out[3:], rest)
    for got, want in zip(padded, deltas(model), strict=True):
        assert got is not None and want is not None and got.shape[0] == 10
        assert torch.equal(got[:3], torch.zeros_like(got[:3]))
        torch.testing.assert_close(got[3:], want)
    for site, delta in zip(latent_sites(model), padded, strict=True):
        site.delta = delta
    # In the update forward the clean rows are exactly the unperturbed model's outputs, the
    # attacked rows are perturbed in latent space too.
    with running("update-adv"):
        update = model(out)
    plain = model(out)
    torch.testing.assert_close(update[:3], plain[:3], rtol=0, atol=0)
    assert not torch.allclose(update[3:], plain[3:])


@pytest.mark.parametrize("clean_fraction, clean_rows", [(0.0, 0), (0.25, 4)])
def test_stage_2_with_spat_is_spat_called_directly(clean_fraction: float, clean_rows: int) -> None:
    model = tiny_model().eval()
    x, y = tiny_batch()
    s = state(model, 0.1)
    sub = {"steps": 3, "reduce": "min", "mask_mode": "hard", "tau": 0.2}
    torch.manual_seed(8)
    out = make(multi_attack="spat", spat=sub, clean_fraction=clean_fraction).generate(
        model, x, y, s
    )
    torch.manual_seed(8)
    rest = SPAT(SPAT.Params(**sub)).generate(model, x[clean_rows:], y[clean_rows:], s)
    assert torch.equal(out[:clean_rows], x[:clean_rows])
    assert torch.equal(out[clean_rows:], rest) and not out.requires_grad
    # The sub-table mattered: SPAT with its defaults (or moat's PGD) is another attack.
    torch.manual_seed(8)
    pgd = make(clean_fraction=clean_fraction, multi_steps=3).generate(model, x, y, s)
    assert not torch.equal(pgd, out)


def test_spat_defaults_when_the_sub_table_is_left_out() -> None:
    model = tiny_model().eval()
    x, y = tiny_batch(6)
    s = state(model, 0.1)
    torch.manual_seed(2)
    out = make(multi_attack="spat").generate(model, x, y, s)
    torch.manual_seed(2)
    assert torch.equal(out, SPAT(SPAT.Params()).generate(model, x, y, s))


@pytest.mark.parametrize(
    "later",
    [
        {"stage": 0},
        {"stage": 2, "multi_steps": 1},
        {"stage": 2, "multi_attack": "spat", "spat": {"steps": 1}},
        {"stage": 1, "clean_fraction": 0.5},  # fgsm-rs: only a programmatic stack gets here
    ],
    ids=["clean", "pgd", "spat", "fgsm-rs"],
)
def test_other_stages_clear_the_latent_steps_of_an_earlier_slat_stage(
    later: dict[str, Any],
) -> None:
    model = sited_model()
    x, y = tiny_batch()
    s = state(model, 0.1)
    technique = make(stage=1, single_attack="slat")
    technique.generate(model, x, y, s)
    assert all(site.delta is not None for site in latent_sites(model))
    with running("update-adv"):
        stale = model(x)
    assert not torch.allclose(stale, model(x))  # a stored step perturbs the update forward
    update = {"single_attack": "fgsm-rs"} if later["stage"] == 1 else {}
    technique.params = MOAT.Params(**{**technique.params.model_dump(), **update, **later})
    x_next = technique.generate(model, x, y, s)
    assert all(site.delta is None for site in latent_sites(model))
    with running("update-adv"):
        update_logits = model(x_next)
    torch.testing.assert_close(update_logits, model(x_next), rtol=0, atol=0)


def test_engine_steps_through_slat_then_clean_leave_no_stale_step(plugin_set, tmp_path) -> None:
    raw = digits_recipe(
        transform=[{"use": "latent-sites"}],
        perturbation={"use": "moat", "single_attack": "slat", "model_mode": "train"},
    )
    c = build(resolve(raw, plugin_set.registries))
    x, y = c.data.train[0][:32].to(c.device), c.data.train[1][:32].to(c.device)
    progress = artplug.Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100)
    assert isinstance(c.perturbation, MOAT)
    c.perturbation.params = c.perturbation.params.model_copy(update={"stage": 1})
    train_step(c, x, y, progress)
    assert all(site.delta is not None for site in latent_sites(c.model))
    c.perturbation.params = c.perturbation.params.model_copy(update={"stage": 0})
    train_step(c, x, y, progress)
    assert all(site.delta is None for site in latent_sites(c.model))


@pytest.mark.parametrize(
    "params",
    [
        {"stage": 1, "single_attack": "slat"},
        {"stage": 1, "single_attack": "slat", "clean_fraction": 0.25},
        {"stage": 2, "multi_attack": "spat", "spat": {"steps": 2}},
        {"stage": 2, "multi_attack": "spat", "spat": {"steps": 2}, "clean_fraction": 0.25},
    ],
)
def test_delegated_stages_keep_the_perturbation_contract(
    monkeypatch: pytest.MonkeyPatch, params: dict[str, Any]
) -> None:
    plain = artplug.testing.tiny_model

    def with_sites(num_classes: int = 10, seed: int = 0) -> nn.Module:
        return LatentSites(LatentSites.Params()).apply(plain(num_classes, seed))

    monkeypatch.setattr(artplug.testing, "tiny_model", with_sites)
    check_perturbation(MOAT, params)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"slat": {"alpha": 0.5}}, "the slat sub-table is used only with single_attack = 'slat'"),
        ({"spat": {"steps": 2}}, "the spat sub-table is used only with multi_attack = 'spat'"),
        ({"single_attack": "slat", "single_step_size": 0.1}, "slat.alpha * eps"),
        ({"multi_attack": "spat", "multi_step_size": 0.1}, "spat = { step_size"),
        ({"single_attack": "slat", "slat": {"alpha": 0.0}}, "greater than 0"),
        ({"single_attack": "slat", "slat": {"steps": 2}}, "Extra inputs"),
        ({"multi_attack": "spat", "spat": {"loss": "kl", "random_start": False}}, "random_start"),
    ],
)
def test_sub_parameters_are_validated(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("*", r"\*").replace("{", r"\{")):
        MOAT.Params(**bad)


def view(
    *,
    transforms: tuple[str, ...] = (),
    losses: tuple[str, ...] = ("cross-entropy",),
    model_mode: str = "eval",
) -> artplug.RecipeView:
    return artplug.RecipeView(
        transforms=transforms,
        perturbation="moat",
        losses=losses,
        schedules=("moat-stages",),
        threat=artplug.Threat("linf", 0.1),
        model_mode=model_mode,
    )


def reasons(recipe: artplug.RecipeView, **params: Any) -> list[str]:
    return list(MOAT.check_recipe(MOAT.Params(**params), recipe))


def test_check_recipe_accepts_the_allowed_delegations() -> None:
    sites = ("latent-sites",)
    assert reasons(view()) == []
    assert reasons(view(transforms=sites), single_attack="slat") == []
    assert reasons(view(transforms=sites, losses=("he-margin",)), single_attack="slat") == []
    assert reasons(view(), multi_attack="spat") == []
    trades_kl = {"multi_attack": "spat", "spat": {"loss": "kl"}}
    assert reasons(view(losses=("trades",)), **trades_kl) == []
    # SLAT in train mode (the SLAT code) with the PGD stage is fine; only spat needs eval.
    assert reasons(view(transforms=sites, model_mode="train"), single_attack="slat") == []


def test_check_recipe_rejects_slat_without_sites_or_with_trades() -> None:
    (missing,) = reasons(view(), single_attack="slat")
    assert missing.startswith('single_attack = "slat" perturbs latent feature maps; add')
    assert 'use = "latent-sites"' in missing
    (trades,) = reasons(
        view(transforms=("latent-sites",), losses=("trades",)), single_attack="slat"
    )
    assert "cannot be combined with the trades loss" in trades
    assert 'single_attack = "fgsm-rs"' in trades


def test_check_recipe_rejects_sites_that_fgsm_rs_never_fills() -> None:
    (reason,) = reasons(view(transforms=("latent-sites",)))
    assert "latent-sites transform is filled only by the slat attack" in reason
    assert "single_attack = 'fgsm-rs' never runs it" in reason


def test_check_recipe_passes_on_spat_rules() -> None:
    (mode,) = reasons(view(model_mode="train"), multi_attack="spat")
    assert mode.startswith('multi_attack = "spat" (its parameters: the spat sub-table): ')
    assert 'spat needs [perturbation] model_mode = "eval"' in mode
    (trades,) = reasons(view(losses=("trades",)), multi_attack="spat")
    assert 'with the trades loss set loss = "kl"' in trades
    assert reasons(view(model_mode="train")) == []  # pgd has no such rule


def test_latent_sites_accepts_moat_as_the_perturbation() -> None:
    sites_view = view(transforms=("latent-sites",))
    assert list(LatentSites.check_recipe(LatentSites.Params(), sites_view)) == []
    fgsm = artplug.RecipeView(
        transforms=("latent-sites",),
        perturbation="fgsm",
        losses=("cross-entropy",),
        schedules=(),
        threat=artplug.Threat("linf", 0.1),
    )
    (reason,) = LatentSites.check_recipe(LatentSites.Params(), fgsm)
    assert "only acts through the slat perturbation" in reason and '"moat"' in reason


def test_resolved_recipe_with_sub_tables_round_trips(plugin_set) -> None:
    raw = digits_recipe(
        transform=[{"use": "latent-sites"}],
        perturbation={
            "use": "moat",
            "single_attack": "slat",
            "slat": {"alpha": 0.8},
            "multi_attack": "spat",
            "spat": {"steps": 3, "reduce": "min"},
        },
    )
    recipe = resolve(raw, plugin_set.registries, overrides=["perturbation.spat.gamma=2.0"])
    params = recipe.perturbation.params
    assert isinstance(params, MOAT.Params) and isinstance(params.slat, artplug.LatentStepParams)
    assert params.slat.alpha == 0.8 and params.spat is not None and params.spat["gamma"] == 2.0
    again = resolve(tomllib.loads(recipe.to_toml()), plugin_set.registries)
    assert again.perturbation.params == params


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
    result = train_and_evaluate(c, run_dir=tmp_path / "x", max_steps=2)
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
