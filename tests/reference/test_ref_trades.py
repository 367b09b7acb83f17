"""TRADES loss and KL attack against a re-implementation of the authors' code, in float64.

Reference: ``yaodongyu/TRADES``, ``trades.py``, function ``trades_loss`` (attack and loss in one
function). What it does, restated: BN in eval mode; ``x' = x + 0.001 N(0, I)``; for each step
the summed ``KL(softmax(f(x)) ‖ softmax(f(x')))`` (``KLDivLoss(size_average=False)`` on
``log_softmax(f(x'))`` and ``softmax(f(x))``), a signed step, a clip to ``[x − ε, x + ε]``
and to [0, 1]; then ``CE(f(x), y) + β · KL_sum / B`` with the gradient through both sides.
"""

from __future__ import annotations

import torch
from artplug_plugins.trades import TradesKL, TradesLoss
from refkit import TinyNet, assert_close, batch, param_grads, state
from torch import Tensor, nn

import artplug


def softmax(z: Tensor) -> Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def kl_sum(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """Σ_i Σ_k p_ik (log p_ik − log q_ik), p = softmax(clean), q = softmax(adv)."""
    p = softmax(clean_logits)
    q = softmax(adv_logits)
    return (p * (torch.log(p) - torch.log(q))).sum()


def reference_attack(
    model: nn.Module, x: Tensor, eps: float, step: float, steps: int, scale: float = 1.0
) -> Tensor:
    """The attack loop of trades_loss (the Gaussian draw is the caller's seeded generator)."""
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        # The reference recomputes f(x) at every step; the model is fixed, so the value is too.
        loss = kl_sum(scale * model(x).detach(), scale * model(x_adv))
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * torch.sign(grad)
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach()


def reference_loss(clean: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """CE(f(x), y) + β · KL_sum / B, written out."""
    log_p = torch.log(softmax(clean))
    ce = -log_p[torch.arange(len(y)), y].mean()
    return ce + beta * kl_sum(clean, adv) / clean.shape[0]


def test_kl_attack_matches_the_reference_loop() -> None:
    model = TinyNet()
    # Inside [0.05, 0.95] the 0.001 start never leaves [0, 1] or the ball, so projecting the
    # start (artplug) and not projecting it (the reference) cannot differ.
    x, y = batch(low=0.05, high=0.95)
    eps, step, steps = 0.031, 0.007, 10
    attack = TradesKL(TradesKL.Params(steps=steps, step_size=step))
    torch.manual_seed(7)
    ours = attack.generate(model, x, y, state(model, eps))
    torch.manual_seed(7)
    theirs = reference_attack(model, x, eps, step, steps)
    assert_close(ours, theirs, "trades-kl x_adv")
    assert (ours - x).abs().max() <= eps + 1e-12


def test_trades_loss_value_and_gradients_match() -> None:
    model = TinyNet()
    x, y = batch()
    x_adv = (x + 0.03 * torch.randn(x.shape, dtype=torch.float64)).clamp(0, 1)
    term = TradesLoss(TradesLoss.Params(beta=6.0))
    clean, adv = model(x), model(x_adv)
    ours = term(artplug.Outputs(x, y, x_adv, clean, adv), state(model, 0.031))
    theirs = reference_loss(model(x), model(x_adv), y, beta=6.0)
    assert_close(ours, theirs, "trades loss")
    for a, b in zip(param_grads(ours, model), param_grads(theirs, model), strict=True):
        assert_close(a, b, "trades loss gradient")


def test_the_clean_side_of_the_kl_is_not_detached() -> None:
    """The gradient reaches f(x) through the KL too: detaching it changes the gradient."""
    model = TinyNet()
    x, y = batch()
    x_adv = (x + 0.03).clamp(0, 1)
    term = TradesLoss(TradesLoss.Params(beta=6.0, natural=False))
    ours = term(artplug.Outputs(x, y, x_adv, model(x), model(x_adv)), state(model, 0.031))
    detached = 6.0 * kl_sum(model(x).detach(), model(x_adv)) / x.shape[0]
    a = param_grads(ours, model)[0]
    b = param_grads(detached, model)[0]
    assert (a - b).abs().max() > 1e-6
