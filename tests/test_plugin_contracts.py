"""Plugin contracts: transform stages at registration and in recipes, moat without slat."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import artplug
from artplug.errors import PluginError, RecipeError
from artplug.plugins import load_plugins
from artplug.recipe import resolve
from artplug.registry import Registry
from artplug.testing import digits_recipe, make_state, tiny_batch, tiny_model


class _Transform:
    """A transform that changes nothing."""

    name = "odd-stage"
    stage = "middle"

    class Params(artplug.Params):
        pass

    def __init__(self, params: Any) -> None:
        self.params = params

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


def test_registry_rejects_an_unknown_stage() -> None:
    with pytest.raises(PluginError) as info:
        Registry("transform").add(_Transform, "mine")
    message = str(info.value)
    assert "\n" not in message
    assert "'middle'" in message and "activation, sites, features, head" in message
    assert "mine" in message


def test_registry_accepts_a_declared_stage_and_none() -> None:
    registry = Registry("transform")
    staged = type("Staged", (_Transform,), {"name": "staged", "stage": "features"})
    unstaged = type("Unstaged", (_Transform,), {"name": "unstaged", "stage": None})
    registry.add(staged, "mine")
    registry.add(unstaged, "mine")
    assert {"staged", "unstaged"} <= {entry.name for entry in registry}


def test_transforms_out_of_stage_order_fail_in_resolve(plugin_set: Any) -> None:
    raw = digits_recipe(
        transform=[{"use": "hypersphere"}, {"use": "smooth-activation"}],  # type: ignore[list-item]
    )
    with pytest.raises(RecipeError) as info:
        resolve(raw, plugin_set.registries)
    message = str(info.value)
    assert "smooth-activation must come before 'hypersphere' (head)" in message
    assert "activation -> sites -> features -> head" in message


def test_moat_loads_without_the_slat_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTPLUG_DISABLE_PLUGINS", "slat")
    plugins = load_plugins()
    assert "slat" not in plugins.plugins
    assert "moat" in plugins.plugins
    moat = plugins.registries.of("perturbation").get("moat").cls
    with pytest.raises(KeyError):
        plugins.registries.of("transform").get("latent-sites")
    x, y = tiny_batch()
    threat = artplug.Threat("linf", 0.1)
    for stage in (0, 1, 2):
        model = tiny_model().eval()
        perturbation = moat(moat.Params(stage=stage, multi_steps=2))
        x_adv = perturbation.generate(model, x, y, make_state(model, threat))
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= threat.eps + 1e-6
        if stage == 0:
            assert torch.equal(x_adv, x)
