"""Tests of plugins/trades.py: the ``trades-kl`` attack and the ``trades`` loss term.

The attack is checked against its formula on a linear model ``f(x) = W x + b``: with
``p = softmax(s f(x))`` fixed and ``q = softmax(s f(x'))``, the input gradient of
``Σ_i KL(p_i ‖ q_i)`` is ``s (q − p) W`` in closed form. The loss is compared with an
independent computation through ``F.cross_entropy`` and ``F.kl_div(..., "batchmean")``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pluggy
import pytest
import torch
import torch.nn.functional as F
import toy
from artplug_plugins import trades
from artplug_plugins.trades import TradesKL, TradesLoss
from pydantic import ValidationError
from torch import Tensor, nn
from toy import head

import artplug
import artplug.hookspecs
from artplug.engine import build
from artplug.errors import RecipeError
from artplug.recipe import EvalSection, resolve
from artplug.registry import Registry
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate

SHAPE = (2, 3, 3)  # C, H, W of the toy "images"
DIM = math.prod(SHAPE)
STEP_RATIO = 0.007 / 0.031


def linear_model(classes: int = 4, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The toy linear model on this file's input shape."""
    return toy.linear_model(SHAPE, classes, 0, dtype)


def batch(
    n: int = 8, low: float = 0.0, high: float = 1.0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = low + (high - low) * torch.rand(n, *SHAPE, generator=gen, dtype=dtype)
    return x, torch.randint(0, 4, (n,), generator=gen)


def step_state(model: nn.Module, eps: float, norm: str = "linf") -> artplug.StepState:
    return artplug.StepState(
        progress=artplug.Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100),
        knobs={},
        model=model,
        threat=artplug.Threat(norm, eps),  # type: ignore[arg-type]
    )


def attack(**params: object) -> TradesKL:
    return TradesKL(TradesKL.Params(**params))


def linear_probs(model: nn.Module, x: Tensor, scale: float = 1.0) -> Tensor:
    linear = head(model)
    with torch.no_grad():
        return torch.softmax(scale * (x.flatten(1) @ linear.weight.T + linear.bias), dim=1)


def kl_input_grad(model: nn.Module, x: Tensor, x_adv: Tensor, scale: float = 1.0) -> Tensor:
    """Closed form of ∇_{x'} Σ_i KL(softmax(s f(x_i)) ‖ softmax(s f(x'_i))) for the toy model."""
    p, q = linear_probs(model, x, scale), linear_probs(model, x_adv, scale)
    return (scale * (q - p) @ head(model).weight.detach()).view_as(x)


def per_example_kl(model: nn.Module, x: Tensor, x_adv: Tensor) -> Tensor:
    p, q = linear_probs(model, x), linear_probs(model, x_adv)
    return (p * (p.log() - q.log())).sum(dim=1)


