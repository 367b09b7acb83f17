"""Tests of plugins/slat.py: the ``latent-sites`` transform and the ``slat`` perturbation.

The formulas are checked on a hand-made model ``x -> 1x1 conv (site) -> linear`` whose input and
latent gradients have a closed form (written out below without autograd), and the domain
constraint on a feature map whose clipped values are worked out by hand.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from artplug_plugins.slat import DEFAULT_SITES, LatentSite, LatentSites, Slat, latent_sites
from torch import Tensor, nn

import artplug
import artplug.testing
from artplug.engine import build, train_step
from artplug.errors import RecipeError
from artplug.kinds import Progress
from artplug.models import build_model
from artplug.phase import running
from artplug.recipe import resolve
from artplug.testing import check_model_transform, check_perturbation, digits_recipe
from artplug.workflows import train_and_evaluate

EPS = 0.1
ETA = 8 / 255


class ConvHead(nn.Module):
    """``logits = V · flatten(w_c · x) + b``: a 1x1 conv (2 channels) on 1x2x2 inputs, then fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1, bias=False).double()
        self.fc = nn.Linear(8, 3).double()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.5, -0.7], dtype=torch.float64).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.randn(3, 8, generator=gen, dtype=torch.float64))
            self.fc.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).flatten(1))


def toy(**site_params: Any) -> ConvHead:
    model = ConvHead().eval()
    LatentSites(LatentSites.Params(sites=["conv"], **site_params)).apply(model)
    return model


def toy_batch() -> tuple[Tensor, Tensor]:
    # Pixels at 0 and 1 so that the [0, 1] clip of the input step shows.
    x = torch.tensor(
        [[[[0.0, 0.3], [0.95, 1.0]]], [[[0.5, 0.02], [1.0, 0.6]]], [[[0.2, 0.8], [0.0, 0.4]]]],
        dtype=torch.float64,
    )
    return x, torch.tensor([0, 2, 1])


