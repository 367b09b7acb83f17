"""Tests of plugins/smooth.py: the ``smooth-activation`` transform (SAT, Xie et al. 2020).

Every activation is checked against its formula written out here with ``math`` on hand-picked
points (values and derivatives), the replacement against the built-in architectures, a
torchvision ResNet and functional-ReLU models, and the backward-only mode against
``σ(βx)·g`` inside its scope and ReLU's ``1[x > 0]·g`` outside, with the phase driven by
``artplug.phase.running``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from artplug_plugins.hypersphere import CosineHead, Hypersphere
from artplug_plugins.smooth import ReLUSmoothBackward, SmoothActivation, SmoothReLU
from pydantic import ValidationError
from torch import Tensor, nn

import artplug
from artplug.engine import build
from artplug.models import build_model
from artplug.phase import PHASES, running
from artplug.recipe import dumps_toml, load_recipe, resolve
from artplug.registry import Registry
from artplug.testing import check_model_transform, digits_recipe
from artplug.workflows import train_and_evaluate

# Hand-picked points: both signs, zero, and values near and away from the kink. Their images
# stay below softplus's linear threshold (beta * x <= 20) for the betas used here.
POINTS = [-3.0, -1.5, -0.5, -0.1, 0.0, 0.1, 0.5, 1.5, 3.0]
# An arbitrary incoming gradient, so that the tests see g multiplied in, not just the derivative.
UPSTREAM = [0.7, -1.2, 2.0, 0.3, -0.8, 1.1, -0.4, 0.9, 1.6]
SQRT_2PI = math.sqrt(2.0 * math.pi)
GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softplus(x: float, beta: float = 1.0) -> float:
    return math.log1p(math.exp(beta * x)) / beta


def transform(**params: Any) -> SmoothActivation:
    return SmoothActivation(SmoothActivation.Params(**params))


class OneReLU(nn.Module):
    """The smallest model with a ReLU module: forward(x) = act(x)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x)


def activation(**params: Any) -> nn.Module:
    """The module that ``smooth-activation`` puts in place of one ``nn.ReLU``."""
    model = transform(**params).apply(OneReLU())
    assert isinstance(model, OneReLU)
    return model.act


def value_and_derivative(module: nn.Module, points: list[float]) -> tuple[Tensor, Tensor]:
    """f(x) and g·f'(x) at ``points`` (float64), the derivative taken by autograd."""
    x = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    y = module(x)
    upstream = torch.tensor(UPSTREAM[: len(points)], dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, upstream)
    return y.detach(), grad / upstream


def expect(f: Callable[[float], float]) -> Tensor:
    return torch.tensor([f(x) for x in POINTS], dtype=torch.float64)


# ---------------------------------------------------------------- activations against formulas


def gelu_tanh(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(GELU_K * (x + GELU_C * x**3)))


def gelu_tanh_derivative(x: float) -> float:
    t = math.tanh(GELU_K * (x + GELU_C * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x * x)


def mish_derivative(x: float) -> float:
    t = math.tanh(softplus(x))
    return t + x * (1.0 - t * t) * sigmoid(x)


FORMULAS: dict[str, tuple[dict[str, Any], Callable[[float], float], Callable[[float], float]]] = {
    "silu": (
        {"activation": "silu"},
        lambda x: x * sigmoid(x),
        lambda x: sigmoid(x) * (1.0 + x * (1.0 - sigmoid(x))),
    ),
    "gelu-exact": (
        {"activation": "gelu", "gelu_approximate": "none"},
        lambda x: 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))),
        lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))) + x * math.exp(-x * x / 2) / SQRT_2PI,
    ),
    "gelu-tanh": ({"activation": "gelu"}, gelu_tanh, gelu_tanh_derivative),
    "softplus": ({"activation": "softplus"}, softplus, sigmoid),
    "softplus-beta-3": (
        {"activation": "softplus", "softplus_beta": 3.0},
        lambda x: softplus(x, 3.0),
        lambda x: sigmoid(3.0 * x),
    ),
    "elu": (
        {"activation": "elu"},
        lambda x: x if x > 0 else math.exp(x) - 1.0,
        lambda x: 1.0 if x > 0 else math.exp(x),
    ),
    "mish": ({"activation": "mish"}, lambda x: x * math.tanh(softplus(x)), mish_derivative),
}


