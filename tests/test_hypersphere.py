"""Tests of plugins/hypersphere.py: the ``hypersphere`` transform and the ``he-margin`` loss.

The head is compared with ``cos θ = <W_k/‖W_k‖, φ/‖φ‖>`` computed by hand from the model's own
``features(x)``, the weight update with projected SGD, and the loss with the explicit
``−log(e^{s(cos_y − m)} / (e^{s(cos_y − m)} + Σ_{k≠y} e^{s·cos_k}))``.
"""

from __future__ import annotations

import math
from typing import Any

import pluggy
import pytest
import torch
import torch.nn.functional as F
from artplug_plugins import hypersphere
from artplug_plugins.hypersphere import CosineHead, HEMargin, Hypersphere
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

import artplug
import artplug.hookspecs
from artplug.engine import build
from artplug.models import ImageClassifier, build_model
from artplug.plugins import load_plugins
from artplug.recipe import resolve
from artplug.registry import Registry
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate

NUM_CLASSES = 10


def small_cnn(seed: int = 0, dtype: torch.dtype = torch.float64) -> ImageClassifier:
    torch.manual_seed(seed)
    model = build_model(
        "small-cnn", in_channels=1, num_classes=NUM_CLASSES, mean=(0.3,), std=(0.4,)
    )
    return model.to(dtype).eval()


def he_model(dtype: torch.dtype = torch.float64, **params: Any) -> ImageClassifier:
    model = small_cnn(dtype=dtype)
    Hypersphere(Hypersphere.Params(**params)).apply(model)  # in place
    return model


def head(model: nn.Module) -> CosineHead:
    fc = model.get_submodule("fc")
    assert isinstance(fc, CosineHead), f"fc is a {type(fc).__name__}"
    return fc


def images(n: int = 6, seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return x, y


def unit_rows(t: Tensor) -> Tensor:
    """Rows divided by their Euclidean norm, written out (not F.normalize)."""
    return t / t.pow(2).sum(dim=1, keepdim=True).sqrt()


def scramble_row_norms(head: CosineHead) -> Tensor:
    """Give the stored rows norms 0.5 .. 2.4 (off the sphere); return a copy of them."""
    with torch.no_grad():
        factors = torch.linspace(0.5, 2.4, head.out_features, dtype=head.weight.dtype)
        head.weight.mul_(factors.view(-1, 1))
    return head.weight.detach().clone()


def state_for(model: nn.Module) -> artplug.StepState:
    return artplug.StepState(
        progress=artplug.Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100),
        knobs={},
        model=model,
        threat=artplug.Threat("linf", 0.1),
    )


# ---------------------------------------------------------------- the head against its formula


def test_head_outputs_cosines_of_normalised_features_and_weights() -> None:
    model = he_model()
    assert isinstance(model.fc, CosineHead)
    stored = scramble_row_norms(head(model))
    x, _ = images()
    with torch.no_grad():
        phi = model.features(x)
        out = model(x)
    expected = unit_rows(phi) @ unit_rows(stored).T
    torch.testing.assert_close(out, expected)
    assert out.abs().max() <= 1 + 1e-12
    # The forward re-projected the stored rows.
    torch.testing.assert_close(head(model).weight.detach(), unit_rows(stored))


def test_head_has_no_bias_and_starts_from_the_normalised_old_weight() -> None:
    old = small_cnn().fc.weight.detach().clone()
    model = he_model()
    assert [name for name, _ in head(model).named_parameters()] == ["weight"]
    keys = [k for k in model.state_dict() if k.startswith("fc.")]
    assert keys == ["fc.weight"]
    torch.testing.assert_close(head(model).weight.detach(), unit_rows(old))
    plain = he_model(weight_norm=False)
    torch.testing.assert_close(head(plain).weight.detach(), old)
    assert "bias=False" in repr(head(model)) and "feature_norm=True" in repr(head(model))