def seeded_start(x: Tensor, threat: artplug.Threat, seed: int, std: float = 0.001) -> Tensor:
    """The start ``trades-kl`` draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return artplug.project(x + std * torch.randn_like(x), x, threat)


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner(x)


# ---------------------------------------------------------------- trades-kl against its formula


def test_closed_form_kl_gradient_matches_autograd() -> None:
    # The reference for the attack tests is itself checked against an independent autograd
    # computation through F.kl_div (sum reduction, as the TRADES code).
    model = linear_model()
    x, _ = batch()
    x_adv = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(
        0, 1
    )
    for scale in (1.0, 15.0):
        x_adv_var = x_adv.clone().requires_grad_(True)
        target = torch.softmax(scale * model(x), dim=1).detach()
        loss = F.kl_div(F.log_softmax(scale * model(x_adv_var), dim=1), target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv_var)
        torch.testing.assert_close(grad, kl_input_grad(model, x, x_adv, scale))


@pytest.mark.parametrize("dtype, noise", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_kl_gradient_at_x_is_only_round_off_hence_the_gaussian_start(
    dtype: torch.dtype, noise: float
) -> None:
    # In exact arithmetic the KL and its gradient vanish at x' = x; in floating point the
    # gradient is round-off, whose sign would steer a step. This is why TRADES starts from
    # x + 0.001 N(0, I) and why init_std must be positive.
    model = linear_model(dtype=dtype)
    x, _ = batch(dtype=dtype)
    with torch.no_grad():
        log_p = F.log_softmax(model(x), dim=1)

    def grad_at(point: Tensor) -> Tensor:
        point = point.clone().requires_grad_(True)
        kl = (log_p.exp() * (log_p - F.log_softmax(model(point), dim=1))).sum()
        return torch.autograd.grad(kl, point)[0]

    assert grad_at(x).abs().max() < noise
    torch.manual_seed(10)
    assert grad_at(x + 0.001 * torch.randn_like(x)).abs().max() > 1e3 * noise
    with pytest.raises(ValidationError, match="greater than 0"):
        TradesKL.Params(init_std=0.0)


def test_trades_kl_one_linf_step_from_the_seeded_gaussian_start() -> None:
    model = Recorder(linear_model())
    x, y = batch(low=0.2, high=0.8)
    eps, alpha = 0.1, 0.03
    threat = artplug.Threat("linf", eps)
    torch.manual_seed(11)
    out = attack(steps=1, step_size=alpha).generate(model, x, y, step_state(model, eps))
    x0 = seeded_start(x, threat, 11)
    # One clean forward (the fixed target distribution), then the step's forward at the start.
    assert len(model.inputs) == 2
    assert torch.equal(model.inputs[0], x)
    assert torch.equal(model.inputs[1], x0)
    assert 0 < (x0 - x).abs().max() < 0.01  # a tiny Gaussian, not a uniform point of the ball
    expected = artplug.project(x0 + alpha * kl_input_grad(model, x, x0).sign(), x, threat)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_trades_kl_one_l2_step_from_the_seeded_gaussian_start() -> None:
    model = linear_model()
    x, y = batch(low=0.3, high=0.7)
    eps, alpha = 0.5, 0.2
    threat = artplug.Threat("l2", eps)
    torch.manual_seed(12)
    out = attack(steps=1, step_size=alpha).generate(model, x, y, step_state(model, eps, "l2"))
    x0 = seeded_start(x, threat, 12)
    grad = kl_input_grad(model, x, x0)
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, artplug.project(x0 + alpha * unit, x, threat))


def test_trades_kl_uses_the_attack_logit_scale() -> None:
    model = linear_model()
    x, y = batch(low=0.2, high=0.8)
    eps, alpha, scale = 0.1, 0.03, 15.0
    threat = artplug.Threat("linf", eps)
    # A different training scale: the attack must follow the attack scale.
    setattr(model, "artplug_logit_scale", 1.0)  # noqa: B010
    setattr(model, "artplug_attack_logit_scale", scale)  # noqa: B010
    torch.manual_seed(13)
    out = attack(steps=1, step_size=alpha).generate(model, x, y, step_state(model, eps))
    x0 = seeded_start(x, threat, 13)
    scaled = artplug.project(x0 + alpha * kl_input_grad(model, x, x0, scale).sign(), x, threat)
    unscaled = artplug.project(x0 + alpha * kl_input_grad(model, x, x0).sign(), x, threat)
    torch.testing.assert_close(out, scaled, rtol=0, atol=1e-12)
    assert not torch.equal(scaled, unscaled), "test case should tell the two scales apart"


def test_trades_kl_default_step_is_trades_ratio_of_eps() -> None:
    model = Recorder(linear_model(classes=2))
    x, y = batch(low=0.3, high=0.7)
    eps = 0.1
    torch.manual_seed(14)
    attack(steps=3).generate(model, x, y, step_state(model, eps))
    assert len(model.inputs) == 1 + 3
    # From the start, the first step (0.0226 < eps) is not projected: observe it.
    first_step = model.inputs[2] - model.inputs[1]
    expected = eps * STEP_RATIO * kl_input_grad(model, x, model.inputs[1]).sign()
    torch.testing.assert_close(first_step, expected)
    assert STEP_RATIO * 0.031 == pytest.approx(0.007)


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_trades_kl_raises_the_kl_and_stays_in_ball_and_box(norm: str, eps: float) -> None:
    model = linear_model()
    x, y = batch(n=16)
    threat = artplug.Threat(norm, eps)  # type: ignore[arg-type]
    torch.manual_seed(15)
    out = attack().generate(model, x, y, step_state(model, eps, norm))
    x0 = seeded_start(x, threat, 15)
    assert torch.all(per_example_kl(model, x, out) > per_example_kl(model, x, x0))
    delta = (out - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-9
    assert out.min() >= 0 and out.max() <= 1


def test_trades_kl_ignores_the_labels() -> None:
    # The KL attack is label-free (unlike CE-PGD): other labels give the same result.
    model = linear_model()
    x, y = batch()
    torch.manual_seed(16)
    first = attack().generate(model, x, y, step_state(model, 0.05))
    torch.manual_seed(16)
    second = attack().generate(model, x, (y + 1) % 4, step_state(model, 0.05))
    assert torch.equal(first, second)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_trades_kl_eps_zero_returns_x_exactly(norm: str) -> None:
    model = linear_model()
    x, y = batch()
    assert torch.equal(attack().generate(model, x, y, step_state(model, 0.0, norm)), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trades_kl_result_is_detached_and_leaves_no_parameter_grad(dtype: torch.dtype) -> None:
    model = linear_model(dtype=dtype)
    x, y = batch(dtype=dtype)
    x.requires_grad_(True)
    out = attack().generate(model, x, y, step_state(model, 8 / 255))
    assert not out.requires_grad
    assert out.dtype == dtype and out.shape == x.shape
    assert all(p.grad is None for p in model.parameters())


def test_trades_kl_works_under_no_grad() -> None:
    model = linear_model()
    x, y = batch()
    torch.manual_seed(17)
    with torch.no_grad():
        quiet = attack(steps=3).generate(model, x, y, step_state(model, 0.05))
    torch.manual_seed(17)
    assert torch.equal(quiet, attack(steps=3).generate(model, x, y, step_state(model, 0.05)))
    assert (quiet - x).abs().max() > 0.01  # it moved beyond the tiny start


def test_trades_kl_reads_params_at_call_time() -> None:
    model = Recorder(linear_model())
    x, y = batch()
    technique = attack(steps=10)
    from artplug.engine import _update_params

    _update_params(technique, {"steps": 3.0})  # a knob's float, validated into the int 3
    technique.generate(model, x, y, step_state(model, 0.05))
    assert len(model.inputs) == 1 + 3


def test_trades_kl_params_defaults_and_validation() -> None:
    params = TradesKL.Params()
    assert (params.steps, params.step_size, params.init_std) == (10, None, 0.001)
    for bad in ({"steps": 0}, {"step_size": 0.0}, {"init_std": 0.0}, {"beta": 1.0}):
        with pytest.raises(ValidationError):
            TradesKL.Params(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- trades loss


def outputs(classes: int = 5, n: int = 6) -> artplug.Outputs:
    gen = torch.Generator().manual_seed(3)
    return artplug.Outputs(
        x=torch.zeros(n, 1),
        y=torch.randint(0, classes, (n,), generator=gen),
        x_adv=None,
        logits_clean=(2 * torch.randn(n, classes, generator=gen)).requires_grad_(True),
        logits_adv=(2 * torch.randn(n, classes, generator=gen)).requires_grad_(True),
    )


def loss_state(scale: float | None = None) -> artplug.StepState:
    model = nn.Identity()
    if scale is not None:
        setattr(model, "artplug_logit_scale", scale)  # noqa: B010
    return step_state(model, 0.1)


def reference_trades(clean: Tensor, adv: Tensor, y: Tensor, beta: float, natural: bool) -> Tensor:
    """TRADES' loss as the reference writes it (KLDivLoss sum / batch size, i.e. batchmean)."""
    kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
    return (F.cross_entropy(clean, y) if natural else 0) + beta * kl


