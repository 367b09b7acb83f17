"""FastAT's FGSM-RS step, SLAT's input and latent steps and SAT's SmoothReLU, in float64.

References:

- FGSM-RS: ``locuslab/fast_adversarial``, ``CIFAR10/train_fgsm.py``, ``main``: δ uniform in
  [−ε, ε] and clipped so that x + δ is an image; one signed step of α on the cross-entropy's
  δ-gradient; clip δ to [−ε, ε] and again to the image box.
- SLAT: ``geonyeong-park/SLAT``, ``solver.py`` ``Solver._train_epoch`` (branch ``advGNI``) and
  ``model/hidden_module.py`` (``HiddenPerturb``): one clean forward/backward gives the input
  and latent gradients; input step ``clip(0.9 ε sign(g_x), ±ε)`` from the clean point, clipped
  to the image; latent step ``clip(1.8 η sign(g_h), ±η)`` added to the latent map of the
  input-perturbed forward, then clipped into the per-(example, channel) spatial [min, max] of
  that map ("domain constraint"), the added amount being a constant for autograd.
- SmoothReLU: ``cihangxie/SmoothAdversarialTraining``, ``ResNet/resnet_model.py``
  (``activation_list``): ``relu(x − log(β|x| + 1)/β)``, ``β = b²``, ``b`` learnable from 20.
"""

from __future__ import annotations

import torch
from artplug_plugins.fgsm import FGSM
from artplug_plugins.slat import LatentSites, Slat
from artplug_plugins.smooth import SmoothReLU
from refkit import assert_close, batch, param_grads, state
from torch import Tensor, nn

from artplug.phase import running


def ce(logits: Tensor, y: Tensor) -> Tensor:
    z = logits - logits.max(dim=1, keepdim=True).values
    log_p = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    return -log_p[torch.arange(len(y)), y].mean()


class ConvNet(nn.Module):
    """conv1 (1x1, 3 -> 2 channels), tanh, flatten, fc: a site with spatial dimensions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(3, 2, kernel_size=1)
        self.fc = nn.Linear(8, 4)
        self.double().train()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv1(x)).flatten(1))


def test_fgsm_rs_matches_fastat() -> None:
    model = ConvNet()
    x, y = batch()
    eps = 8 / 255
    alpha = 1.25 * eps
    torch.manual_seed(11)
    ours = FGSM(FGSM.Params(random_start=True)).generate(model, x, y, state(model, eps))
    torch.manual_seed(11)
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = torch.minimum(torch.maximum(delta, -x), 1.0 - x).requires_grad_(True)
    (grad,) = torch.autograd.grad(ce(model(x + delta), y), delta)
    delta = torch.clamp(delta.detach() + alpha * torch.sign(grad), -eps, eps)
    delta = torch.minimum(torch.maximum(delta, -x), 1.0 - x)
    assert_close(ours, x + delta, "FGSM-RS x_adv")


def reference_slat(
    model: ConvNet, x: Tensor, y: Tensor, eps: float, eta: float, alpha: float = 0.9
) -> tuple[Tensor, Tensor]:
    """(x_adv, training loss) of one SLAT step on ``model`` with the site after conv1."""
    x_in = x.clone().requires_grad_(True)
    h = model.conv1(x_in)
    loss = ce(model.fc(torch.tanh(h).flatten(1)), y)
    g_x, g_h = torch.autograd.grad(loss, [x_in, h])
    step = torch.clamp(alpha * eps * torch.sign(g_x), -eps, eps)
    x_adv = torch.clamp(x + step, 0.0, 1.0)
    delta = torch.clamp(2 * alpha * eta * torch.sign(g_h), -eta, eta)
    h_adv = model.conv1(x_adv)
    low = h_adv.detach().amin(dim=(2, 3), keepdim=True)
    high = h_adv.detach().amax(dim=(2, 3), keepdim=True)
    shift = torch.minimum(torch.maximum(delta, low - h_adv.detach()), high - h_adv.detach())
    logits = model.fc(torch.tanh(h_adv + shift).flatten(1))
    return x_adv, ce(logits, y)


def test_slat_input_and_latent_steps_match_the_code() -> None:
    ours = ConvNet()
    LatentSites(LatentSites.Params(sites=["conv1"])).apply(ours)
    ref = ConvNet()  # same seed: same weights, no sites
    x, y = batch()
    eps = eta = 8 / 255
    st = state(ours, eps)
    with running("attack"):
        x_adv = Slat(Slat.Params()).generate(ours, x, y, st)
    with running("update-adv"):
        loss = ce(ours(x_adv), y)
    x_adv_ref, loss_ref = reference_slat(ref, x, y, eps, eta)
    assert_close(x_adv, x_adv_ref, "SLAT x_adv")
    assert_close(loss, loss_ref, "SLAT training loss")
    for a, b in zip(param_grads(loss, ours), param_grads(loss_ref, ref), strict=True):
        assert_close(a, b, "SLAT gradient")


def test_smoothrelu_value_and_gradients_match_the_formula() -> None:
    gen = torch.Generator().manual_seed(2)
    x = (0.05 * torch.randn(200, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ours = SmoothReLU(20.0).double()
    y_ours = ours(x)
    b = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    beta = b * b
    y_ref = torch.relu(x - torch.log(beta * torch.abs(x) + 1.0) / beta)
    assert_close(y_ours, y_ref, "SmoothReLU value")
    w = torch.randn(200, generator=gen, dtype=torch.float64)
    gx_ours, gb_ours = torch.autograd.grad((w * y_ours).sum(), [x, ours.b])
    gx_ref, gb_ref = torch.autograd.grad((w * y_ref).sum(), [x, b])
    assert_close(gx_ours, gx_ref, "SmoothReLU input gradient")
    assert_close(gb_ours, gb_ref, "SmoothReLU gradient in b")
    # The derivative for x > 0 is βx / (βx + 1), continuous at 0.
    positive = x.detach() > 0
    expected = (beta.detach() * x.detach()) / (beta.detach() * x.detach() + 1.0)
    assert_close(gx_ref[positive], (w * expected)[positive], "SmoothReLU derivative")
