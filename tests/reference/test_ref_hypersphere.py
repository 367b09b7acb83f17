"""Hypersphere embedding (HE) and its placement in PGD-AT, TRADES, ALP and FreeAT, in float64.

Reference: ``ShawnXYang/AT_HE``. Head: ``CIFAR-10/models/wideresnet.py`` (``forward``: the
pooled features and the fc rows L2-normalised, no bias, output = cosines). Margin loss:
``CIFAR-10/he.py``, class ``HELoss`` (``−log(e^{s(cos_y − m)} / (e^{s(cos_y − m)} +
Σ_{k≠y} e^{s cos_k}))``, batch mean). Placement: ``CIFAR-10/losses.py`` (``pgd_loss``: attack on
CE of ``s·cos`` without margin, train on the margin loss of the adversarial cosines;
``trades_loss``: KL on ``s·cos`` in attack and loss, margin only in the clean term;
``alp_loss``: ``0.5 L_HE(x) + 0.5 L_HE(x') + β mean((cos(x) − cos(x'))²)``, pairing on the
unscaled cosines) and ``ImageNet/main_free.py`` (FreeAT: δ moves along the input gradient of the
margin loss itself). Plain ALP: ``tensorflow/models`` ``research/adversarial_logit_pairing``
``train.py`` (mean CE over clean and adversarial halves + λ · mean squared logit difference).
"""

from __future__ import annotations

import copy

import torch
from artplug_plugins.alp import LogitPairing
from artplug_plugins.free_at import FreeAT
from artplug_plugins.hypersphere import HEMargin, Hypersphere
from artplug_plugins.pgd_at import PGD, CrossEntropy
from artplug_plugins.trades import TradesKL, TradesLoss
from refkit import TinyNet, assert_close, batch, param_grads, state
from test_ref_trades import reference_attack as reference_trades_attack
from torch import Tensor, nn

import artplug

S, M = 10.0, 0.2


def unit(t: Tensor) -> Tensor:
    return t / torch.sqrt((t * t).sum(dim=1, keepdim=True))


class ReferenceHE(nn.Module):
    """The AT_HE head on a copy of TinyNet's feature extractor: ``<W_k/‖W_k‖, φ/‖φ‖>``.

    As in the reference forward, the rows are renormalised by assigning ``weight.data`` (no
    autograd through the normalisation: projected SGD on the sphere), the features are
    normalised differentiably, and there is no bias.
    """

    def __init__(self, base: TinyNet) -> None:
        super().__init__()
        self.features = copy.deepcopy(base.features)
        self.weight = nn.Parameter(base.fc.weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        self.weight.data = unit(self.weight.data)
        return unit(self.features(x)) @ self.weight.T

    def ordered(self) -> list[nn.Parameter]:
        """Parameters in artplug's order (features first, then the head)."""
        return [*self.features.parameters(), self.weight]


def he_loss(cos: Tensor, y: Tensor, s: float, m: float) -> Tensor:
    """HELoss written out: no log-sum-exp, safe in float64 with |cos| ≤ 1."""
    target = torch.exp(s * (cos[torch.arange(len(y)), y] - m))
    others = torch.exp(s * cos).sum(dim=1) - torch.exp(s * cos[torch.arange(len(y)), y])
    return -torch.log(target / (target + others)).mean()


def ce(logits: Tensor, y: Tensor) -> Tensor:
    z = logits - logits.max(dim=1, keepdim=True).values
    log_p = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    return -log_p[torch.arange(len(y)), y].mean()


def pair() -> tuple[TinyNet, ReferenceHE]:
    """An HE-transformed TinyNet (artplug) and the reference head on a deep copy of it."""
    ours = TinyNet()
    reference = ReferenceHE(ours)
    Hypersphere(Hypersphere.Params(s=S)).apply(ours)
    return ours, reference


def outputs(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> artplug.Outputs:
    return artplug.Outputs(x, y, x_adv, model(x), model(x_adv))


def test_cosine_head_and_margin_loss_match_he_loss() -> None:
    ours, ref = pair()
    x, y = batch()
    assert_close(ours(x), ref(x), "cosines")
    term = HEMargin(HEMargin.Params(m=M, on="clean"))
    value = term(outputs(ours, x, y, x), state(ours, 0.031))
    assert_close(value, he_loss(ref(x), y, S, M), "he-margin")


def reference_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, step: float, steps: int):
    """AT_HE pgd_loss's attack on CE(s·cos) without margin; uniform start (artplug's start,
    drawn from the same seeded generator; AT_HE itself starts at x + 0.001 N(0, I))."""
    x_adv = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0.0, 1.0)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(ce(S * model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + step * torch.sign(grad)
        x_adv = torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), 0.0, 1.0)
    return x_adv.detach()


def test_pgd_at_he_attack_has_no_margin_and_training_has_it() -> None:
    ours, ref = pair()
    x, y = batch()
    eps, step = 0.031, 0.007
    torch.manual_seed(3)
    adv = PGD(PGD.Params(steps=10, step_size=step)).generate(ours, x, y, state(ours, eps))
    torch.manual_seed(3)
    adv_ref = reference_pgd(ref, x, y, eps, step, 10)
    assert_close(adv, adv_ref, "PGD-AT+HE x_adv")
    loss = HEMargin(HEMargin.Params(m=M))(outputs(ours, x, y, adv), state(ours, eps))
    loss_ref = he_loss(ref(adv_ref), y, S, M)
    assert_close(loss, loss_ref, "PGD-AT+HE loss")
    for a, b in zip(param_grads(loss, ours), param_grads(loss_ref, ref.ordered()), strict=True):
        assert_close(a, b, "PGD-AT+HE gradient")