def trades_loss(**params: object) -> TradesLoss:
    return TradesLoss(TradesLoss.Params(**params))


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
@pytest.mark.parametrize("natural", [True, False])
def test_trades_loss_equals_ce_plus_beta_batchmean_kl(beta: float, natural: bool) -> None:
    out = outputs()
    value = trades_loss(beta=beta, natural=natural)(out, loss_state())
    assert out.logits_clean is not None and out.logits_adv is not None
    expected = reference_trades(out.logits_clean, out.logits_adv, out.y, beta, natural)
    assert value.dim() == 0
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=value.dtype))


def test_trades_loss_gradient_reaches_both_clean_and_adversarial_logits() -> None:
    out = outputs()
    assert out.logits_clean is not None and out.logits_adv is not None
    # Without the natural term the clean logits get gradient only through the KL: the clean
    # side of the KL is not detached.
    trades_loss(beta=6.0, natural=False)(out, loss_state()).backward()
    clean, adv = out.logits_clean.detach().clone(), out.logits_adv.detach().clone()
    clean.requires_grad_(True)
    adv.requires_grad_(True)
    reference_trades(clean, adv, out.y, 6.0, False).backward()
    assert out.logits_clean.grad is not None and out.logits_adv.grad is not None
    assert out.logits_clean.grad.abs().sum() > 0
    torch.testing.assert_close(out.logits_clean.grad, clean.grad)
    torch.testing.assert_close(out.logits_adv.grad, adv.grad)


