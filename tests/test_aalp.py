"""Tests of plugins/aalp.py: ``guided-dropout`` (transform), ``adaptive-logit-pairing`` (loss).

Every formula is checked on fixed hand-made tensors against values computed in the test with
plain ``math`` (softmax cross-entropy written out), and every dropout selection against the
units chosen by hand.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pluggy
import pytest
import torch
from artplug_plugins import aalp
from artplug_plugins.aalp import (
    AdaptiveLogitPairing,
    GuidedDropout,
    GuidedDropoutTransform,
    dropped_count,
    kept_count,
)
from artplug_plugins.hypersphere import CosineHead, Hypersphere
from torch import Tensor, nn

import artplug
import artplug.hookspecs
from artplug.engine import build
from artplug.models import ImageClassifier
from artplug.phase import running
from artplug.recipe import load_recipe, resolve
from artplug.registry import Registry
from artplug.testing import (
    check_loss_term,
    check_model_transform,
    digits_recipe,
    make_state,
    tiny_batch,
    tiny_model,
)
from artplug.workflows import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
Matrix = list[list[float]]

# ---------------------------------------------------------------- hand-made logits

# B = 2 examples, K = 3 classes. Adversarial example 0 stays correct (argmax 0 = y), adversarial
# example 1 is misclassified (argmax 0 != y = 1).
CLEAN = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
ADV = [[1.5, 1.0, -1.0], [2.0, 0.0, 0.0]]
LABELS = [0, 1]


def ce_by_hand(logits: list[float], label: int, smoothing: float = 0.0) -> float:
    """−log softmax(logits)[label], with label smoothing spread over all classes."""
    log_norm = math.log(sum(math.exp(v) for v in logits))
    nll = [log_norm - v for v in logits]
    return (1 - smoothing) * nll[label] + smoothing * sum(nll) / len(logits)


def terms_by_hand(
    clean: Matrix = CLEAN,
    adv: Matrix = ADV,
    scale: float = 1.0,
    margin: float = 0.0,
    smoothing: float = 0.0,
) -> tuple[list[float], list[float]]:
    """(ce_i, lp_i) of the outputs ``clean``/``adv`` and LABELS, by the definitions."""
    ce, lp = [], []
    for z, za, y in zip(clean, adv, LABELS, strict=True):
        shifted = [scale * (v - (margin if k == y else 0.0)) for k, v in enumerate(z)]
        shifted_adv = [scale * (v - (margin if k == y else 0.0)) for k, v in enumerate(za)]
        ce.append(0.5 * (ce_by_hand(shifted, y, smoothing) + ce_by_hand(shifted_adv, y, smoothing)))
        lp.append(sum((a - b) ** 2 for a, b in zip(z, za, strict=True)) / len(z))
    return ce, lp


def outputs(
    dtype: torch.dtype = torch.float64,
    grad: bool = False,
    clean: Matrix = CLEAN,
    adv: Matrix = ADV,
) -> artplug.Outputs:
    clean_t = torch.tensor(clean, dtype=dtype, requires_grad=grad)
    adv_t = torch.tensor(adv, dtype=dtype, requires_grad=grad)
    x = torch.zeros(2, 1, 8, 8)
    return artplug.Outputs(x, torch.tensor(LABELS), x, clean_t, adv_t)


def aalp_value(out: artplug.Outputs, model: nn.Module | None = None, **params: Any) -> Tensor:
    term = AdaptiveLogitPairing(AdaptiveLogitPairing.Params(**params))
    model = model if model is not None else nn.Identity()
    return term(out, make_state(model, artplug.Threat("linf", 0.1)))


# ---------------------------------------------------------------- adaptive-logit-pairing


def share_weights(weighting: str, ce: list[float], lp: list[float], lam: float) -> list[float]:
    """w_i of the two share rules, by their definitions."""
    if weighting == "ratio":
        return [ce[i] / (ce[i] + lam * lp[i]) for i in range(len(ce))]
    return [lam * lp[i] / (ce[i] + lam * lp[i]) for i in range(len(ce))]


@pytest.mark.parametrize("weighting", ["own-share", "ratio"])
@pytest.mark.parametrize(("lam", "c"), [(0.5, 1.0), (2.0, 0.7)])
def test_share_weightings_match_the_formula(weighting: str, lam: float, c: float) -> None:
    ce, lp = terms_by_hand()
    # lp_0 = (0.5² + 1² + 0²) / 3, lp_1 = (1.5² + 0.5² + 0²) / 3.
    assert lp == pytest.approx([1.25 / 3, 2.5 / 3])
    w = share_weights(weighting, ce, lp, lam)
    expected = sum((1 - w[i]) * c * ce[i] + w[i] * lam * lp[i] for i in range(2)) / 2
    value = aalp_value(outputs(), weighting=weighting, lam=lam, c=c)
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_misclassified_weighting_matches_the_formula(rho: float) -> None:
    ce, lp = terms_by_hand()
    lam, c = 0.5, 1.5
    w = [1.0, 1.0 - rho]  # example 1's adversarial output is misclassified
    expected = sum((1 - w[i]) * c * ce[i] + w[i] * lam * lp[i] for i in range(2)) / 2
    value = aalp_value(outputs(), weighting="misclassified", lam=lam, c=c, rho=rho)
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_sample_weights_are_returned_detached_and_zero_losses_give_one_half() -> None:
    ce = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
    lp = torch.tensor([1.0, 2.0, 0.0], requires_grad=True)
    w = aalp.sample_weights(
        ce, lp, torch.tensor([False, True, False]), weighting="ratio", lam=0.5, rho=0.3
    )
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([1 / 1.5, 0.0, 0.5]))
    w = aalp.sample_weights(
        ce, lp, torch.tensor([False, True, False]), weighting="own-share", lam=0.5, rho=0.3
    )
    torch.testing.assert_close(w, torch.tensor([0.5 / 1.5, 1.0, 0.5]))
    w = aalp.sample_weights(
        ce, lp, torch.tensor([False, True, False]), weighting="misclassified", lam=0.5, rho=0.3
    )
    torch.testing.assert_close(w, torch.tensor([1.0, 0.7, 1.0]))


@pytest.mark.parametrize("weighting", ["own-share", "ratio", "misclassified"])
def test_gradient_does_not_flow_through_the_weights(weighting: str) -> None:
    lam, c, rho = 0.5, 1.0, 0.5
    out = outputs(grad=True)
    value = aalp_value(out, weighting=weighting, lam=lam, c=c, rho=rho)
    assert out.logits_clean is not None and out.logits_adv is not None
    grad_clean, grad_adv = torch.autograd.grad(value, [out.logits_clean, out.logits_adv])

    # By hand, with w_i a constant:
    # dce_i/dz_i = ½(softmax(z_i) − e_y) and dlp_i/dz_i = (2/K)(z_i − z'_i).
    ce, lp = terms_by_hand()
    hand = share_weights(weighting, ce, lp, lam)
    w = [1.0, 1.0 - rho] if weighting == "misclassified" else hand
    clean = torch.tensor(CLEAN, dtype=torch.float64)
    adv = torch.tensor(ADV, dtype=torch.float64)
    onehot = torch.eye(3, dtype=torch.float64)[LABELS]
    weights = torch.tensor(w, dtype=torch.float64).unsqueeze(1)
    d_lp = (2 / 3) * (clean - adv)
    expected_clean = (
        (1 - weights) * c * 0.5 * (clean.softmax(1) - onehot) + weights * lam * d_lp
    ) / 2
    expected_adv = ((1 - weights) * c * 0.5 * (adv.softmax(1) - onehot) - weights * lam * d_lp) / 2
    torch.testing.assert_close(grad_clean, expected_clean)
    torch.testing.assert_close(grad_adv, expected_adv)

    if weighting != "misclassified":
        # Sanity of the test itself: letting the gradient through w changes the result.
        out2 = outputs(grad=True)
        assert out2.logits_clean is not None and out2.logits_adv is not None
        ce_t, lp_t = aalp.per_sample_terms(out2.logits_clean, out2.logits_adv, out2.y)
        share = ce_t if weighting == "ratio" else lam * lp_t
        w_t = share / (ce_t + lam * lp_t)
        leaky = ((1 - w_t) * c * ce_t + w_t * lam * lp_t).mean()
        leaky_grad = torch.autograd.grad(leaky, out2.logits_clean)[0]
        assert not torch.allclose(leaky_grad, expected_clean)


def test_literal_ratio_gives_no_classification_gradient_when_outputs_agree() -> None:
    """Why "ratio" is not the default: with z = z' (lp = 0, as at initialisation) it puts all
    the weight on the pairing term, whose gradient is zero there, so nothing is learned;
    "own-share" puts all of it on the cross-entropy."""
    same = outputs(grad=True, adv=CLEAN)
    assert same.logits_clean is not None and same.logits_adv is not None
    value = aalp_value(same, weighting="ratio")
    grads = torch.autograd.grad(value, [same.logits_clean, same.logits_adv])
    assert all(float(g.abs().max()) == 0.0 for g in grads)
    same = outputs(grad=True, adv=CLEAN)
    assert same.logits_clean is not None
    value = aalp_value(same, weighting="own-share")
    ce, _ = terms_by_hand(CLEAN, CLEAN)
    assert value.item() == pytest.approx(sum(ce) / 2, rel=1e-12)
    (grad,) = torch.autograd.grad(value, [same.logits_clean])
    assert float(grad.abs().max()) > 0.0


def test_hypersphere_scale_margin_and_label_smoothing() -> None:
    model = nn.Identity()
    setattr(model, "artplug_logit_scale", 20.0)  # noqa: B010 - what the hypersphere sets
    # Cosine-like outputs: the fixed logits divided by 4, so they lie in [-1, 1].
    cosines = [[v / 4 for v in row] for row in CLEAN]
    cosines_adv = [[v / 4 for v in row] for row in ADV]
    ce, lp = terms_by_hand(cosines, cosines_adv, scale=20.0, margin=0.3, smoothing=0.1)
    lam = 0.5
    w = share_weights("own-share", ce, lp, lam)  # the default weighting
    # The pairing is on the unscaled outputs: lp is 1/16 of the unscaled example's.
    assert lp == pytest.approx([1.25 / 3 / 16, 2.5 / 3 / 16])
    expected = sum((1 - w[i]) * ce[i] + w[i] * lam * lp[i] for i in range(2)) / 2
    out = outputs(clean=cosines, adv=cosines_adv)
    value = aalp_value(out, model, margin=0.3, label_smoothing=0.1)
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_half_precision_logits_are_upcast() -> None:
    value = aalp_value(outputs(torch.bfloat16))
    assert value.dtype == torch.float32
    reference = aalp_value(outputs(torch.float64)).item()
    assert value.item() == pytest.approx(reference, rel=2e-2)


def test_missing_logits_raise() -> None:
    out = outputs()
    broken = artplug.Outputs(out.x, out.y, out.x_adv, None, out.logits_adv)
    with pytest.raises(RuntimeError, match="without logits_clean and logits_adv"):
        aalp_value(broken)


def test_loss_params_validation() -> None:
    params = AdaptiveLogitPairing.Params()
    assert (params.weighting, params.lam, params.c, params.rho, params.margin) == (
        "own-share",
        0.5,
        1.0,
        0.5,
        0.0,
    )
    with pytest.raises(ValueError):
        AdaptiveLogitPairing.Params(rho=1.5)
    with pytest.raises(ValueError):
        AdaptiveLogitPairing.Params(weighting="softmax")
    with pytest.raises(ValueError):
        AdaptiveLogitPairing.Params(lam=-1.0)


# ---------------------------------------------------------------- guided dropout: selection


def contribution_example() -> tuple[Tensor, nn.Linear]:
    """Two examples, d = 10 features, K = 2 classes, bias 0.

    W_0 = (5, ..., 5) and W_1 = (10, 9, ..., 1).
    Example 0: φ = (1, ..., 10) gives z = (275, 220) → predicted class 0 → contributions 5·φ_j.
    Example 1: φ = 1 gives z = (50, 55) → predicted class 1 → contributions W_1j.
    (Under class 0 every unit of example 1 would tie.)
    """
    phi = torch.stack([torch.arange(1.0, 11.0), torch.ones(10)])
    head = nn.Linear(10, 2)
    with torch.no_grad():
        head.weight.copy_(torch.stack([torch.full((10,), 5.0), torch.arange(10.0, 0.0, -1.0)]))
        head.bias.zero_()
    return phi, head


def dropout(**kwargs: Any) -> GuidedDropout:
    return GuidedDropout(10, **kwargs).train()


def test_counts_floor_the_drops_and_ceil_the_kept_units() -> None:
    assert dropped_count(0.3, 10) == 3  # 0.3 · 10 = 2.9999999999999996 in floats
    assert dropped_count(0.5, 7) == 3
    assert dropped_count(0.05, 10) == 0
    assert kept_count(0.1, 256) == 26
    assert kept_count(0.2, 10) == 2
    assert kept_count(0.0, 10) == 0


@pytest.mark.parametrize("rescale", [True, False])
def test_contribution_rule_lowest_drops_the_units_chosen_by_hand(rescale: bool) -> None:
    phi, head = contribution_example()
    module = dropout(q=0.2, p=0.5, rest="lowest", rescale=rescale)
    mask = module.contribution_mask(phi, head, 0.5)
    # keep ceil(0.2·10) = 2 units; drop floor(0.5·8) = 4 of the 8 others; survivors ×8/4.
    pool = 2.0 if rescale else 1.0
    expected = torch.full((2, 10), pool)
    expected[0, [8, 9]] = 1.0  # largest φ_j
    expected[0, [0, 1, 2, 3]] = 0.0  # lowest φ_j
    expected[1, [0, 1]] = 1.0  # largest W_1j (predicted class 1)
    expected[1, [6, 7, 8, 9]] = 0.0  # lowest W_1j
    torch.testing.assert_close(mask, expected)
    with running("update-adv"):
        out = module(phi, head)
    torch.testing.assert_close(out, phi * expected)


def test_contribution_rule_random_drops_exactly_p_of_the_unprotected_units() -> None:
    phi, head = contribution_example()
    module = dropout(q=0.2, p=0.5, rest="random")
    seen: set[tuple[int, ...]] = set()
    for seed in range(12):
        torch.manual_seed(seed)
        mask = module.contribution_mask(phi, head, 0.5)
        for row, protected in ((0, [8, 9]), (1, [0, 1])):
            assert mask[row, protected].tolist() == [1.0, 1.0]
            others = [j for j in range(10) if j not in protected]
            values = mask[row, others]
            assert int((values == 0).sum()) == 4
            assert sorted(set(values.tolist())) == [0.0, 2.0]
        seen.add(tuple((mask[0] == 0).nonzero().flatten().tolist()))
    assert len(seen) > 1, "the dropped units should vary from draw to draw"


def test_contribution_rule_without_protection_and_small_fraction() -> None:
    phi, head = contribution_example()
    mask = dropout(q=0.0, rest="lowest").contribution_mask(phi, head, 0.3)
    assert (mask == 0).sum(1).tolist() == [3, 3]  # floor(0.3 · 10)
    assert mask[0, :3].tolist() == [0.0, 0.0, 0.0]
    assert mask[1, 7:].tolist() == [0.0, 0.0, 0.0]
    # 0.05 of the 8 unprotected units is below one unit: nothing dropped, nothing scaled.
    mask = dropout(q=0.2).contribution_mask(phi, head, 0.05)
    torch.testing.assert_close(mask, torch.ones(2, 10))


@pytest.mark.parametrize("rescale", [True, False])
def test_strength_rule_drops_the_largest_strengths(rescale: bool) -> None:
    torch.manual_seed(0)
    module = GuidedDropout(6, rule="strength", p=0.5, rescale=rescale).train()
    assert module.strength is not None
    assert ((module.strength > 0) & (module.strength < 1)).all()  # U(0, 1) init
    strength = torch.tensor([0.1, -0.9, 0.3, 0.8, 0.2, 0.5])
    with torch.no_grad():
        module.strength.copy_(strength)
    phi = torch.arange(1.0, 13.0).view(2, 6)
    head = nn.Linear(6, 3)
    # floor(0.5 · 6) = 3 units with the largest |t|: 1 (0.9), 3 (0.8), 5 (0.5); ×6/3 for the rest.
    keep = 2.0 if rescale else 1.0
    mask = torch.tensor([keep, 0.0, keep, 0.0, keep, 0.0])
    with running("update-clean"):
        out = module(phi, head)
    torch.testing.assert_close(out, phi * strength * mask)
    # Evaluation: the strengths still multiply the features, nothing is dropped.
    module.eval()
    with running("update-clean"):
        torch.testing.assert_close(module(phi, head), phi * strength)
    # The strengths are trained: kept units get a gradient, dropped units none.
    module.train()
    with running("update-adv"):
        module(phi, head).sum().backward()
    grad = module.strength.grad
    assert grad is not None
    assert grad[[1, 3, 5]].abs().sum() == 0 and (grad[[0, 2, 4]] != 0).all()


# ---------------------------------------------------------------- guided dropout: when it is on


def small_model_with_dropout(**params: Any) -> ImageClassifier:
    model = cast(ImageClassifier, tiny_model())
    GuidedDropoutTransform(GuidedDropoutTransform.Params(**params)).apply(model)
    return model


def dropout_of(model: nn.Module) -> GuidedDropout:
    module = model.get_submodule("guided_dropout")
    assert isinstance(module, GuidedDropout)
    return module


def plain_train_forward(model: ImageClassifier, x: Tensor) -> Tensor:
    """The forward without any dropout (train-mode batch norm), by the model's parts."""
    return model.fc(model.features(x))