@pytest.mark.parametrize("s", [10.0, 15.0, 20.0])
def test_logit_scale_attributes(s: float) -> None:
    model = he_model(s=s)
    assert artplug.logit_scale(model) == s
    assert artplug.attack_logit_scale(model) == s
    unscaled_attack = he_model(s=s, attack_logits="cos")
    assert artplug.logit_scale(unscaled_attack) == s
    assert artplug.attack_logit_scale(unscaled_attack) == 1.0


@pytest.mark.parametrize(
    "feature_norm, weight_norm", [(False, True), (True, False), (False, False)]
)
def test_ablation_flags_match_their_formulas(feature_norm: bool, weight_norm: bool) -> None:
    model = he_model(feature_norm=feature_norm, weight_norm=weight_norm)
    stored = scramble_row_norms(head(model))
    x, _ = images()
    with torch.no_grad():
        phi = model.features(x)
        out = model(x)
    phi_used = unit_rows(phi) if feature_norm else phi
    w_used = unit_rows(stored) if weight_norm else stored
    torch.testing.assert_close(out, phi_used @ w_used.T)
    # Without WN the stored weight is left alone.
    torch.testing.assert_close(head(model).weight.detach(), w_used)


def test_zero_features_give_zero_cosines_not_nan() -> None:
    head = CosineHead(torch.randn(3, 5))
    out = head(torch.zeros(2, 5))
    assert torch.equal(out, torch.zeros(2, 3))


def test_apply_rejects_models_without_a_linear_fc() -> None:
    transform = Hypersphere(Hypersphere.Params())
    with pytest.raises(ValueError, match=r"final nn\.Linear named 'fc'.*no attribute 'fc'"):
        transform.apply(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))

    class ConvHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Conv2d(1, 2, 1)

    with pytest.raises(ValueError, match="'fc' of type Conv2d"):
        transform.apply(ConvHead())
    with pytest.raises(ValueError, match="already a cosine head"):
        transform.apply(transform.apply(small_cnn()))


# ---------------------------------------------------------------- WN as projected SGD


def test_weight_norm_is_a_reprojection_after_each_sgd_step() -> None:
    s = 10.0
    model = he_model(s=s).train()
    x, y = images(n=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.0, weight_decay=0.1)
    F.cross_entropy(s * model(x), y).backward()
    optimizer.step()
    # SGD with weight decay moved the stored rows off the unit sphere ...
    norms = head(model).weight.detach().norm(dim=1)
    assert (norms - 1).abs().min() > 1e-3
    after_step = head(model).weight.detach().clone()
    # ... and the next forward projects them back and uses the projected rows.
    model.eval()
    with torch.no_grad():
        out = model(x)
        phi = model.features(x)
    torch.testing.assert_close(
        head(model).weight.detach().norm(dim=1), torch.ones(NUM_CLASSES, dtype=torch.float64)
    )
    torch.testing.assert_close(head(model).weight.detach(), unit_rows(after_step))
    torch.testing.assert_close(out, unit_rows(phi) @ unit_rows(after_step).T)


def test_weight_gradient_is_taken_at_the_normalised_rows_as_free_parameters() -> None:
    s = 15.0
    model = he_model(s=s)
    scramble_row_norms(head(model))
    x, y = images(n=8)
    F.cross_entropy(s * model(x), y).backward()
    grad = head(model).weight.grad
    assert grad is not None
    # Independent: CE(s * phi_hat @ W_hat^T) with W_hat a free leaf at the projected rows.
    with torch.no_grad():
        phi_hat = unit_rows(model.features(x))
    w_hat = head(model).weight.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(s * F.linear(phi_hat, w_hat), y), w_hat)
    torch.testing.assert_close(grad, expected)
    # Closed form of the same gradient: s / N * (softmax(s cos) - onehot)^T phi_hat.
    with torch.no_grad():
        probs = torch.softmax(s * phi_hat @ w_hat.T, dim=1)
        onehot = F.one_hot(y, NUM_CLASSES).to(probs.dtype)
        closed = s / len(x) * (probs - onehot).T @ phi_hat
    torch.testing.assert_close(grad, closed)
    # A reparametrisation (weight_norm) would give rows orthogonal to W_hat; this one is not.
    radial = (grad * w_hat.detach()).sum(dim=1)
    assert radial.abs().max() > 1e-3