def test_trades_loss_applies_the_model_logit_scale() -> None:
    out = outputs()
    assert out.logits_clean is not None and out.logits_adv is not None
    value = trades_loss()(out, loss_state(scale=15.0))
    expected = reference_trades(15 * out.logits_clean, 15 * out.logits_adv, out.y, 6.0, True)
    torch.testing.assert_close(value, expected)
    assert not torch.allclose(value, trades_loss()(out, loss_state()))


def test_trades_loss_is_zero_kl_when_clean_and_adversarial_agree() -> None:
    out = outputs()
    same = artplug.Outputs(out.x, out.y, None, out.logits_clean, out.logits_clean)
    torch.testing.assert_close(trades_loss(natural=False)(same, loss_state()), torch.tensor(0.0))


def test_trades_loss_is_finite_with_underflowing_probabilities() -> None:
    # Probabilities that underflow to exactly zero in float32 must not give NaN values or
    # gradients (F.kl_div on softmax targets does: xlogy's gradient at 0 is 0/0).
    clean = torch.tensor([[0.0, -300.0, -200.0], [50.0, -80.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[-300.0, 0.0, 5.0], [0.0, 0.0, -150.0]], requires_grad=True)
    assert (F.softmax(clean, dim=1) == 0).any()
    out = artplug.Outputs(torch.zeros(2, 1), torch.tensor([0, 2]), None, clean, adv)
    value = trades_loss()(out, loss_state(scale=15.0))
    value.backward()
    assert torch.isfinite(value)
    assert clean.grad is not None and adv.grad is not None
    assert torch.isfinite(clean.grad).all() and torch.isfinite(adv.grad).all()


def test_trades_loss_reads_params_at_call_time() -> None:
    out = outputs()
    term = trades_loss(beta=6.0)
    term.params = term.params.model_copy(update={"beta": 1.0, "natural": False})
    assert out.logits_clean is not None and out.logits_adv is not None
    expected = reference_trades(out.logits_clean, out.logits_adv, out.y, 1.0, False)
    torch.testing.assert_close(term(out, loss_state()), expected)


def test_trades_loss_defaults_validation_needs_and_missing_logits() -> None:
    params = TradesLoss.Params()
    assert (params.beta, params.natural) == (6.0, True)
    assert TradesLoss.needs == frozenset({"clean", "adv"})
    for bad in ({"beta": -1.0}, {"natural": "maybe"}, {"steps": 3}):
        with pytest.raises(ValidationError):
            TradesLoss.Params(**bad)  # type: ignore[arg-type]
    out = outputs()
    missing = artplug.Outputs(out.x, out.y, None, out.logits_clean, None)
    with pytest.raises(RuntimeError, match="logits_adv"):
        trades_loss()(missing, loss_state())


# ---------------------------------------------------------------- recipe rule with he-margin


def view(losses: tuple[str, ...]) -> artplug.RecipeView:
    return artplug.RecipeView(
        transforms=("hypersphere",),
        perturbation="trades-kl",
        losses=losses,
        schedules=(),
        threat=artplug.Threat("linf", 0.031),
    )


def test_check_recipe_asks_for_natural_false_next_to_he_margin() -> None:
    reasons = list(TradesLoss.check_recipe(TradesLoss.Params(), view(("he-margin", "trades"))))
    assert len(reasons) == 1 and "natural = false" in reasons[0]
    assert not list(TradesLoss.check_recipe(TradesLoss.Params(), view(("trades",))))
    quiet = TradesLoss.Params(natural=False)
    assert not list(TradesLoss.check_recipe(quiet, view(("he-margin", "trades"))))


def he_trades_recipe(natural: bool) -> dict[str, object]:
    return digits_recipe(
        transform=[{"use": "hypersphere", "s": 15.0}],
        perturbation={"use": "trades-kl", "steps": 2},
        loss=[
            {"use": "he-margin", "on": "clean", "m": 0.2},
            {"use": "trades", "beta": 6.0, "natural": natural},
        ],
    )


def test_resolve_rejects_trades_natural_with_he_margin(plugin_set) -> None:
    if "he-margin" not in plugin_set.registries.loss:
        pytest.skip("he-margin (plugins/hypersphere.py) is not registered yet")
    with pytest.raises(RecipeError, match=r"loss\[1\] \(trades\): with he-margin, set natural"):
        resolve(he_trades_recipe(natural=True), plugin_set.registries)
    resolved = resolve(he_trades_recipe(natural=False), plugin_set.registries)
    assert [spec.use for spec in resolved.losses] == ["he-margin", "trades"]


def test_resolve_accepts_trades_with_a_cross_entropy_attack(plugin_set) -> None:
    # The CE-attack variant (ART's TRADES example) is allowed; the reference attack is trades-kl.
    raw = digits_recipe(perturbation={"use": "pgd", "steps": 2}, loss=[{"use": "trades"}])
    assert resolve(raw, plugin_set.registries).losses[0].use == "trades"


# ---------------------------------------------------------------- engine smoke runs
def without_sanity_gate(raw: dict[str, Any]) -> dict[str, Any]:
    """Switch the post-training sanity gate off: these smoke runs test the techniques, not the
    gate, and its attacks would dominate their run time."""
    if "sanity" in EvalSection.model_fields:
        raw["eval"]["sanity"] = False
    return raw


def test_digits_trades_recipe_trains_two_steps(plugin_set, tmp_path: Path) -> None:
    raw = digits_recipe(
        perturbation={"use": "trades-kl", "steps": 2},
        loss=[{"use": "trades", "beta": 6.0}],
    )
    c = build(resolve(without_sanity_gate(raw), plugin_set.registries))
    result = train_and_evaluate(c, run_dir=tmp_path / "trades", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0
    assert (tmp_path / "trades" / "metrics.jsonl").is_file()


def test_digits_trades_he_recipe_trains_two_steps(plugin_set, tmp_path: Path) -> None:
    if "he-margin" not in plugin_set.registries.loss:
        pytest.skip("he-margin (plugins/hypersphere.py) is not registered yet")
    raw = without_sanity_gate(he_trades_recipe(natural=False))
    c = build(resolve(raw, plugin_set.registries))
    result = train_and_evaluate(c, run_dir=tmp_path / "trades-he", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0


# ---------------------------------------------------------------- registration


def test_hookimpls_register_through_pluggy() -> None:
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(trades, name="trades")
    pm.check_pending()
    perturbations, losses = Registry("perturbation"), Registry("loss")
    pm.hook.register_perturbations(register=lambda cls: perturbations.add(cls, "trades"))
    pm.hook.register_loss_terms(register=lambda cls: losses.add(cls, "trades"))
    assert perturbations.names() == ["trades-kl"]
    assert losses.names() == ["trades"]
    assert perturbations.get("trades-kl").description.startswith("TRADES attack")