def test_dropout_is_on_only_in_training_mode_update_forwards() -> None:
    model = small_model_with_dropout(p=0.9, q=0.0, rest="lowest")
    module = dropout_of(model)
    x, _ = tiny_batch(8)
    model.train()
    reference = plain_train_forward(model, x).detach()
    for phase in ("attack", "eval"):
        with running(phase):
            torch.testing.assert_close(model(x), reference)
    assert int(module.steps_seen) == 0
    with running("update-adv"):
        dropped = model(x)
    assert not torch.allclose(dropped, reference)
    features = model.features(x)
    mask = module.contribution_mask(features, model.fc, 0.9)
    assert ((mask == 0).sum(1) == dropped_count(0.9, 256)).all()
    torch.testing.assert_close(dropped, model.fc(features * mask))
    model.eval()
    with running("update-adv"):
        torch.testing.assert_close(model(x), model.fc(model.features(x)))


def test_during_attack_turns_dropout_on_in_train_mode_attacks() -> None:
    model = small_model_with_dropout(p=0.9, q=0.0, rest="lowest", during_attack=True).train()
    x, _ = tiny_batch(8)
    reference = plain_train_forward(model, x).detach()
    with running("attack"):
        assert not torch.allclose(model(x), reference)
    model.eval()
    with running("attack"):
        torch.testing.assert_close(model(x), model.fc(model.features(x)))
    assert int(dropout_of(model).steps_seen) == 0  # attacks do not count steps