@pytest.mark.parametrize("case", sorted(FORMULAS))
def test_activation_value_and_derivative_match_formula(case: str) -> None:
    params, f, derivative = FORMULAS[case]
    value, grad = value_and_derivative(activation(**params), POINTS)
    torch.testing.assert_close(value, expect(f), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expect(derivative), rtol=1e-10, atol=1e-12)


def test_gelu_tanh_and_exact_differ() -> None:
    # The two forms agree to ~1e-3, not to round-off: the parameter must reach the module.
    exact, _ = value_and_derivative(activation(activation="gelu", gelu_approximate="none"), POINTS)
    approx, _ = value_and_derivative(activation(activation="gelu"), POINTS)
    assert 1e-6 < (exact - approx).abs().max() < 1e-2


# SmoothReLU with b = 2 (β = 4): f(x) = x − log(1 + 4x)/4 for x > 0, else 0.
SMOOTHRELU_B2 = {
    -1.0: (0.0, 0.0),
    0.0: (0.0, 0.0),
    0.5: (0.5 - math.log(3.0) / 4.0, 2.0 / 3.0),  # f'(x) = βx / (βx + 1) = 2 / 3
    1.0: (1.0 - math.log(5.0) / 4.0, 4.0 / 5.0),
    2.0: (2.0 - math.log(9.0) / 4.0, 8.0 / 9.0),
}


def test_smoothrelu_values_and_derivative_at_hand_picked_points() -> None:
    module = activation(activation="smoothrelu", smoothrelu_b=2.0)
    assert isinstance(module, SmoothReLU)
    points = list(SMOOTHRELU_B2)
    value, grad = value_and_derivative(module.double(), points)
    expected = torch.tensor([SMOOTHRELU_B2[x] for x in points], dtype=torch.float64)
    torch.testing.assert_close(value, expected[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected[:, 1], rtol=1e-12, atol=1e-12)
    # Written as the official relu(x − log(β|x| + 1)/β) at the same points.
    official = [max(0.0, x - math.log(4.0 * abs(x) + 1.0) / 4.0) for x in points]
    torch.testing.assert_close(value, torch.tensor(official, dtype=torch.float64))


def test_smoothrelu_b_is_learnable_and_gets_the_analytic_gradient() -> None:
    module = activation(activation="smoothrelu", smoothrelu_b=2.0).double()
    assert isinstance(module, SmoothReLU)
    assert [name for name, _ in module.named_parameters()] == ["b"]
    x = torch.tensor([-1.0, 0.5, 1.0], dtype=torch.float64)
    module(x).sum().backward()
    # d f / d b = 2b · (log(1 + βx)/β² − x/(β(βx + 1))) for x > 0, 0 otherwise; b = 2, β = 4.
    expected = sum(
        4.0 * (math.log1p(4.0 * v) / 16.0 - v / (4.0 * (4.0 * v + 1.0))) for v in (0.5, 1.0)
    )
    assert module.b.grad is not None
    assert module.b.grad.item() == pytest.approx(expected, rel=1e-12)


def test_smoothrelu_default_starts_at_b_20_and_can_be_frozen() -> None:
    module = activation(activation="smoothrelu")
    assert isinstance(module, SmoothReLU) and module.b.item() == 20.0 and module.b.requires_grad
    # β = 400: at x = 0.01 the derivative is βx/(βx + 1) = 0.8.
    _, grad = value_and_derivative(module.double(), [0.01])
    assert grad.item() == pytest.approx(0.8, rel=1e-9)
    frozen = activation(activation="smoothrelu", smoothrelu_learnable=False)
    assert isinstance(frozen, SmoothReLU) and not frozen.b.requires_grad
    assert "learnable=False" in repr(frozen)


def test_smoothrelu_in_bfloat16_is_computed_in_float32() -> None:
    module = activation(activation="smoothrelu")
    x = torch.tensor([0.003, 0.02, 0.7], dtype=torch.bfloat16)
    out = module(x)
    assert out.dtype == torch.bfloat16
    reference = [v - math.log1p(400.0 * v) / 400.0 for v in x.double().tolist()]
    torch.testing.assert_close(
        out.double(), torch.tensor(reference, dtype=torch.float64).to(torch.bfloat16).double()
    )


# ---------------------------------------------------------------- replacement coverage


def relu_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.ReLU)]