def hand_gradients(model: ConvHead, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(h, dL/dh, dL/dx) of the summed cross-entropy, from the chain rule written out."""
    with torch.no_grad():
        w = model.conv.weight.view(2)
        h = torch.stack([w[0] * x[:, 0], w[1] * x[:, 0]], dim=1)  # (N, 2, 2, 2)
        logits = h.flatten(1) @ model.fc.weight.T + model.fc.bias
        residual = torch.softmax(logits, dim=1) - F.one_hot(y, 3).double()
        grad_h = (residual @ model.fc.weight).view_as(h)
        grad_x = (w[0] * grad_h[:, 0] + w[1] * grad_h[:, 1]).unsqueeze(1)
    return h, grad_h, grad_x


def state(model: nn.Module, eps: float = EPS, norm: str = "linf") -> artplug.StepState:
    return artplug.StepState(
        progress=Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100),
        knobs={},
        model=model,
        threat=artplug.Threat(norm, eps),  # type: ignore[arg-type]
    )


def slat(**params: Any) -> Slat:
    return Slat(Slat.Params(**params))


def attack(technique: Slat, model: nn.Module, x: Tensor, y: Tensor, **kw: Any) -> Tensor:
    with running("attack"):
        return technique.generate(model, x, y, state(model, **kw))


def site_of(model: nn.Module, name: str) -> LatentSite:
    site = getattr(model.get_submodule(name), "artplug_latent_site", None)
    assert isinstance(site, LatentSite)
    return site


# ---------------------------------------------------------------- the perturbation's formulas


def test_input_and_latent_steps_match_the_hand_computed_gradients() -> None:
    model = toy()
    x, y = toy_batch()
    _, grad_h, grad_x = hand_gradients(model, x, y)
    assert (grad_h != 0).all() and (grad_x != 0).all()  # every sign is informative

    x_adv = attack(slat(), model, x, y)

    expected_x = (x + 0.9 * EPS * grad_x.sign()).clamp(0.0, 1.0)
    torch.testing.assert_close(x_adv, expected_x)
    assert x_adv.max() == 1.0 and x_adv.min() == 0.0  # the clip to the image range acted
    # 2 alpha = 1.8 > 1: the clip to ±eta leaves eta * sign(g).
    torch.testing.assert_close(site_of(model, "conv").delta, ETA * grad_h.sign())


def test_latent_multiplier_below_one_is_not_clipped() -> None:
    model = toy()
    x, y = toy_batch()
    _, grad_h, _ = hand_gradients(model, x, y)
    attack(slat(latent_multiplier=0.5, latent_eps=0.2), model, x, y)
    torch.testing.assert_close(site_of(model, "conv").delta, 0.5 * 0.2 * grad_h.sign())


def test_alpha_above_one_is_clipped_to_the_ball() -> None:
    model = toy()
    x = torch.full((3, 1, 2, 2), 0.5, dtype=torch.float64)
    _, y = toy_batch()
    x_adv = attack(slat(alpha=1.5), model, x, y)
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, EPS))


def test_l2_threat_takes_the_normalised_gradient_step() -> None:
    model = toy()
    x = torch.full((3, 1, 2, 2), 0.5, dtype=torch.float64)
    _, y = toy_batch()
    _, _, grad_x = hand_gradients(model, x, y)
    x_adv = attack(slat(), model, x, y, eps=0.2, norm="l2")
    norms = grad_x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_adv, x + 0.9 * 0.2 * grad_x / norms)


def test_one_backward_gives_both_gradients_and_no_parameter_grads() -> None:
    model = toy()
    passes = []

    def count_backward(module: nn.Module, args: Any, output: Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda grad: passes.append(1))

    model.fc.register_forward_hook(count_backward)
    x, y = toy_batch()
    attack(slat(), model, x, y)
    assert len(passes) == 1  # the head was differentiated once for input AND latent gradients
    assert all(p.grad is None for p in model.parameters())
    assert site_of(model, "conv").delta is not None


def test_generate_clears_the_previous_step_and_returns_a_detached_batch() -> None:
    model = toy()
    x, y = toy_batch()
    site = site_of(model, "conv")
    site.delta = torch.full((7, 2, 2, 2), 9.0, dtype=torch.float64)
    x_adv = attack(slat(), model, x, y)
    assert not x_adv.requires_grad and not x.requires_grad
    assert site.delta is not None and site.delta.shape == (3, 2, 2, 2)
    assert site.delta.abs().max() <= ETA


def test_he_scale_does_not_change_the_signs_but_is_used() -> None:
    model = toy()
    setattr(model, "artplug_attack_logit_scale", 10.0)  # noqa: B010
    x, y = toy_batch()
    with torch.no_grad():
        h = model.conv(x)
        residual = torch.softmax(10.0 * model(x), 1) - F.one_hot(y, 3).double()
        grad_h = (10.0 * residual @ model.fc.weight).view_as(h)
    attack(slat(), model, x, y)
    torch.testing.assert_close(site_of(model, "conv").delta, ETA * grad_h.sign())


# ---------------------------------------------------------------- the site in each phase


def identity_site_model(**params: Any) -> nn.Module:
    model = nn.Sequential()
    model.add_module("body", nn.Identity())
    LatentSites(LatentSites.Params(sites=["body"], **params)).apply(model)
    return model


# Channel 0 spans [1, 4], channel 1 spans [-1, 5] over the four positions.
FEATURES = torch.tensor([[[[1.0, 4.0], [2.0, 3.0]], [[-1.0, 0.0], [5.0, 2.0]]]])
DELTA = torch.tensor([[[[0.5, 0.5], [-2.0, 0.5]], [[-1.0, 1.0], [1.0, -1.0]]]])
# h + delta = [[1.5, 4.5], [0, 3.5]] -> clip to [1, 4]; [[-2, 1], [6, 1]] -> clip to [-1, 5].
CONSTRAINED = torch.tensor([[[[1.5, 4.0], [1.0, 3.5]], [[-1.0, 1.0], [5.0, 1.0]]]])


def test_domain_constraint_clips_to_each_channels_spatial_range() -> None:
    model = identity_site_model()
    site_of(model, "body").delta = DELTA
    with running("update-adv"):
        out = model(FEATURES)
    torch.testing.assert_close(out, CONSTRAINED)


def test_domain_constraint_is_per_example() -> None:
    model = identity_site_model()
    # A second example whose channels both span [0, 10]: its bounds differ from the first's.
    second = torch.tensor([[[[0.0, 10.0], [5.0, 5.0]], [[0.0, 10.0], [5.0, 5.0]]]])
    # + DELTA = [[0.5, 10.5], [3, 5.5]] and [[-1, 11], [6, 4]], clipped to [0, 10].
    second_constrained = torch.tensor([[[[0.5, 10.0], [3.0, 5.5]], [[0.0, 10.0], [6.0, 4.0]]]])
    site_of(model, "body").delta = torch.cat([DELTA, DELTA])
    with running("update-adv"):
        out = model(torch.cat([FEATURES, second]))
    torch.testing.assert_close(out, torch.cat([CONSTRAINED, second_constrained]))


def test_without_domain_constraint_the_step_is_added_as_is() -> None:
    model = identity_site_model(domain_constraint=False)
    site_of(model, "body").delta = DELTA
    with running("update-adv"):
        out = model(FEATURES)
    torch.testing.assert_close(out, FEATURES + DELTA)


def test_the_perturbation_is_a_constant_for_autograd() -> None:
    # As the code: the gradient reaches h unclipped, even where the constraint clipped.
    model = identity_site_model()
    site_of(model, "body").delta = DELTA
    h = FEATURES.clone().requires_grad_(True)
    with running("update-adv"):
        model(h).sum().backward()
    assert h.grad is not None
    torch.testing.assert_close(h.grad, torch.ones_like(FEATURES))


@pytest.mark.parametrize("phase", ["eval", "update-clean", "update", "attack"])
def test_site_is_the_identity_outside_update_adv(phase: str) -> None:
    model = identity_site_model()
    site_of(model, "body").delta = DELTA
    with running(phase):  # type: ignore[arg-type]
        out = model(FEATURES)
    assert torch.equal(out, FEATURES)


def test_trained_slat_model_evaluates_unperturbed_in_eval_mode() -> None:
    model = toy()
    x, y = toy_batch()
    with torch.no_grad():
        before = model(x)
    attack(slat(), model, x, y)
    assert site_of(model, "conv").delta is not None
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)  # no phase set: "eval"
        with running("update-adv"):
            assert not torch.equal(model(x), before)  # ... but the step is stored


def test_a_forward_of_another_batch_shape_fails_clearly() -> None:
    model = identity_site_model()
    site_of(model, "body").delta = DELTA
    with running("update-adv"), pytest.raises(RuntimeError, match=r"'body'.*\(1, 2, 2, 2\)"):
        model(torch.cat([FEATURES, FEATURES]))


def test_a_module_called_twice_cannot_be_a_site() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.conv(self.conv(x)).flatten(1))

    model = Twice()
    LatentSites(LatentSites.Params(sites=["conv"])).apply(model)
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(RuntimeError, match="ran twice"):
        attack(slat(), model, x, torch.tensor([0, 1]))


def test_a_flat_output_needs_the_domain_constraint_off() -> None:
    model = nn.Sequential()
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 2))
    LatentSites(LatentSites.Params(sites=["flat"])).apply(model)
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(ValueError, match="no spatial dimensions"):
        attack(slat(), model, x, torch.tensor([0, 1]))


# ---------------------------------------------------------------- the transform


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("small-cnn", {}),
        ("preact-resnet18", {}),
        ("wide-resnet", {"depth": 10, "width": 1}),
    ],
)
def test_default_sites_per_architecture(arch: str, kwargs: dict[str, int]) -> None:
    model = build_model(arch, in_channels=1, num_classes=10, mean=(0.5,), std=(0.5,), **kwargs)
    LatentSites(LatentSites.Params()).apply(model)
    names = tuple(site.name for site in latent_sites(model))
    assert names == DEFAULT_SITES[type(model).__name__]
    # Hooks only: the checkpoint format is unchanged.
    fresh = build_model(arch, in_channels=1, num_classes=10, mean=(0.5,), std=(0.5,), **kwargs)
    assert list(model.state_dict()) == list(fresh.state_dict())


def test_expected_default_table() -> None:
    assert DEFAULT_SITES["PreActResNet18"] == ("conv1", "layer1")
    assert DEFAULT_SITES["WideResNet"] == ("conv1", "block1")


def test_unknown_site_lists_valid_names_with_a_suggestion() -> None:
    model = artplug.testing.tiny_model()
    transform = LatentSites(LatentSites.Params(sites=["layer1", "layr2"]))
    with pytest.raises(ValueError, match=r"'layr2' \(did you mean 'layer2'") as info:
        transform.apply(model)
    assert "layer1.conv" in str(info.value) and "normalize" in str(info.value)


def test_no_default_for_an_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="no default sites for a ConvHead"):
        LatentSites(LatentSites.Params()).apply(ConvHead())


def test_params_reject_repeated_and_empty_names() -> None:
    with pytest.raises(ValueError, match="distinct"):
        LatentSites.Params(sites=["conv1", "conv1"])
    with pytest.raises(ValueError, match="at least one"):
        LatentSites.Params(sites=[])


def test_applying_twice_is_an_error() -> None:
    model = toy()
    with pytest.raises(ValueError, match="already has latent sites"):
        LatentSites(LatentSites.Params(sites=["fc"])).apply(model)


# ---------------------------------------------------------------- contracts


def test_contracts_without_sites() -> None:
    check_perturbation(Slat)
    check_model_transform(LatentSites)


def test_perturbation_contract_on_a_model_with_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = artplug.testing.tiny_model

    def with_sites(num_classes: int = 10, seed: int = 0) -> nn.Module:
        return LatentSites(LatentSites.Params()).apply(plain(num_classes, seed))

    monkeypatch.setattr(artplug.testing, "tiny_model", with_sites)
    check_perturbation(Slat)


# ---------------------------------------------------------------- recipes and the engine


def slat_recipe(**changes: Any) -> dict[str, Any]:
    raw = digits_recipe(
        transform=[{"use": "latent-sites"}],
        perturbation={"use": "slat", "model_mode": "train"},
    )
    raw["eval"] = {"every_epochs": 0, "final_attacks": ["clean"], "test_examples": 16}
    raw["eval"]["sanity"] = False
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"transform": []}, 'add [[transform]] use = "latent-sites"'),
        ({"loss": [{"use": "trades"}]}, "cannot be combined with the trades loss"),
        ({"perturbation": {"use": "fgsm"}}, "only acts through the slat perturbation"),
        (
            {"transform": [{"use": "hypersphere"}, {"use": "latent-sites"}]},
            "latent-sites must come before 'hypersphere'",
        ),
        (
            {"transform": [{"use": "latent-sites"}, {"use": "latent-sites"}]},
            "listed 2 times",
        ),
    ],
)
def test_check_recipe_rejects(plugin_set: Any, changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(RecipeError) as info:
        resolve(slat_recipe(**changes), plugin_set.registries)
    assert reason in str(info.value)


def test_transform_order_comes_from_stages_and_names_both_transforms() -> None:
    # The order rule is data (each transform's stage), checked by the recipe validator; the
    # plugins' own check_recipe no longer names other transforms.
    from types import SimpleNamespace

    from artplug_plugins.aalp import GuidedDropoutTransform
    from artplug_plugins.hypersphere import Hypersphere

    from artplug.recipe import _stage_order_problems

    def spec(index: int, cls: Any) -> Any:
        return SimpleNamespace(cls=cls, use=cls.name, location=f"transform[{index}]")

    wrong = [spec(0, GuidedDropoutTransform), spec(1, LatentSites)]
    (problem,) = _stage_order_problems(wrong)
    assert "latent-sites must come before 'guided-dropout' (features)" in problem, problem
    assert "activation -> sites -> features -> head" in problem, problem
    fine = [spec(0, LatentSites), spec(1, GuidedDropoutTransform), spec(2, Hypersphere)]
    assert _stage_order_problems(fine) == []
    view = artplug.RecipeView(
        transforms=("latent-sites", "guided-dropout", "hypersphere"),
        perturbation="slat",
        losses=("cross-entropy",),
        schedules=(),
        threat=artplug.Threat("linf", 0.1),
    )
    assert list(LatentSites.check_recipe(LatentSites.Params(), view)) == []
    assert list(Slat.check_recipe(Slat.Params(), view)) == []


def test_engine_step_perturbs_only_the_update_adv_forward(plugin_set: Any) -> None:
    c = build(resolve(slat_recipe(), plugin_set.registries))
    layer1 = c.model.get_submodule("layer1")
    seen: list[tuple[str, Tensor, Tensor]] = []
    raw: list[Tensor] = []
    layer1.register_forward_hook(lambda m, a, out: raw.append(out.detach()), prepend=True)
    layer1.register_forward_hook(
        lambda m, a, out: seen.append((artplug.current_phase(), raw.pop(), out.detach()))
    )
    x, y = c.train_loader.x[:32], c.train_loader.y[:32]
    train_step(c, x, y, Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=10))
    assert [phase for phase, _, _ in seen] == ["attack", "update-adv"]
    _, clean, unchanged = seen[0]
    assert torch.equal(clean, unchanged)
    _, before, after = seen[1]
    shift = after - before
    assert shift.abs().max() > 0 and shift.abs().max() <= ETA + 1e-6
    low, high = before.amin((2, 3), keepdim=True), before.amax((2, 3), keepdim=True)
    assert (after >= low - 1e-6).all() and (after <= high + 1e-6).all()
    assert all(p.grad is not None for p in c.model.parameters())  # the update's backward


@pytest.mark.parametrize("he", [False, True], ids=["ce", "hypersphere+he-margin"])
def test_two_step_training_run(plugin_set: Any, tmp_path: Any, he: bool) -> None:
    raw = slat_recipe(schedule=[{"use": "cyclic-lr", "peak_at": 0.4}])
    if he:
        raw["transform"] = [{"use": "latent-sites"}, {"use": "hypersphere"}]
        raw["loss"] = [{"use": "he-margin"}]
    c = build(resolve(raw, plugin_set.registries))
    assert [s.name for s in latent_sites(c.model)] == ["layer1", "layer2"]
    result = train_and_evaluate(c, run_dir=tmp_path / "run", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0
    assert math.isfinite(result.history[-1]["epoch/train_loss"])