def test_steps_are_counted_from_the_update_forwards() -> None:
    module = dropout()
    phi, head = contribution_example()
    for _ in range(3):  # clean + adversarial forwards: one step each
        with running("update-clean"):
            module(phi, head)
        with running("update"):  # an extra forward inside a loss term
            module(phi, head)
        with running("update-adv"):
            module(phi, head)
    assert int(module.steps_seen) == 3
    for _ in range(2):  # adversarial forward only (e.g. PGD-AT, FreeAT replays)
        with running("update-adv"):
            module(phi, head)
    assert int(module.steps_seen) == 5
    with running("update-clean"):  # clean forward only
        module(phi, head)
    assert int(module.steps_seen) == 6
    module.eval()
    with running("update-clean"):
        module(phi, head)
    assert int(module.steps_seen) == 6


def test_warm_up_and_linear_ramp_of_p() -> None:
    module = GuidedDropout(10, p=0.4, start_step=2, ramp_steps=4)
    hand = {0: 0.0, 1: 0.0, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.4, 9: 0.4}
    for step, fraction in hand.items():
        assert module.drop_fraction(step) == pytest.approx(fraction)
    sudden = GuidedDropout(10, p=0.4, start_step=3)
    assert [sudden.drop_fraction(s) for s in range(5)] == [0.0, 0.0, 0.0, 0.4, 0.4]