def test_two_forwards_before_backward_keep_the_first_graph_valid() -> None:
    # TRADES and ALP run clean and adversarial forwards, then one backward: the second forward's
    # projection must not invalidate the first graph (no autograd version bump).
    model = he_model().train()
    x, y = images(n=8)
    scramble_row_norms(head(model))
    clean = model(x)
    adv = model((x + 0.05).clamp(0, 1))
    (F.cross_entropy(10 * clean, y) + F.mse_loss(clean, adv)).backward()
    assert head(model).weight.grad is not None and torch.isfinite(head(model).weight.grad).all()


def test_head_under_cpu_bf16_autocast_and_channels_last() -> None:
    model = he_model(dtype=torch.float32).train()
    x, y = images(n=8, dtype=torch.float32)
    with torch.no_grad():
        reference = model.eval()(x)
    fast = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), reference)
    fast.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
        loss = HEMargin(HEMargin.Params())(
            artplug.Outputs(x, y, x, logits_clean=None, logits_adv=out), state_for(fast)
        )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert out.float().abs().max() <= 1 + 1e-2
    loss.backward()
    assert head(fast).weight.dtype == torch.float32
    torch.testing.assert_close(head(fast).weight.detach().norm(dim=1), torch.ones(NUM_CLASSES))


# ---------------------------------------------------------------- he-margin against its formula

COSINES = torch.tensor(
    [[0.9, -0.2, 0.1], [0.3, 0.35, -0.8], [-0.5, 0.0, 0.95], [0.2, 0.6, -1.0]],
    dtype=torch.float64,
)
OTHER = torch.tensor(
    [[0.1, 0.7, -0.4], [-0.9, 0.2, 0.3], [0.5, -0.5, 0.0], [1.0, -0.3, 0.25]],
    dtype=torch.float64,
)
LABELS = torch.tensor([0, 1, 2, 0])


def margin_by_hand(cosines: Tensor, labels: Tensor, s: float, m: float) -> float:
    total = 0.0
    for row, label in zip(cosines.tolist(), labels.tolist(), strict=True):
        target = math.exp(s * (row[label] - m))
        others = sum(math.exp(s * c) for k, c in enumerate(row) if k != label)
        total += -math.log(target / (target + others))
    return total / len(cosines)


def scaled_module(s: float) -> nn.Module:
    module = nn.Identity()
    setattr(module, "artplug_logit_scale", s)  # noqa: B010
    return module


def margin_outputs() -> artplug.Outputs:
    return artplug.Outputs(
        x=torch.zeros(4, 1),
        y=LABELS,
        x_adv=None,
        logits_clean=OTHER.clone().requires_grad_(True),
        logits_adv=COSINES.clone().requires_grad_(True),
    )


@pytest.mark.parametrize("s, m", [(10.0, 0.2), (15.0, 0.2), (20.0, 0.3), (1.0, 0.5)])
@pytest.mark.parametrize("on", ["adv", "clean"])
def test_he_margin_matches_the_formula(s: float, m: float, on: str) -> None:
    term = HEMargin(HEMargin.Params(m=m, on=on))  # type: ignore[arg-type]
    assert term.needs == frozenset({on})
    out = margin_outputs()
    value = term(out, state_for(scaled_module(s)))
    chosen = COSINES if on == "adv" else OTHER
    assert value.dim() == 0
    assert value.item() == pytest.approx(margin_by_hand(chosen, LABELS, s, m), rel=1e-12)
    value.backward()
    used = out.logits_adv if on == "adv" else out.logits_clean
    unused = out.logits_clean if on == "adv" else out.logits_adv
    assert used is not None and used.grad is not None and torch.isfinite(used.grad).all()
    assert unused is not None and unused.grad is None


