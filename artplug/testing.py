"""Test helpers and contract checkers for artplug and for third-party plugin packages.

Opt in from a ``conftest.py`` with ``pytest_plugins = ["artplug.testing"]`` to get the fixtures;
call the ``check_*`` functions on your technique classes to run the same contract checks that
artplug runs over every registered technique::

    from artplug.testing import check_perturbation
    def test_my_attack_contract():
        check_perturbation(MyAttack)

A technique whose ``Params`` has required fields gives example values in a class attribute
``contract_params: dict`` (or pass ``params=`` to the checker).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from artplug.kinds import Outputs, Progress, StepState, Threat, UpdateHook
from artplug.plugins import PluginSet, load_plugins

CONTRACT_THREATS = (Threat("linf", 0.1), Threat("l2", 0.5))
# Slack for float32 round-off at the edge of the ball.
BALL_TOLERANCE = 1e-5


def tiny_model(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """The small CNN of the digits quickstart (1x8x8 inputs), freshly initialised."""
    from artplug.models import build_model

    torch.manual_seed(seed)
    return build_model(
        "small-cnn",
        in_channels=1,
        num_classes=num_classes,
        mean=(0.3,),
        std=(0.4,),
    )


def tiny_batch(n: int = 16, num_classes: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random images in [0, 1] (1x8x8) and labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return x, y


def make_state(model: nn.Module, threat: Threat, step: int = 0, total: int = 100) -> StepState:
    """A StepState for calling techniques outside the engine."""
    progress = Progress(epoch=step // 10, step=step, steps_per_epoch=10, total_steps=total)
    return StepState(progress=progress, knobs={}, model=model, threat=threat)


def _instantiate(cls: type[Any], params: Mapping[str, Any] | None) -> Any:
    values = dict(params if params is not None else getattr(cls, "contract_params", {}))
    return cls(cls.Params(**values))


def _clear_grads(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.grad = None


def _assert_no_param_grads(model: nn.Module, who: str) -> None:
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    assert not with_grad, f"{who} left .grad on parameters {with_grad[:3]}"


def check_perturbation(cls: type[Any], params: Mapping[str, Any] | None = None) -> None:
    """Assert the Perturbation contract on a tiny model, for an L-inf and an L2 threat.

    Checks: detached result of the same shape/dtype/device, inside [0, 1] and the threat ball,
    no parameter ``.grad`` left behind; ``after_backward`` and ``state_dict`` round trip when
    the class has them.
    """
    for threat in CONTRACT_THREATS:
        model = tiny_model()
        model.eval()
        x, y = tiny_batch()
        perturbation = _instantiate(cls, params)
        state = make_state(model, threat)
        _clear_grads(model)
        x_adv = perturbation.generate(model, x, y, state)
        label = f"{cls.__name__} ({threat.norm})"
        assert isinstance(x_adv, Tensor), f"{label}: generate must return a Tensor"
        assert x_adv.shape == x.shape, f"{label}: shape {tuple(x_adv.shape)} != {tuple(x.shape)}"
        assert x_adv.dtype == x.dtype and x_adv.device == x.device, f"{label}: dtype/device"
        assert not x_adv.requires_grad, f"{label}: result must be detached"
        assert torch.isfinite(x_adv).all(), f"{label}: result has NaN/inf"
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, f"{label}: result outside [0, 1]"
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if threat.norm == "linf" else delta.norm(p=2, dim=1)
        assert (size <= threat.eps + BALL_TOLERANCE).all(), (
            f"{label}: outside the {threat.norm} ball, max size {size.max():.6f} > {threat.eps}"
        )
        _assert_no_param_grads(model, label)
        after_backward = getattr(perturbation, "after_backward", None)
        if after_backward is not None:
            after_backward(torch.randn_like(x), state)
            again = perturbation.generate(model, x, y, state)
            assert again.shape == x.shape and not again.requires_grad
        state_dict = getattr(perturbation, "state_dict", None)
        if state_dict is not None:
            fresh = _instantiate(cls, params)
            fresh.load_state_dict(copy.deepcopy(state_dict()))
    replays = getattr(cls, "replays", 1)
    assert isinstance(replays, int) and replays >= 1, f"{cls.__name__}: replays must be an int >= 1"


def check_loss_term(cls: type[Any], params: Mapping[str, Any] | None = None) -> None:
    """Assert the LossTerm contract: a finite, differentiable 0-dim tensor; no backward()."""
    model = tiny_model()
    model.train()
    x, y = tiny_batch()
    term = _instantiate(cls, params)
    needs = frozenset(term.needs)
    assert needs <= {"clean", "adv"}, f"{cls.__name__}: needs {set(needs)} not within clean/adv"
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    out = Outputs(
        x=x,
        y=y,
        x_adv=x_adv,
        logits_clean=model(x) if "clean" in needs else None,
        logits_adv=model(x_adv) if "adv" in needs else None,
    )
    _clear_grads(model)
    value = term(out, make_state(model, Threat("linf", 0.1)))
    label = cls.__name__
    assert isinstance(value, Tensor) and value.dim() == 0, f"{label}: must return a 0-dim tensor"
    assert torch.isfinite(value), f"{label}: value is not finite"
    assert value.requires_grad, f"{label}: value must be differentiable"
    _assert_no_param_grads(model, f"{label} (a loss term must not call backward)")
    value.backward()


def check_model_transform(cls: type[Any], params: Mapping[str, Any] | None = None) -> None:
    """Assert the ModelTransform contract: a module with unchanged output shape."""
    model = tiny_model()
    x, _ = tiny_batch(4)
    with torch.no_grad():
        before = model.eval()(x).shape
    transformed = _instantiate(cls, params).apply(model)
    assert isinstance(transformed, nn.Module), f"{cls.__name__}: apply must return an nn.Module"
    with torch.no_grad():
        after = transformed.eval()(x).shape
    assert after == before, f"{cls.__name__}: output shape {tuple(before)} became {tuple(after)}"
    transformed.train()
    transformed(x).sum().backward()
    if isinstance(_instantiate(cls, params), UpdateHook):
        check_update_hook(cls, params)


def check_update_hook(cls: type[Any], params: Mapping[str, Any] | None = None) -> None:
    """Assert the optional UpdateHook contract of a model transform (:class:`artplug.UpdateHook`).

    Runs the engine's order on a tiny model in train mode: ``apply``, ``before_update``, a
    backward at the hook's weights, ``after_backward_update``. Checks: ``before_update`` leaves
    no ``.grad`` on parameters, leaves buffers (BatchNorm statistics) and the inputs unchanged;
    after ``after_backward_update`` every parameter is bit-for-bit what it was, and the
    gradient is finite. Run it twice, so state kept between the two calls is reset.
    """
    hook = _instantiate(cls, params)
    model = hook.apply(tiny_model())
    model.train()
    x, y = tiny_batch()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    inputs = (x.clone(), x_adv.clone())
    label = cls.__name__
    for step in range(2):
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        _clear_grads(model)
        hook.before_update(model, x, x_adv, y, make_state(model, Threat("linf", 0.1), step=step))
        _assert_no_param_grads(model, f"{label}.before_update")
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, buffers[name]), (
                f"{label}.before_update changed buffer {name}"
            )
        assert torch.equal(x, inputs[0]) and torch.equal(x_adv, inputs[1]), f"{label}: inputs"
        torch.nn.functional.cross_entropy(model(x_adv), y).backward()
        hook.after_backward_update(model)
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter, weights[name]), f"{label}: {name} not restored"
            if parameter.grad is not None:
                assert torch.isfinite(parameter.grad).all(), f"{label}: {name}.grad not finite"


def check_schedule(cls: type[Any], params: Mapping[str, Any] | None = None) -> None:
    """Assert the Schedule contract: declared knobs only, finite values, a pure function."""
    schedule = _instantiate(cls, params)
    knobs = schedule.knobs()
    assert isinstance(knobs, frozenset) and knobs, f"{cls.__name__}: knobs() must be a frozenset"
    total, per_epoch = 200, 20
    points = [Progress(s // per_epoch, s, per_epoch, total) for s in range(0, total, 7)]
    first = [schedule.values(p) for p in points]
    for values in first:
        assert set(values) == set(knobs), f"{cls.__name__}: returned {set(values)} != {set(knobs)}"
        assert all(isinstance(v, float | int) and v == v for v in values.values())
    # Purity: a fresh instance asked in a shuffled order gives the same values.
    order = list(range(len(points)))
    random.Random(0).shuffle(order)
    other = _instantiate(cls, params)
    for index in order:
        assert other.values(points[index]) == first[index], f"{cls.__name__}: not pure"


CHECKERS = {
    "perturbation": check_perturbation,
    "loss": check_loss_term,
    "transform": check_model_transform,
    "schedule": check_schedule,
}


def digits_recipe(**sections: Mapping[str, Any] | list[Mapping[str, Any]]) -> dict[str, Any]:
    """A small digits recipe (raw dict) for smoke tests; ``sections`` replace whole tables."""
    raw: dict[str, Any] = {
        "run": {"name": "test", "epochs": 1, "seed": 0, "log_every": 1},
        "data": {"dataset": "digits", "batch_size": 64},
        "model": {"arch": "small-cnn"},
        "optim": {"lr": 0.05},
        "threat": {"norm": "linf", "eps": 0.1},
        "perturbation": {"use": "pgd", "steps": 2},
        "loss": [{"use": "cross-entropy"}],
        "eval": {
            "every_epochs": 1,
            "attacks": ["clean"],
            "final_attacks": ["clean"],
            "n_examples": 32,
            "test_examples": 32,
            # The gate's attacks dominate a two-step smoke run; tests of the gate turn it on.
            "sanity": False,
        },
        "tracking": {"backend": "none"},
    }
    raw.update({k: dict(v) if isinstance(v, Mapping) else v for k, v in sections.items()})
    return raw


@pytest.fixture(scope="session")
def plugin_set() -> PluginSet:
    """Installed plugins (built-ins through their entry points), loaded strictly."""
    return load_plugins(disabled=(), strict=True)


@pytest.fixture
def run_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary working directory, so runs and MLflow stores land in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