def test_dropout_follows_the_schedule_and_resumes_from_the_saved_counter() -> None:
    phi, head = contribution_example()
    module = dropout(q=0.0, p=0.5, rest="lowest", start_step=2, ramp_steps=2)
    zeros = []
    for _ in range(4):
        with running("update-adv"):
            zeros.append(int((module(phi, head) == 0).sum()))
    # steps 0, 1: warm-up; step 2: p = 0.25 → 2 units per example; step 3: p = 0.5 → 5.
    assert zeros == [0, 0, 4, 10]
    fresh = dropout(q=0.0, p=0.5, rest="lowest", start_step=2, ramp_steps=2)
    fresh.load_state_dict(module.state_dict())
    with running("update-adv"):
        assert int((fresh(phi, head) == 0).sum()) == 10
    assert int(fresh.steps_seen) == 5


# ---------------------------------------------------------------- the transform


def test_hypersphere_after_guided_dropout_replaces_fc_and_guides_the_dropout() -> None:
    model = small_model_with_dropout(p=0.5, q=0.1, rest="lowest")
    assert isinstance(model.fc, nn.Linear)
    Hypersphere(Hypersphere.Params(s=10.0)).apply(model)
    assert isinstance(model.fc, CosineHead)
    x, _ = tiny_batch(6)
    model.eval()
    expected = model.fc(model.features(x))
    torch.testing.assert_close(model(x), expected)
    assert expected.abs().max() <= 1.0 + 1e-6  # cosines: the new head is in use
    model.train()
    with running("update-adv"):
        dropped = model(x)
    features = model.features(x)
    mask = dropout_of(model).contribution_mask(features, model.fc, 0.5)
    torch.testing.assert_close(dropped, model.fc(features * mask))
    # The predicted class (hence the protected units) comes from the cosine head.
    phi = features.detach()
    predicted = model.fc(phi).argmax(1)
    top = (phi * model.fc.weight[predicted]).abs().argmax(1)
    assert (mask.gather(1, top.unsqueeze(1)) == 1.0).all()