@pytest.mark.parametrize("s", [1.0, 10.0])
def test_he_margin_without_margin_is_cross_entropy_on_scaled_cosines(s: float) -> None:
    value = HEMargin(HEMargin.Params(m=0.0))(margin_outputs(), state_for(scaled_module(s)))
    torch.testing.assert_close(value, F.cross_entropy(s * COSINES, LABELS))


def test_he_margin_reads_the_scale_set_by_the_transform() -> None:
    model = he_model(s=20.0)
    value = HEMargin(HEMargin.Params(m=0.3))(margin_outputs(), state_for(model))
    assert value.item() == pytest.approx(margin_by_hand(COSINES, LABELS, 20.0, 0.3), rel=1e-12)


def test_he_margin_reads_a_knob_value_at_call_time() -> None:
    term = HEMargin(HEMargin.Params())
    term.params = term.params.model_copy(update={"m": 0.5})
    value = term(margin_outputs(), state_for(scaled_module(10.0)))
    assert value.item() == pytest.approx(margin_by_hand(COSINES, LABELS, 10.0, 0.5), rel=1e-12)


def test_he_margin_upcasts_half_cosines() -> None:
    out = margin_outputs()
    half = artplug.Outputs(out.x, out.y, None, None, logits_adv=COSINES.to(torch.bfloat16))
    value = HEMargin(HEMargin.Params())(half, state_for(scaled_module(10.0)))
    assert value.dtype == torch.float32
    exact = margin_by_hand(COSINES.to(torch.bfloat16).double(), LABELS, 10.0, 0.2)
    assert value.item() == pytest.approx(exact, rel=1e-5)


def test_he_margin_missing_logits_and_params_validation() -> None:
    params = HEMargin.Params()
    assert (params.m, params.on) == (0.2, "adv")
    out = margin_outputs()
    missing = artplug.Outputs(out.x, out.y, None, logits_clean=out.logits_clean, logits_adv=None)
    with pytest.raises(RuntimeError, match="logits_adv"):
        HEMargin(params)(missing, state_for(scaled_module(10.0)))
    for bad in ({"m": -0.1}, {"m": float("nan")}, {"on": "both"}, {"s": 10.0}):
        with pytest.raises(ValidationError):
            HEMargin.Params(**bad)  # type: ignore[arg-type]


