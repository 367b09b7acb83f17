"""Tests of plugins/pgd_at.py: the ``none`` and ``pgd`` perturbations and ``cross-entropy``.

The attacks are checked against their formulas on a linear model ``f(x) = W x + b``, whose
cross-entropy input gradient has the closed form ``(softmax(f(x)) - onehot(y)) @ W``.
"""

from __future__ import annotations

import math
from typing import Any

import pluggy
import pytest
import torch
import torch.nn.functional as F
import toy
from artplug_plugins import pgd_at
from artplug_plugins.pgd_at import PGD, CrossEntropy, NoPerturbation
from pydantic import ValidationError
from torch import Tensor, nn
from toy import ce_input_grad, head

import artplug
import artplug.hookspecs
from artplug.registry import Registry

SHAPE = (2, 3, 3)  # C, H, W of the toy "images"
DIM = math.prod(SHAPE)


def linear_model(classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The toy linear model on this file's input shape."""
    return toy.linear_model(SHAPE, classes, seed, dtype)


def per_example_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner(x)


def batch(
    n: int = 8, classes: int = 4, low: float = 0.0, high: float = 1.0, dtype=torch.float64
) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = low + (high - low) * torch.rand(n, *SHAPE, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def step_state(model: nn.Module, eps: float, norm: str = "linf") -> artplug.StepState:
    return artplug.StepState(
        progress=artplug.Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100),
        knobs={},
        model=model,
        threat=artplug.Threat(norm, eps),  # type: ignore[arg-type]
    )


def pgd(**params: object) -> PGD:
    return PGD(PGD.Params(**params))


# ---------------------------------------------------------------- none


def test_none_returns_the_clean_batch_detached() -> None:
    model = linear_model()
    x, y = batch()
    x.requires_grad_(True)
    out = NoPerturbation(NoPerturbation.Params()).generate(model, x, y, step_state(model, 0.1))
    assert torch.equal(out, x)
    assert not out.requires_grad


# ---------------------------------------------------------------- pgd against its formula


@pytest.mark.parametrize("step_size", [0.03, None])
def test_pgd_one_linf_step_from_x_is_projected_signed_gradient_step(
    step_size: float | None,
) -> None:
    model = linear_model()
    x, y = batch()
    eps = 0.05
    threat = artplug.Threat("linf", eps)
    out = pgd(steps=1, random_start=False, step_size=step_size).generate(
        model, x, y, step_state(model, eps)
    )
    alpha = 2.5 * eps if step_size is None else step_size  # default: 2.5 * eps / steps
    expected = artplug.project(x + alpha * ce_input_grad(model, x, y).sign(), x, threat)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("step_size", [0.3, 0.8])
def test_pgd_one_l2_step_from_x_is_projected_normalised_gradient_step(step_size: float) -> None:
    model = linear_model()
    # Mid-range pixels: the box never clips, so the L2 projection alone is visible.
    x, y = batch(low=0.3, high=0.7)
    eps = 0.5
    threat = artplug.Threat("l2", eps)
    out = pgd(steps=1, random_start=False, step_size=step_size).generate(
        model, x, y, step_state(model, eps, "l2")
    )
    grad = ce_input_grad(model, x, y)
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = artplug.project(x + step_size * unit, x, threat)
    torch.testing.assert_close(out, expected)
    norms = (out - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, min(step_size, eps)))


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_multi_step_stays_in_ball_and_box_and_raises_the_loss(norm: str, eps: float) -> None:
    torch.manual_seed(0)
    model = linear_model()
    x, y = batch()
    out = pgd().generate(model, x, y, step_state(model, eps, norm))
    delta = (out - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-12
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-9
    assert out.min() >= 0 and out.max() <= 1
    assert torch.all(per_example_ce(model, out, y) > per_example_ce(model, x, y))


@pytest.mark.parametrize("steps", [4, 10])
def test_pgd_default_step_size_is_2_5_eps_over_steps(steps: int) -> None:
    model = Recorder(linear_model())
    x, y = batch(low=0.3, high=0.7)
    eps = 0.1
    pgd(steps=steps, random_start=False).generate(model, x, y, step_state(model, eps))
    assert len(model.inputs) == steps  # one forward per step, none extra with one restart
    # The first step starts at x and is shorter than eps, so it is not projected: observe it.
    first_step = model.inputs[1] - model.inputs[0]
    expected = 2.5 * eps / steps * ce_input_grad(model, x, y).sign()
    torch.testing.assert_close(first_step, expected)


def test_pgd_takes_steps_of_the_given_size() -> None:
    # With two classes and y = 0 the input gradient is p1 * (W1 - W0): its sign never changes,
    # so k steps of size a from x move every pixel by exactly k * a (no projection here).
    model = linear_model(classes=2)
    x, _ = batch(low=0.3, high=0.7)
    y = torch.zeros(len(x), dtype=torch.long)
    eps = 0.1
    out = pgd(steps=3, step_size=eps / 10, random_start=False).generate(
        model, x, y, step_state(model, eps)
    )
    weight = head(model).weight.detach()
    direction = (weight[1] - weight[0]).sign().view(SHAPE)
    torch.testing.assert_close(out, x + 0.3 * eps * direction)


def test_pgd_random_start_is_uniform_in_the_ball_and_reproducible() -> None:
    model = Recorder(linear_model())
    x, y = batch()
    eps = 0.1
    threat = artplug.Threat("linf", eps)
    torch.manual_seed(123)
    out = pgd(steps=1, step_size=0.02).generate(model, x, y, step_state(model, eps))
    torch.manual_seed(123)
    x0 = artplug.random_start(x, threat)
    # The walk starts from the ball's uniform random point drawn with the same seed ...
    assert torch.equal(model.inputs[0], x0)
    assert not torch.equal(x0, x)
    assert (x0 - x).abs().max() <= eps and x0.min() >= 0 and x0.max() <= 1
    # ... and steps from there.
    expected = artplug.project(x0 + 0.02 * ce_input_grad(model, x0, y).sign(), x, threat)
    assert torch.equal(out, expected)


def test_pgd_restarts_keep_the_highest_loss_result_per_example() -> None:
    model = linear_model(classes=5)
    x, y = batch(n=32, classes=5)
    eps = 0.3
    state = step_state(model, eps)
    # One short step: the end point depends strongly on the random start.
    params = {"steps": 1, "step_size": eps / 4}
    restarts = 3
    torch.manual_seed(7)
    out = pgd(restarts=restarts, **params).generate(model, x, y, state)
    # The same seed replays the same random starts when the restarts are run one by one.
    torch.manual_seed(7)
    single = pgd(restarts=1, **params)
    runs = torch.stack([single.generate(model, x, y, state) for _ in range(restarts)])
    losses = torch.stack([per_example_ce(model, r, y) for r in runs])  # (restarts, N)
    winner = losses.argmax(dim=0)
    assert len(set(winner.tolist())) > 1, "test case should have different winning restarts"
    expected = runs[winner, torch.arange(len(x))]
    assert torch.equal(out, expected)
    torch.testing.assert_close(per_example_ce(model, out, y), losses.max(dim=0).values)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_eps_zero_returns_x_exactly(norm: str) -> None:
    model = linear_model()
    x, y = batch()
    out = pgd(restarts=2).generate(model, x, y, step_state(model, 0.0, norm))
    assert torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "technique",
    [pgd(), pgd(restarts=2), NoPerturbation(NoPerturbation.Params())],
)
def test_result_is_detached_same_dtype_and_leaves_no_parameter_grad(
    technique: PGD | NoPerturbation, dtype: torch.dtype
) -> None:
    model = linear_model(dtype=dtype)
    x, y = batch(dtype=dtype)
    out = technique.generate(model, x, y, step_state(model, 8 / 255))
    assert not out.requires_grad
    assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape
    assert all(p.grad is None for p in model.parameters())


