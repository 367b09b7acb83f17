"""AWP: the contract checks of artplug.testing, the formula, parity with the reference code, and
the engine applying the gradient taken at the perturbed weights to the original ones."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from artplug_awp import AdversarialWeightPerturbation as AWP
from torch import nn

import artplug
from artplug.engine import build, train_step
from artplug.kinds import Progress
from artplug.recipe import resolve
from artplug.testing import (
    check_model_transform,
    check_update_hook,
    digits_recipe,
    make_state,
    tiny_batch,
    tiny_model,
)


def _awp(**values: object) -> AWP:
    return AWP(AWP.Params(**values))


def test_registered_through_the_entry_point(plugin_set):
    entry = plugin_set.registries.transform.get("awp")
    assert entry.cls is AWP and entry.plugin == "awp"
    assert plugin_set.plugins["awp"].distribution == "artplug-awp"


@pytest.mark.parametrize("loss", ["ce", "trades-kl"])
def test_contract(loss):
    # check_model_transform runs check_update_hook too, because AWP is an UpdateHook.
    assert isinstance(_awp(), artplug.UpdateHook)
    check_model_transform(AWP, {"loss": loss})
    check_update_hook(AWP, {"loss": loss, "gamma": 0.1})


def test_perturbation_follows_the_formula_on_weight_matrices_only():
    model = tiny_model()
    model.train()
    x, y = tiny_batch()
    x_adv = (x + 0.1).clamp(0, 1)
    awp = _awp(gamma=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The expected step, computed independently: v = gamma ||w|| / ||g|| g per weight matrix.
    probe = copy.deepcopy(model)
    loss = F.cross_entropy(probe(x_adv), y)
    names = [n for n, p in probe.named_parameters() if p.dim() > 1]
    grads = torch.autograd.grad(loss, [dict(probe.named_parameters())[n] for n in names])
    expected = {
        n: 0.01 * before[n].norm() / g.norm() * g for n, g in zip(names, grads, strict=True)
    }

    awp.before_update(model, x, x_adv, y, make_state(model, artplug.Threat("linf", 0.1)))
    for name, parameter in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(parameter - before[name], expected[name])
            ratio = ((parameter - before[name]).norm() / before[name].norm()).item()
            assert ratio == pytest.approx(0.01, rel=1e-4)  # the relative radius gamma
        else:  # biases and BatchNorm affine parameters are never perturbed
            assert torch.equal(parameter, before[name]), name
    awp.after_backward_update(model)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name])


class _ReferenceAWP:
    """csdongxian/AWP's AdvWeightPerturb (AT_AWP and TRADES_AWP utils_awp.py), transcribed."""

    def __init__(self, model: nn.Module, proxy: nn.Module, gamma: float) -> None:
        self.model, self.proxy, self.gamma = model, proxy, gamma
        self.proxy_optim = torch.optim.SGD(proxy.parameters(), lr=0.01)

    def calc_awp(self, x, x_adv, y, loss: str, beta: float) -> dict[str, torch.Tensor]:
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        if loss == "ce":
            value = -F.cross_entropy(self.proxy(x_adv), y)
        else:
            natural = F.cross_entropy(self.proxy(x), y)
            robust = F.kl_div(
                F.log_softmax(self.proxy(x_adv), dim=1),
                F.softmax(self.proxy(x), dim=1),
                reduction="batchmean",
            )
            value = -1.0 * (natural + beta * robust)
        self.proxy_optim.zero_grad()
        value.backward()
        self.proxy_optim.step()
        diff = {}
        model_state, proxy_state = self.model.state_dict(), self.proxy.state_dict()
        for (key, old), (_, new) in zip(model_state.items(), proxy_state.items(), strict=True):
            if old.dim() <= 1 or "weight" not in key:
                continue
            d = new - old
            diff[key] = old.norm() / (d.norm() + 1e-20) * d
        return diff

    def perturb(self, diff: dict[str, torch.Tensor]) -> None:
        names = dict(self.model.named_parameters())
        with torch.no_grad():
            for key, d in diff.items():
                names[key].add_(self.gamma * d)


@pytest.mark.parametrize("loss", ["ce", "trades-kl"])
def test_matches_the_reference_implementation(loss):
    x, y = tiny_batch(32)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ours, theirs = tiny_model(seed=3), tiny_model(seed=3)
    ours.train()
    reference = _ReferenceAWP(theirs, tiny_model(seed=9), gamma=5e-3)
    reference.perturb(reference.calc_awp(x, x_adv, y, loss, beta=6.0))
    awp = _awp(loss=loss, beta=6.0)
    awp.before_update(ours, x, x_adv, y, make_state(ours, artplug.Threat("linf", 0.1)))
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    # The proxy kept BatchNorm statistics out of the ascent; so does AWP.
    for (name, b), c in zip(ours.named_buffers(), tiny_model(seed=3).buffers(), strict=True):
        assert torch.equal(b, c), name


def test_warmup_and_zero_gamma_change_nothing():
    model = tiny_model()
    x, y = tiny_batch()
    before = [p.detach().clone() for p in model.parameters()]
    for awp, epoch in ((_awp(warmup_epochs=2), 1), (_awp(gamma=0.0), 5)):
        state = make_state(model, artplug.Threat("linf", 0.1), step=epoch * 10)
        assert state.progress.epoch == epoch
        awp.before_update(model, x, x, y, state)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_engine_steps_from_the_original_weights_with_the_perturbed_gradient(plugin_set):
    """One engine step equals w - lr * grad L(w + v): the hook runs before the forward and is
    undone after the backward, before optimizer.step()."""
    raw = digits_recipe(
        perturbation={"use": "none"},
        transform=[{"use": "awp", "gamma": 0.05}],
        optim={"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
    )
    c = build(resolve(raw, plugin_set.registries))
    assert [type(h) for h in c.update_hooks] == [AWP]
    x, y = next(iter(c.train_loader))
    original = copy.deepcopy(c.model)
    progress = Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100)

    # The expected update, by hand on a copy.
    expected = copy.deepcopy(original).train()
    awp = _awp(gamma=0.05)
    awp.before_update(expected, x, x, y, make_state(expected, artplug.Threat("linf", 0.1)))
    F.cross_entropy(expected(x), y).backward()
    grads = {n: p.grad.clone() for n, p in expected.named_parameters()}

    train_step(c, x, y, progress)
    for (name, p), w in zip(c.model.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(p, w - 0.1 * grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # Without AWP the step would differ: the perturbation really reached the gradient.
    plain = copy.deepcopy(original).train()
    F.cross_entropy(plain(x), y).backward()
    differs = [not torch.allclose(q.grad, grads[n], atol=1e-6) for n, q in plain.named_parameters()]
    assert any(differs)