def test_hypersphere_params_defaults_and_validation() -> None:
    params = Hypersphere.Params()
    assert (params.s, params.feature_norm, params.weight_norm, params.attack_logits) == (
        10.0,
        True,
        True,
        "s_cos",
    )
    for bad in (
        {"s": 0.0},
        {"s": -1.0},
        {"s": float("inf")},
        {"attack_logits": "s_cos_margin"},
        {"m": 0.2},
    ):
        with pytest.raises(ValidationError):
            Hypersphere.Params(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- recipe checks


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentityTransform:
    """Leaves the model as it is (stands in for a transform that must precede the head)."""

    name = "identity-test"
    stage = "features"
    Params = _NoParams

    def __init__(self, params: _NoParams) -> None:
        self.params = params

    def apply(self, model: nn.Module) -> nn.Module:
        return model


class IdentityPlugin:
    @staticmethod
    @artplug.hookimpl
    def register_model_transforms(register: artplug.Register) -> None:
        register(IdentityTransform)


@pytest.fixture(scope="module")
def with_identity():
    plugins = load_plugins(disabled=(), extra=[("identity", IdentityPlugin())], strict=True)
    return plugins.registries


def he_recipe(transforms: list[str], losses: list[dict[str, Any]] | None = None) -> dict:
    return digits_recipe(
        transform=[{"use": t} for t in transforms],  # type: ignore[arg-type]
        loss=losses if losses is not None else [{"use": "he-margin"}],  # type: ignore[arg-type]
    )


def test_he_margin_without_hypersphere_is_rejected(plugin_set) -> None:
    with pytest.raises(artplug.RecipeError) as info:
        resolve(he_recipe([]), plugin_set.registries)
    assert info.value.problems == [
        "loss[0] (he-margin): he-margin is defined on cosine logits; add [[transform]] use = "
        '"hypersphere"'
    ]
    resolved = resolve(he_recipe(["hypersphere"]), plugin_set.registries)
    assert [t.use for t in resolved.transforms] == ["hypersphere"]


def test_hypersphere_must_be_the_last_transform(with_identity) -> None:
    resolve(he_recipe(["identity-test", "hypersphere"]), with_identity)
    with pytest.raises(artplug.RecipeError) as info:
        resolve(he_recipe(["hypersphere", "identity-test"]), with_identity)
    (problem,) = info.value.problems
    # The order comes from the stages: the error names both transforms and the stage order.
    assert problem.startswith(
        "transform[1] (identity-test): identity-test must come before 'hypersphere' (head)"
    ), problem
    assert "activation -> sites -> features -> head" in problem
    with pytest.raises(artplug.RecipeError, match="listed 2 times"):
        resolve(he_recipe(["hypersphere", "hypersphere"]), with_identity)


# ---------------------------------------------------------------- engine smoke run


def test_pgd_at_he_recipe_trains_and_evaluates(plugin_set, run_tmp) -> None:
    raw = digits_recipe(
        data={"dataset": "digits", "batch_size": 32},
        transform=[{"use": "hypersphere", "s": 10.0}],  # type: ignore[arg-type]
        perturbation={"use": "pgd", "steps": 2},
        loss=[{"use": "he-margin", "m": 0.2}],  # type: ignore[arg-type]
        eval={
            "every_epochs": 1,
            "attacks": ["clean"],
            "final_attacks": ["clean", "fgsm"],
            "n_examples": 32,
            "test_examples": 32,
        },
    )
    c = build(resolve(raw, plugin_set.registries))
    assert isinstance(c.model.fc, CosineHead)
    assert artplug.logit_scale(c.model) == 10.0
    result = train_and_evaluate(c, run_dir=run_tmp / "x", max_steps=2)
    assert {"clean", "fgsm"} <= set(result.final)
    assert all(0.0 <= v <= 1.0 for v in result.final.values())
    with torch.no_grad():
        c.model(torch.rand(2, 1, 8, 8, device=c.device))
    norms = head(c.model).weight.detach().norm(dim=1).cpu()
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.gpu
def test_cuda_amp_channels_last_run(plugin_set, run_tmp) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    raw = digits_recipe(
        run={"name": "he-gpu", "epochs": 1, "device": "cuda", "log_every": 1},
        transform=[{"use": "hypersphere"}],  # type: ignore[arg-type]
        loss=[{"use": "he-margin"}],  # type: ignore[arg-type]
    )
    c = build(resolve(raw, plugin_set.registries))
    assert c.amp_dtype == torch.bfloat16 and c.channels_last
    result = train_and_evaluate(c, run_dir=run_tmp / "gpu", max_steps=3)
    assert 0.0 <= result.final["clean"] <= 1.0
    assert head(c.model).weight.dtype == torch.float32 and head(c.model).weight.is_cuda


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("kind, cls", [("transform", Hypersphere), ("loss", HEMargin)])
def test_registry_accepts_the_class_shape(kind: str, cls: type[Any]) -> None:
    registry = Registry(kind)  # type: ignore[arg-type]
    registry.add(cls, plugin="test")
    assert registry.get(cls.name).description


def test_hookimpls_register_through_pluggy() -> None:
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(hypersphere, name="hypersphere")
    pm.check_pending()
    transforms, losses = Registry("transform"), Registry("loss")
    pm.hook.register_model_transforms(register=lambda cls: transforms.add(cls, "hypersphere"))
    pm.hook.register_loss_terms(register=lambda cls: losses.add(cls, "hypersphere"))
    assert transforms.names() == ["hypersphere"]
    assert losses.names() == ["he-margin"]