def test_pgd_works_when_called_under_no_grad() -> None:
    model = linear_model()
    x, y = batch()
    attack = pgd(steps=2, random_start=False)
    with torch.no_grad():
        quiet = attack.generate(model, x, y, step_state(model, 0.05))
    assert torch.equal(quiet, attack.generate(model, x, y, step_state(model, 0.05)))
    assert not torch.equal(quiet, x)


def test_pgd_reads_params_at_call_time_like_the_engines_knobs() -> None:
    model = Recorder(linear_model())
    x, y = batch()
    attack = pgd(steps=10, random_start=False)
    # The engine swaps in a validated copy; a schedule's float 3.0 becomes the int 3.
    from artplug.engine import _update_params

    _update_params(attack, {"steps": 3.0})
    attack.generate(model, x, y, step_state(model, 0.05))
    assert len(model.inputs) == 3


def test_pgd_params_defaults_and_validation() -> None:
    params = PGD.Params()
    assert (params.steps, params.step_size, params.random_start, params.restarts) == (
        10,
        None,
        True,
        1,
    )
    for bad in (
        {"steps": 0},
        {"step_size": 0.0},
        {"restarts": 0},
        {"restarts": 2, "random_start": False},
        {"stpes": 5},
    ):
        with pytest.raises(ValidationError):
            PGD.Params(**bad)
    with pytest.raises(ValidationError, match="random_start"):
        PGD.Params(restarts=2, random_start=False)