def builtin(arch: str) -> nn.Module:
    torch.manual_seed(0)
    extra = {"depth": 10, "width": 2} if arch == "wide-resnet" else {}
    return build_model(
        arch,
        in_channels=3,
        num_classes=10,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        **extra,
    ).eval()


def torchvision_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "small-cnn": lambda: builtin("small-cnn"),
    "preact-resnet18": lambda: builtin("preact-resnet18"),
    "wide-resnet": lambda: builtin("wide-resnet"),
    "torchvision-resnet18": torchvision_resnet18,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_relu_module_is_replaced_out_of_place(name: str) -> None:
    model = MODELS[name]()
    before = relu_modules(model)
    assert before
    if name == "torchvision-resnet18":
        assert all(m.inplace for m in before)  # torchvision's ReLUs are in-place
    reference = copy.deepcopy(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sat = transform(activation="silu")
    out = sat.apply(model)
    assert out is model  # module swapping keeps the user's object and class
    assert relu_modules(model) == []
    assert sat.replaced_modules == len(before) and sat.replaced_calls == 0
    silus = [m for m in model.modules() if isinstance(m, nn.SiLU)]
    assert len(silus) == len(before) and not any(m.inplace for m in silus)
    with torch.no_grad():
        smooth, plain = model(x), reference(x)
    assert smooth.shape == plain.shape == (2, 10)
    assert not torch.allclose(smooth, plain)  # the activation really changed
    assert set(model.state_dict()) == set(reference.state_dict())


def test_a_shared_relu_module_stays_shared() -> None:
    model = torchvision_resnet18()
    block = model.get_submodule("layer1.0")
    transform(activation="smoothrelu").apply(model)
    # torchvision's BasicBlock calls its one `relu` twice: one SmoothReLU, one b.
    assert isinstance(block.relu, SmoothReLU)
    assert "layer1.0.relu.b" in model.state_dict()


def test_near_relu_softplus_reproduces_the_relu_network() -> None:
    model = builtin("preact-resnet18")
    reference = copy.deepcopy(model)
    transform(activation="softplus", softplus_beta=1e5).apply(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0.0, atol=1e-3)


# ---------------------------------------------------------------- functional ReLU through fx


class FunctionalNet(nn.Module):
    """ReLU called every functional way, including in-place ones whose input is reused."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)
        self.num_classes = 3

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.lin(x))
        b = torch.relu(a - 0.5)
        c = (b - 0.3).relu()
        d = F.relu(c - 0.2, inplace=True)
        e = c - 0.1
        e.relu_()  # the result is unused: `e` below must read the activated values
        return self.fc(e + d + torch.nn.functional.relu(x))


def functional_reference(
    model: FunctionalNet, x: Tensor, act: Callable[[Tensor], Tensor]
) -> Tensor:
    """FunctionalNet's forward with every ReLU written as ``act``, by hand."""
    a = act(model.lin(x))
    b = act(a - 0.5)
    c = act(b - 0.3)
    d = act(c - 0.2)
    e = act(c - 0.1)
    return model.fc(e + d + act(x))


def test_functional_relu_calls_are_replaced_through_fx() -> None:
    torch.manual_seed(0)
    model = FunctionalNet()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(x.clone())
        torch.testing.assert_close(plain, functional_reference(model, x, torch.relu))
    sat = transform(activation="silu")
    out = sat.apply(model)
    assert isinstance(out, torch.fx.GraphModule)
    assert type(out).__name__ == "FunctionalNet" and out.num_classes == 3
    assert sat.replaced_calls == 6 and sat.replaced_modules == 0
    relu_targets = (F.relu, torch.relu, torch.relu_)
    assert not [
        n
        for n in out.graph.nodes
        if n.target in relu_targets or (n.op == "call_method" and "relu" in str(n.target))
    ]
    assert set(out.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out(x), functional_reference(model, x, F.silu))
    # The copy trains: parameters are shared with the traced submodules.
    out(x).sum().backward()
    assert out.get_submodule("lin").weight.grad is not None


def test_in_place_relu_module_whose_input_is_reused_is_redirected() -> None:
    class SideEffect(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: Tensor) -> Tensor:
            h = self.lin(x)
            self.act(h)  # relies on the in-place write
            return h * 2.0

    torch.manual_seed(0)
    model = SideEffect()
    x = torch.randn(4, 3)
    out = transform(activation="elu").apply(model)
    with torch.no_grad():
        torch.testing.assert_close(out(x), F.elu(model.lin(x)) * 2.0)


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it, and it calls F.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.lin(x))
        if h.sum() > 0:
            h = F.relu(h - 1.0)
        return h