def test_transform_contract_and_state_dict_keys() -> None:
    check_model_transform(GuidedDropoutTransform)
    check_model_transform(GuidedDropoutTransform, {"rule": "strength"})
    model = small_model_with_dropout(rule="strength")
    keys = {k for k in model.state_dict() if k.startswith("guided_dropout.")}
    assert keys == {"guided_dropout.strength", "guided_dropout.steps_seen"}
    assert any(p is dropout_of(model).strength for p in model.parameters())


def test_deep_copy_keeps_its_own_dropout() -> None:
    model = small_model_with_dropout(p=0.5, rest="lowest").train()
    twin = copy.deepcopy(model)
    assert getattr(twin.forward, "__self__", None) is twin
    x, _ = tiny_batch(4)
    with running("update-adv"):
        torch.testing.assert_close(twin(x), model(x))
    assert int(dropout_of(twin).steps_seen) == 1 and int(dropout_of(model).steps_seen) == 1


def test_apply_rejects_unsuitable_models_and_a_second_application() -> None:
    transform = GuidedDropoutTransform(GuidedDropoutTransform.Params())
    with pytest.raises(ValueError, match="final layer 'fc'"):
        transform.apply(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    model = tiny_model()
    transform.apply(model)
    with pytest.raises(ValueError, match="only once"):
        transform.apply(model)

    class NoFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

    with pytest.raises(ValueError, match="features"):
        transform.apply(NoFeatures())


def test_transform_params_validation() -> None:
    params = GuidedDropoutTransform.Params()
    assert (params.rule, params.p, params.q, params.placement) == (
        "contribution",
        0.3,
        0.1,
        "penultimate",
    )
    with pytest.raises(ValueError):
        GuidedDropoutTransform.Params(p=1.0)
    with pytest.raises(ValueError):
        GuidedDropoutTransform.Params(placement="block3")


def test_loss_contract() -> None:
    check_loss_term(AdaptiveLogitPairing)
    check_loss_term(AdaptiveLogitPairing, {"weighting": "misclassified"})


# ---------------------------------------------------------------- recipe rules


def recipe(
    transforms: Sequence[Mapping[str, Any]],
    losses: Sequence[Mapping[str, Any]] | None = None,
    perturbation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return digits_recipe(
        transform=list(transforms),
        loss=list(losses if losses is not None else [{"use": "adaptive-logit-pairing"}]),
        perturbation=perturbation if perturbation is not None else {"use": "pgd", "steps": 2},
    )


def problems(plugin_set: Any, raw: dict[str, Any]) -> list[str]:
    with pytest.raises(artplug.RecipeError) as info:
        resolve(raw, plugin_set.registries)
    return list(info.value.problems)


def test_allowed_stack_resolves(plugin_set) -> None:
    raw = recipe(
        [{"use": "guided-dropout"}, {"use": "hypersphere", "s": 20.0}],
        [{"use": "adaptive-logit-pairing", "margin": 0.3}],
    )
    resolved = resolve(raw, plugin_set.registries)
    assert [t.use for t in resolved.transforms] == ["guided-dropout", "hypersphere"]


def test_guided_dropout_after_hypersphere_is_rejected(plugin_set) -> None:
    found = problems(plugin_set, recipe([{"use": "hypersphere"}, {"use": "guided-dropout"}]))
    assert any(
        p.startswith("transform[1] (guided-dropout): guided-dropout must come before 'hypersphere'")
        for p in found
    ), found


def test_guided_dropout_twice_and_useless_during_attack_are_rejected(plugin_set) -> None:
    found = problems(plugin_set, recipe([{"use": "guided-dropout"}, {"use": "guided-dropout"}]))
    assert "transform[0] (guided-dropout): guided-dropout is listed 2 times; list it once" in found
    found = problems(plugin_set, recipe([{"use": "guided-dropout", "during_attack": True}]))
    assert found == [
        "transform[0] (guided-dropout): during_attack = true has no effect while the attack runs "
        'in eval mode; set [perturbation] model_mode = "train" or during_attack = false'
    ]
    train_mode = {"use": "pgd", "steps": 2, "model_mode": "train"}
    resolve(
        recipe([{"use": "guided-dropout", "during_attack": True}], perturbation=train_mode),
        plugin_set.registries,
    )


@pytest.mark.parametrize(
    ("other", "phrase"),
    [
        ({"use": "cross-entropy"}, "do not stack it with the cross-entropy loss"),
        ({"use": "logit-pairing"}, "do not stack it with the logit-pairing loss"),
        ({"use": "adaptive-logit-pairing", "id": "again"}, "listed 2 times"),
    ],
)
def test_double_counted_losses_are_rejected(plugin_set, other: dict, phrase: str) -> None:
    found = problems(plugin_set, recipe([], [{"use": "adaptive-logit-pairing"}, other]))
    assert any(p.startswith("loss[0] (adaptive-logit-pairing):") and phrase in p for p in found)


def test_he_margin_stack_margin_without_head_and_no_attack_are_rejected(plugin_set) -> None:
    found = problems(
        plugin_set,
        recipe(
            [{"use": "hypersphere"}],
            [{"use": "adaptive-logit-pairing"}, {"use": "he-margin"}],
        ),
    )
    assert any("do not stack it with the he-margin loss" in p for p in found), found
    found = problems(plugin_set, recipe([], [{"use": "adaptive-logit-pairing", "margin": 0.3}]))
    assert found == [
        "loss[0] (adaptive-logit-pairing): margin > 0 is the HE cosine margin and needs cosine "
        'outputs; add [[transform]] use = "hypersphere" or set margin = 0'
    ]
    found = problems(plugin_set, recipe([], perturbation={"use": "none"}))
    assert len(found) == 1 and "needs an adversarial perturbation" in found[0]


# ---------------------------------------------------------------- training runs


@pytest.mark.parametrize("he", [False, True], ids=["pgd", "pgd-he"])
def test_two_step_training_run(plugin_set, run_tmp, he: bool) -> None:
    transforms: list[dict[str, Any]] = [{"use": "guided-dropout", "p": 0.5}]
    loss: dict[str, Any] = {"use": "adaptive-logit-pairing"}
    if he:
        transforms.append({"use": "hypersphere", "s": 20.0})
        loss["margin"] = 0.3
    raw = recipe(transforms, [loss])
    raw["eval"] = {"every_epochs": 0, "final_attacks": ["clean"], "test_examples": 16}
    raw["eval"]["sanity"] = False
    c = build(resolve(raw, plugin_set.registries))
    head = c.model.get_submodule("fc")
    assert isinstance(head, CosineHead if he else nn.Linear)
    before = head.weight.detach().clone()
    result = train_and_evaluate(c, run_dir=run_tmp / "run", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0
    assert all(math.isfinite(h["epoch/train_loss"]) for h in result.history)
    assert int(dropout_of(c.model).steps_seen) == 2  # clean + adv forwards = one step each
    assert not torch.equal(before, head.weight.detach())  # the weights were trained


def test_dropout_and_loss_under_cpu_bf16_autocast() -> None:
    model = small_model_with_dropout(p=0.5).train()
    Hypersphere(Hypersphere.Params(s=20.0)).apply(model)
    x, y = tiny_batch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with running("update-clean"):
            clean = model(x)
        with running("update-adv"):
            adv = model((x + 0.05).clamp(0, 1))
        out = artplug.Outputs(x, y, x, clean, adv)
        value = aalp_value(out, model, margin=0.3)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert dropout_of(model).steps_seen.item() == 1  # one step: clean then adversarial


@pytest.mark.gpu
def test_cuda_amp_channels_last_run(plugin_set, run_tmp) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    raw = recipe(
        [{"use": "guided-dropout", "p": 0.5}, {"use": "hypersphere", "s": 20.0}],
        [{"use": "adaptive-logit-pairing", "margin": 0.3}],
    )
    raw["run"] = {"name": "aalp-gpu", "epochs": 1, "device": "cuda", "log_every": 1}
    c = build(resolve(raw, plugin_set.registries))
    assert c.amp_dtype == torch.bfloat16 and c.channels_last
    result = train_and_evaluate(c, run_dir=run_tmp / "gpu", max_steps=3)
    assert 0.0 <= result.final["clean"] <= 1.0
    assert int(dropout_of(c.model).steps_seen) == 3


def test_recipes_resolve(plugin_set) -> None:
    for path in (
        ROOT / "recipes" / "aalp_like.toml",
        ROOT / "recipes" / "digits" / "aalp_like.toml",
    ):
        resolved = load_recipe(path, plugin_set.registries)
        assert [t.use for t in resolved.transforms] == ["guided-dropout"]
        assert [loss.use for loss in resolved.losses] == ["adaptive-logit-pairing"]
        assert resolved.perturbation.model_mode == "eval"
        assert resolved.losses[0].params.model_dump()["lam"] == 0.5


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize(
    ("kind", "cls"), [("transform", GuidedDropoutTransform), ("loss", AdaptiveLogitPairing)]
)
def test_registry_accepts_the_class_shape(kind: str, cls: type[Any]) -> None:
    registry = Registry(kind)  # type: ignore[arg-type]
    registry.add(cls, plugin="test")
    assert registry.get(cls.name).description


def test_hookimpls_register_through_pluggy() -> None:
    pm = pluggy.PluginManager("artplug")
    pm.add_hookspecs(artplug.hookspecs)
    pm.register(aalp, name="aalp")
    pm.check_pending()
    transforms, losses = Registry("transform"), Registry("loss")
    pm.hook.register_model_transforms(register=lambda cls: transforms.add(cls, "aalp"))
    pm.hook.register_loss_terms(register=lambda cls: losses.add(cls, "aalp"))
    assert transforms.names() == ["guided-dropout"]
    assert losses.names() == ["adaptive-logit-pairing"]