# ---------------------------------------------------------------- cross-entropy


def outputs(classes: int = 5) -> artplug.Outputs:
    gen = torch.Generator().manual_seed(3)
    return artplug.Outputs(
        x=torch.zeros(6, 1),
        y=torch.randint(0, classes, (6,), generator=gen),
        x_adv=None,
        logits_clean=torch.randn(6, classes, generator=gen, requires_grad=True),
        logits_adv=torch.randn(6, classes, generator=gen, requires_grad=True),
    )


@pytest.mark.parametrize("on", ["adv", "clean"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_matches_torch_on_the_chosen_logits(on: str, smoothing: float) -> None:
    term = CrossEntropy(CrossEntropy.Params(on=on, label_smoothing=smoothing))  # type: ignore[arg-type]
    assert term.needs == frozenset({on})
    out = outputs()
    state = step_state(linear_model(), 0.1)
    value = term(out, state)
    logits = out.logits_adv if on == "adv" else out.logits_clean
    assert logits is not None
    torch.testing.assert_close(value, F.cross_entropy(logits, out.y, label_smoothing=smoothing))
    assert value.dim() == 0
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_cross_entropy_defaults_validation_and_missing_logits() -> None:
    params = CrossEntropy.Params()
    assert (params.on, params.label_smoothing) == ("adv", 0.0)
    for bad in ({"on": "both"}, {"label_smoothing": 1.0}, {"label_smoothing": -0.1}, {"x": 1}):
        with pytest.raises(ValidationError):
            CrossEntropy.Params(**bad)  # type: ignore[arg-type]
    out = outputs()
    missing = artplug.Outputs(out.x, out.y, None, logits_clean=out.logits_clean, logits_adv=None)
    with pytest.raises(RuntimeError, match="logits_adv"):
        CrossEntropy(params)(missing, step_state(linear_model(), 0.1))


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize(
    "kind, cls", [("perturbation", NoPerturbation), ("perturbation", PGD), ("loss", CrossEntropy)]
)
def test_registry_accepts_the_class_shape(kind: str, cls: type[Any]) -> None:
    registry = Registry(kind)  # type: ignore[arg-type]
    registry.add(cls, plugin="test")
    assert cls.name in registry
    assert registry.get(cls.name).description


def test_hookimpls_register_through_pluggy() -> None:
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(pgd_at, name="pgd_at")
    pm.check_pending()
    perturbations, losses = Registry("perturbation"), Registry("loss")
    pm.hook.register_perturbations(register=lambda cls: perturbations.add(cls, "pgd_at"))
    pm.hook.register_loss_terms(register=lambda cls: losses.add(cls, "pgd_at"))
    assert perturbations.names() == ["none", "pgd"]
    assert losses.names() == ["cross-entropy"]


# ---------------------------------------------------------------- pgd target = "least-likely"


def least_likely(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmin(dim=1)


def target_prob(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).gather(1, t[:, None])[:, 0]


@pytest.mark.parametrize("step_size", [0.03, None])
def test_pgd_least_likely_one_step_descends_ce_towards_the_argmin_class(
    step_size: float | None,
) -> None:
    model = linear_model()
    x, y = batch()
    eps = 0.05
    threat = artplug.Threat("linf", eps)
    out = pgd(steps=1, random_start=False, step_size=step_size, target="least-likely").generate(
        model, x, y, step_state(model, eps)
    )
    t = least_likely(model, x)
    assert not torch.equal(t, y), "test case should have targets other than the labels"
    alpha = 2.5 * eps if step_size is None else step_size
    expected = artplug.project(x - alpha * ce_input_grad(model, x, t).sign(), x, threat)
    assert torch.equal(out, expected)


def test_pgd_least_likely_one_l2_step() -> None:
    model = linear_model()
    x, y = batch(low=0.3, high=0.7)
    eps, alpha = 0.5, 0.3
    threat = artplug.Threat("l2", eps)
    out = pgd(steps=1, random_start=False, step_size=alpha, target="least-likely").generate(
        model, x, y, step_state(model, eps, "l2")
    )
    grad = ce_input_grad(model, x, least_likely(model, x))
    unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, artplug.project(x - alpha * unit, x, threat))


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_least_likely_raises_the_target_probability_inside_the_ball(
    norm: str, eps: float
) -> None:
    torch.manual_seed(0)
    model = linear_model()
    x, y = batch()
    out = pgd(target="least-likely").generate(model, x, y, step_state(model, eps, norm))
    t = least_likely(model, x)
    assert torch.all(target_prob(model, out, t) > target_prob(model, x, t))
    delta = (out - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-9 and out.min() >= 0 and out.max() <= 1


def test_pgd_least_likely_takes_the_target_once_from_the_clean_input_and_ignores_y() -> None:
    model = Recorder(linear_model())
    x, y = batch()
    attack = pgd(steps=3, random_start=False, target="least-likely")
    out = attack.generate(model, x, y, step_state(model, 0.05))
    # One clean forward for the target, then one per step (the target is not re-chosen).
    assert len(model.inputs) == 1 + 3
    assert torch.equal(model.inputs[0], x)
    assert torch.equal(out, attack.generate(model, x, (y + 1) % 4, step_state(model, 0.05)))


def test_pgd_least_likely_restarts_keep_the_lowest_ce_to_the_target() -> None:
    model = linear_model(classes=5)
    x, y = batch(n=32, classes=5)
    eps = 0.3
    state = step_state(model, eps)
    params = {"steps": 1, "step_size": eps / 4, "target": "least-likely"}
    restarts = 3
    torch.manual_seed(8)
    out = pgd(restarts=restarts, **params).generate(model, x, y, state)
    torch.manual_seed(8)
    single = pgd(restarts=1, **params)
    runs = torch.stack([single.generate(model, x, y, state) for _ in range(restarts)])
    t = least_likely(model, x)
    to_target = torch.stack([per_example_ce(model, r, t) for r in runs])  # (restarts, N)
    winner = to_target.argmin(dim=0)
    assert len(set(winner.tolist())) > 1, "test case should have different winning restarts"
    assert torch.equal(out, runs[winner, torch.arange(len(x))])


def test_pgd_target_default_and_validation() -> None:
    assert PGD.Params().target == "none"
    assert PGD.Params(target="least-likely").target == "least-likely"
    with pytest.raises(ValidationError):
        PGD.Params(target="most-likely")  # type: ignore[arg-type]


def test_pgd_least_likely_is_detached_and_leaves_no_parameter_grad() -> None:
    model = linear_model(dtype=torch.float32)
    x, y = batch(dtype=torch.float32)
    out = pgd(target="least-likely", restarts=2).generate(model, x, y, step_state(model, 8 / 255))
    assert not out.requires_grad and out.dtype == x.dtype
    assert all(p.grad is None for p in model.parameters())
