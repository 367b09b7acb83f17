"""Tests of plugins/alp.py: the ``logit-pairing`` loss term, and ALP recipes end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pluggy
import pytest
import torch
from artplug_plugins import alp
from artplug_plugins.alp import LogitPairing
from pydantic import ValidationError
from torch import Tensor, nn

import artplug
import artplug.hookspecs
from artplug.engine import build
from artplug.recipe import EvalSection, resolve
from artplug.registry import Registry
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate


def outputs(n: int = 6, classes: int = 5) -> artplug.Outputs:
    gen = torch.Generator().manual_seed(4)
    return artplug.Outputs(
        x=torch.zeros(n, 1),
        y=torch.randint(0, classes, (n,), generator=gen),
        x_adv=None,
        logits_clean=torch.randn(n, classes, generator=gen, requires_grad=True),
        logits_adv=torch.randn(n, classes, generator=gen, requires_grad=True),
    )


def state(model: nn.Module | None = None) -> artplug.StepState:
    return artplug.StepState(
        progress=artplug.Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100),
        knobs={},
        model=model if model is not None else nn.Identity(),
        threat=artplug.Threat("linf", 0.1),
    )


def pairing() -> LogitPairing:
    return LogitPairing(LogitPairing.Params())


def logits(out: artplug.Outputs) -> tuple[Tensor, Tensor]:
    assert out.logits_clean is not None and out.logits_adv is not None
    return out.logits_clean, out.logits_adv


def test_logit_pairing_is_the_mean_over_batch_and_classes_of_squared_differences() -> None:
    out = outputs()
    clean, adv = logits(out)
    value = pairing()(out, state())
    assert value.dim() == 0
    torch.testing.assert_close(value, ((clean - adv) ** 2).mean())
    # Mean over all B·K elements (tf.losses.mean_squared_error), not a per-example sum.
    manual = sum(
        (clean[i, k] - adv[i, k]) ** 2 for i in range(clean.shape[0]) for k in range(5)
    ) / (clean.shape[0] * 5)
    torch.testing.assert_close(value, manual)


def test_logit_pairing_fixed_values() -> None:
    clean = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    adv = torch.tensor([[0.0, 2.0], [3.0, 1.0]], requires_grad=True)
    out = artplug.Outputs(torch.zeros(2, 1), torch.tensor([0, 1]), None, clean, adv)
    # (1 + 0 + 9 + 4) / 4
    torch.testing.assert_close(pairing()(out, state()), torch.tensor(3.5))


def test_logit_pairing_is_not_scaled_by_the_logit_scale() -> None:
    # Under a hypersphere head the pairing is on the raw cosines (AT_HE's ALP+HE).
    out = outputs()
    clean, adv = logits(out)
    model = nn.Identity()
    setattr(model, "artplug_logit_scale", 20.0)  # noqa: B010
    setattr(model, "artplug_attack_logit_scale", 20.0)  # noqa: B010
    torch.testing.assert_close(pairing()(out, state(model)), ((clean - adv) ** 2).mean())


def test_logit_pairing_gradient_reaches_both_sides() -> None:
    out = outputs()
    clean, adv = logits(out)
    pairing()(out, state()).backward()
    n_elements = clean.numel()
    expected = 2 * (clean - adv).detach() / n_elements
    assert clean.grad is not None and adv.grad is not None
    torch.testing.assert_close(clean.grad, expected)
    torch.testing.assert_close(adv.grad, -expected)


def test_logit_pairing_params_needs_and_missing_logits() -> None:
    assert LogitPairing.needs == frozenset({"clean", "adv"})
    with pytest.raises(ValidationError):
        LogitPairing.Params(weight=0.5)  # type: ignore[call-arg]
    out = outputs()
    missing = artplug.Outputs(out.x, out.y, None, None, out.logits_adv)
    with pytest.raises(RuntimeError, match="logits_clean"):
        pairing()(missing, state())


# ---------------------------------------------------------------- recipes
def without_sanity_gate(raw: dict[str, Any]) -> dict[str, Any]:
    """Switch the post-training sanity gate off: these smoke runs test the techniques, not the
    gate, and its attacks would dominate their run time."""
    if "sanity" in EvalSection.model_fields:
        raw["eval"]["sanity"] = False
    return raw


def alp_losses(ce: str = "cross-entropy", pair_weight: float = 0.5) -> list[dict[str, object]]:
    """ALP's objective: 0.5 CE(clean) + 0.5 CE(adv) + λ MSE(clean, adv) logits."""
    smoothing = {"label_smoothing": 0.1} if ce == "cross-entropy" else {"m": 0.3}
    return [
        {"use": ce, "id": "clean", "on": "clean", "weight": 0.5, **smoothing},
        {"use": ce, "id": "adv", "on": "adv", "weight": 0.5, **smoothing},
        {"use": "logit-pairing", "weight": pair_weight},
    ]


def test_alp_recipe_resolves_with_the_least_likely_attack(plugin_set) -> None:
    raw = digits_recipe(
        perturbation={"use": "pgd", "target": "least-likely", "steps": 2},
        loss=alp_losses(),
    )
    recipe = resolve(raw, plugin_set.registries)
    assert [(s.id, s.weight) for s in recipe.losses] == [
        ("clean", 0.5),
        ("adv", 0.5),
        ("logit-pairing", 0.5),
    ]
    assert recipe.perturbation.params.model_dump()["target"] == "least-likely"


def test_digits_alp_recipe_trains_two_steps(plugin_set, tmp_path: Path) -> None:
    raw = digits_recipe(
        perturbation={"use": "pgd", "target": "least-likely", "steps": 2},
        loss=alp_losses(),
    )
    c = build(resolve(without_sanity_gate(raw), plugin_set.registries))
    result = train_and_evaluate(c, run_dir=tmp_path / "alp", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0


def test_digits_alp_he_recipe_trains_two_steps(plugin_set, tmp_path: Path) -> None:
    if "he-margin" not in plugin_set.registries.loss:
        pytest.skip("he-margin (plugins/hypersphere.py) is not registered yet")
    raw = digits_recipe(
        transform=[{"use": "hypersphere", "s": 20.0}],
        perturbation={"use": "pgd", "steps": 2},
        loss=alp_losses(ce="he-margin"),
    )
    c = build(resolve(without_sanity_gate(raw), plugin_set.registries))
    result = train_and_evaluate(c, run_dir=tmp_path / "alp-he", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0


# ---------------------------------------------------------------- registration


def test_hookimpls_register_through_pluggy() -> None:
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(alp, name="alp")
    pm.check_pending()
    losses = Registry("loss")
    pm.hook.register_loss_terms(register=lambda cls: losses.add(cls, "alp"))
    assert losses.names() == ["logit-pairing"]
    assert "logit pairing" in losses.get("logit-pairing").description