class ModeDependent(nn.Module):
    """Traceable, but the graph would freeze the value of self.training."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(F.relu(self.lin(x)), 0.5, self.training)


def test_untraceable_functional_relu_is_an_error_naming_the_class() -> None:
    with pytest.raises(artplug.RecipeError) as info:
        transform().apply(Branchy())
    message = info.value.one_line()
    assert "Branchy" in message and "torch.fx cannot trace" in message
    assert 'untraceable = "warn"' in message


def test_untraceable_functional_relu_can_be_downgraded_to_a_warning() -> None:
    model = Branchy()
    sat = transform(untraceable="warn")
    with pytest.warns(RuntimeWarning, match="calls ReLU as a function in Branchy"):
        out = sat.apply(model)
    assert out is model and isinstance(model.act, nn.SiLU) and sat.replaced_modules == 1


def test_forward_that_depends_on_the_training_flag_is_not_traced() -> None:
    with pytest.raises(artplug.RecipeError, match="training flag"):
        transform().apply(ModeDependent())


def test_untraceable_model_with_relu_modules_only_is_fine() -> None:
    class BranchyModules(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x: Tensor) -> Tensor:
            return self.act(x) if x.sum() > 0 else -x

    model = BranchyModules()
    assert transform().apply(model) is model and isinstance(model.act, nn.SiLU)


def test_model_without_relu_is_a_recipe_error() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with pytest.raises(artplug.RecipeError, match="has no ReLU to replace"):
        transform().apply(model)
    twice = builtin("small-cnn")
    transform().apply(twice)
    with pytest.raises(artplug.RecipeError, match="listed twice"):
        transform().apply(twice)


def test_hypersphere_after_fx_keeps_working() -> None:
    torch.manual_seed(0)
    model = transform(activation="gelu").apply(FunctionalNet())
    model = Hypersphere(Hypersphere.Params()).apply(model)
    assert isinstance(model.fc, CosineHead)
    with torch.no_grad():
        out = model(torch.randn(4, 4))
    assert out.shape == (4, 3) and out.abs().max() <= 1.0 + 1e-6


# ---------------------------------------------------------------- backward-only mode

SCOPE_PHASES = {
    "attack": {"attack"},
    "update": {"update-clean", "update-adv", "update"},
    "both": {"attack", "update-clean", "update-adv", "update"},
}
BETA = 3.0


def backward_only(scope: str, **params: Any) -> nn.Module:
    params = {"activation": "softplus", "softplus_beta": BETA, **params}
    module = activation(backward_only=True, scope=scope, **params)
    assert isinstance(module, ReLUSmoothBackward)
    return module


@pytest.mark.parametrize("scope", sorted(SCOPE_PHASES))
@pytest.mark.parametrize("phase", PHASES)
def test_backward_only_gradient_is_smooth_exactly_in_scope(scope: str, phase: str) -> None:
    module = backward_only(scope)
    x = torch.tensor(POINTS, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(UPSTREAM, dtype=torch.float64)
    with running(phase):  # type: ignore[arg-type]
        y = module(x)
    # The forward is ReLU to the bit, whatever the phase.
    assert torch.equal(y, torch.clamp(x.detach(), min=0.0))
    # The backward runs after the phase ended (phase "eval"), as in the engine.
    (grad,) = torch.autograd.grad(y, x, g)
    if phase in SCOPE_PHASES[scope]:
        expected = [u * sigmoid(BETA * v) for v, u in zip(POINTS, UPSTREAM, strict=True)]
    else:
        expected = [u * (1.0 if v > 0 else 0.0) for v, u in zip(POINTS, UPSTREAM, strict=True)]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64))


def test_backward_only_phase_is_the_forward_one() -> None:
    module = backward_only("attack")
    x = torch.tensor([-0.5, 0.5], dtype=torch.float64, requires_grad=True)
    y = module(x)  # "eval" forward ...
    with running("attack"):  # ... differentiated inside an attack: still ReLU's derivative
        (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.tolist() == [0.0, 1.0]


def test_backward_only_uses_the_chosen_activations_derivative() -> None:
    module = backward_only("both", activation="silu", softplus_beta=1.0)
    x = torch.tensor(POINTS, dtype=torch.float64, requires_grad=True)
    with running("update-adv"):
        y = module(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, expect(lambda v: sigmoid(v) * (1.0 + v * (1.0 - sigmoid(v)))))


def test_backward_only_model_forward_equals_the_relu_model() -> None:
    model = builtin("wide-resnet")
    reference = copy.deepcopy(model)
    transform(activation="softplus", softplus_beta=10.0, backward_only=True).apply(model)
    assert relu_modules(model) == []
    x = torch.rand(2, 3, 32, 32)
    for phase in PHASES:
        with running(phase), torch.no_grad():
            assert torch.equal(model(x), reference(x)), phase


def test_backward_only_attack_gradient_differs_from_relu_only_in_scope() -> None:
    model = builtin("small-cnn")
    reference = copy.deepcopy(model)
    transform(activation="softplus", softplus_beta=2.0, backward_only=True, scope="update").apply(
        model
    )
    x = torch.rand(3, 3, 32, 32)

    def input_grad(net: nn.Module, phase: str) -> Tensor:
        leaf = x.clone().requires_grad_(True)
        with running(phase):  # type: ignore[arg-type]
            out = net(leaf).sum()
        (grad,) = torch.autograd.grad(out, leaf)
        return grad

    assert torch.equal(input_grad(model, "attack"), input_grad(reference, "attack"))
    assert torch.equal(input_grad(model, "eval"), input_grad(reference, "eval"))
    assert not torch.allclose(input_grad(model, "update-adv"), input_grad(reference, "update-adv"))


# ---------------------------------------------------------------- params, contract, registry


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"softplus_beta": 2.0}, "softplus_beta = 2.0 only applies to activation = 'softplus'"),
        ({"activation": "silu", "gelu_approximate": "none"}, "only applies to activation"),
        ({"smoothrelu_b": 5.0}, "smoothrelu_b"),
        ({"scope": "update"}, "only applies with backward_only"),
        ({"activation": "smoothrelu", "backward_only": True}, "b would never be trained"),
        ({"softplus_beta": 0.0, "activation": "softplus"}, "greater than 0"),
        ({"activation": "relu"}, "Input should be"),
        ({"inplace": True}, "Extra inputs"),
    ],
)
def test_params_reject_settings_that_cannot_take_effect(params: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        SmoothActivation.Params(**params)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"activation": "smoothrelu"},
        {"activation": "gelu", "gelu_approximate": "none"},
        {"activation": "softplus", "softplus_beta": 10.0, "backward_only": True, "scope": "update"},
    ],
)
def test_contract(params: dict) -> None:
    check_model_transform(SmoothActivation, params)


def test_registered_through_the_entry_point(plugin_set) -> None:
    entry = plugin_set.registries.transform.get("smooth-activation")
    assert entry.cls is SmoothActivation and entry.plugin == "smooth"
    registry = Registry("transform")
    registry.add(SmoothActivation, plugin="test")
    assert registry.get("smooth-activation").description.startswith("SAT")


def sat_recipe(transforms: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    return digits_recipe(transform=transforms, **sections)  # type: ignore[arg-type]


def test_check_recipe_requires_smooth_activation_first(plugin_set) -> None:
    registries = plugin_set.registries
    resolve(
        sat_recipe(
            [{"use": "smooth-activation"}, {"use": "hypersphere"}], loss=[{"use": "he-margin"}]
        ),
        registries,
    )
    with pytest.raises(artplug.RecipeError) as info:
        resolve(
            sat_recipe(
                [{"use": "hypersphere"}, {"use": "smooth-activation"}], loss=[{"use": "he-margin"}]
            ),
            registries,
        )
    mine = [p for p in info.value.problems if p.startswith("transform[1] (smooth-activation)")]
    assert len(mine) == 1 and "smooth-activation must come before" in mine[0]
    assert "'hypersphere'" in mine[0]
    with pytest.raises(artplug.RecipeError, match="listed 2 times"):
        resolve(sat_recipe([{"use": "smooth-activation"}] * 2), registries)


@pytest.mark.parametrize("perturbation", ["none", "free"])
def test_attack_scope_without_an_attack_pass_is_rejected(plugin_set, perturbation: str) -> None:
    sat = {
        "use": "smooth-activation",
        "activation": "softplus",
        "backward_only": True,
        "scope": "attack",
    }
    with pytest.raises(artplug.RecipeError, match="smooths nothing"):
        resolve(sat_recipe([sat], perturbation={"use": perturbation}), plugin_set.registries)
    resolve(
        sat_recipe([{**sat, "scope": "both"}], perturbation={"use": perturbation}),
        plugin_set.registries,
    )


def test_resolved_recipe_validates_again(plugin_set, tmp_path) -> None:
    raw = sat_recipe([{"use": "smooth-activation", "activation": "smoothrelu"}])
    resolved = resolve(raw, plugin_set.registries)
    path = tmp_path / "resolved.toml"
    path.write_text(resolved.to_toml())
    again = load_recipe(path, plugin_set.registries)
    assert again.transforms[0].params == resolved.transforms[0].params
    assert "softplus_beta" in dumps_toml(resolved.to_dict())


# ---------------------------------------------------------------- two-step training runs

FAST_EVAL = {"every_epochs": 0, "final_attacks": ["clean"], "test_examples": 16, "sanity": False}


@pytest.mark.parametrize(
    ("transforms", "losses"),
    [
        ([{"use": "smooth-activation"}], [{"use": "cross-entropy"}]),
        (
            [{"use": "smooth-activation", "activation": "smoothrelu"}, {"use": "hypersphere"}],
            [{"use": "he-margin"}],
        ),
        (
            [
                {
                    "use": "smooth-activation",
                    "activation": "softplus",
                    "softplus_beta": 10.0,
                    "backward_only": True,
                    "scope": "update",
                }
            ],
            [{"use": "cross-entropy"}],
        ),
    ],
    ids=["pgd-silu", "pgd-smoothrelu-he", "pgd-backward-only"],
)
def test_two_step_training_run(plugin_set, tmp_path, transforms, losses) -> None:
    raw = sat_recipe(
        transforms, perturbation={"use": "pgd", "steps": 2}, loss=losses, eval=FAST_EVAL
    )
    components = build(resolve(raw, plugin_set.registries))
    assert relu_modules(components.model) == []
    smoothrelus = [m for m in components.model.modules() if isinstance(m, SmoothReLU)]
    before = [m.b.item() for m in smoothrelus]
    result = train_and_evaluate(components, run_dir=tmp_path / "run", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0
    if smoothrelus:
        # b is a trained parameter: two SGD steps moved it.
        assert isinstance(components.model.fc, CosineHead)
        assert [m.b.item() for m in smoothrelus] != before


@pytest.mark.parametrize(
    "params",
    [
        {"activation": "smoothrelu"},
        {"activation": "softplus", "softplus_beta": 10.0, "backward_only": True},
    ],
    ids=["smoothrelu", "backward-only"],
)
def test_bfloat16_autocast_step_has_finite_gradients(params: dict) -> None:
    model = builtin("small-cnn").train()
    transform(**params).apply(model)
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16), running("update-adv"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
def test_cuda_amp_channels_last_run(plugin_set, run_tmp) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for sat in (
        {"use": "smooth-activation", "activation": "smoothrelu"},
        {
            "use": "smooth-activation",
            "activation": "softplus",
            "softplus_beta": 10.0,
            "backward_only": True,
        },
    ):
        raw = sat_recipe(
            [sat],
            run={"name": "sat-gpu", "epochs": 1, "device": "cuda", "log_every": 1},
            eval=FAST_EVAL,
        )
        c = build(resolve(raw, plugin_set.registries))
        assert c.amp_dtype == torch.bfloat16 and c.channels_last
        result = train_and_evaluate(c, run_dir=run_tmp / str(sat["activation"]), max_steps=3)
        assert 0.0 <= result.final["clean"] <= 1.0