def test_trades_he_kl_on_scaled_cosines_and_margin_on_clean_only() -> None:
    ours, ref = pair()
    x, y = batch(low=0.05, high=0.95)
    eps, step, beta = 0.031, 0.007, 6.0
    torch.manual_seed(5)
    adv = TradesKL(TradesKL.Params(steps=10, step_size=step)).generate(ours, x, y, state(ours, eps))
    torch.manual_seed(5)
    adv_ref = reference_trades_attack(ref, x, eps, step, 10, scale=S)
    assert_close(adv, adv_ref, "TRADES+HE x_adv")
    out = outputs(ours, x, y, adv)
    st = state(ours, eps)
    margin = HEMargin(HEMargin.Params(m=M, on="clean"))(out, st)
    kl = TradesLoss(TradesLoss.Params(beta=beta, natural=False))(out, st)
    loss = margin + kl
    cos, cos_adv = ref(x), ref(adv_ref)
    p, q = torch.softmax(S * cos, dim=1), torch.softmax(S * cos_adv, dim=1)
    loss_ref = he_loss(cos, y, S, M) + beta * (p * (p.log() - q.log())).sum() / len(y)
    assert_close(loss, loss_ref, "TRADES+HE loss")
    for a, b in zip(param_grads(loss, ours), param_grads(loss_ref, ref.ordered()), strict=True):
        assert_close(a, b, "TRADES+HE gradient")


def test_alp_he_pairs_the_unscaled_cosines() -> None:
    ours, ref = pair()
    x, y = batch()
    adv = (x + 0.02 * torch.sign(torch.randn(x.shape, dtype=torch.float64))).clamp(0, 1)
    out = outputs(ours, x, y, adv)
    st = state(ours, 0.031)
    beta = 0.5
    loss = (
        0.5 * HEMargin(HEMargin.Params(m=0.3, on="clean"))(out, st)
        + 0.5 * HEMargin(HEMargin.Params(m=0.3, on="adv"))(out, st)
        + beta * LogitPairing(LogitPairing.Params())(out, st)
    )
    cos, cos_adv = ref(x), ref(adv)
    loss_ref = (
        0.5 * he_loss(cos, y, S, 0.3)
        + 0.5 * he_loss(cos_adv, y, S, 0.3)
        + beta * ((cos - cos_adv) ** 2).sum() / cos.numel()
    )
    assert_close(loss, loss_ref, "ALP+HE loss")
    for a, b in zip(param_grads(loss, ours), param_grads(loss_ref, ref.ordered()), strict=True):
        assert_close(a, b, "ALP+HE gradient")


def test_plain_alp_objective() -> None:
    model = TinyNet()
    x, y = batch()
    adv = (x + 0.03).clamp(0, 1)
    out = outputs(model, x, y, adv)
    st = state(model, 0.031)
    loss = (
        0.5 * CrossEntropy(CrossEntropy.Params(on="clean"))(out, st)
        + 0.5 * CrossEntropy(CrossEntropy.Params(on="adv"))(out, st)
        + 0.5 * LogitPairing(LogitPairing.Params())(out, st)
    )
    z, z_adv = model(x), model(adv)
    # Mean CE over the concatenated 2B logits + λ · mean over B·K squared differences.
    loss_ref = ce(torch.cat([z, z_adv]), torch.cat([y, y])) + 0.5 * ((z - z_adv) ** 2).mean()
    assert_close(loss, loss_ref, "ALP loss")


def test_free_at_he_moves_delta_along_the_margin_loss_gradient() -> None:
    """Two minibatches × 3 replays, each replay one SGD step; δ persists across batches.

    Inputs stay inside [0.3, 0.7] and ε = 0.05, so x + δ never reaches the [0, 1] box: the
    reference codes differ from artplug only where it does (see docs/techniques/free-at.md).
    """
    ours, ref = pair()
    eps, lr, replays = 0.05, 0.1, 3
    technique = FreeAT(FreeAT.Params(replays=replays))
    delta_ref = torch.zeros(5, 3, 2, 2, dtype=torch.float64)
    for seed in (1, 2):
        x, y = batch(seed=seed, low=0.3, high=0.7)
        for _ in range(replays):
            # artplug: the engine's replay (generate, forward, one backward, δ update, step).
            st = state(ours, eps)
            x_adv = technique.generate(ours, x, y, st).requires_grad_(True)
            loss = HEMargin(HEMargin.Params(m=M))(outputs(ours, x, y, x_adv), st)
            params = [p for p in ours.parameters() if p.requires_grad]
            *grads, input_grad = torch.autograd.grad(loss, [*params, x_adv])
            technique.after_backward(input_grad, st)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(lr * g)
            # Reference (FreeAT's replay loop with the HE loss, as AT_HE ImageNet main_free.py).
            d = delta_ref.clone().requires_grad_(True)
            loss_ref = he_loss(ref(x + d), y, S, M)
            ref_params = ref.ordered()
            *ref_grads, d_grad = torch.autograd.grad(loss_ref, [*ref_params, d])
            delta_ref = torch.clamp(delta_ref + eps * torch.sign(d_grad), -eps, eps)
            delta_ref = torch.minimum(torch.maximum(delta_ref, -x), 1.0 - x)
            with torch.no_grad():
                for p, g in zip(ref_params, ref_grads, strict=True):
                    p.sub_(lr * g)
            assert_close(loss, loss_ref, "FreeAT+HE loss")
    assert_close(technique.state_dict()["delta"], delta_ref, "FreeAT+HE delta")
    assert_close(ours.fc.weight, ref.weight, "FreeAT+HE head after training")
