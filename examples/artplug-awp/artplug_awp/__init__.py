"""Adversarial Weight Perturbation (AWP) as an artplug model transform with an update hook.

Reference: D. Wu, S.-T. Xia, Y. Wang, "Adversarial Weight Perturbation Helps Robust
Generalization", NeurIPS 2020 (arXiv:2004.05884); official code ``csdongxian/AWP``
(``AdvWeightPerturb`` in ``AT_AWP/utils_awp.py`` and ``TRADES_AWP/utils_awp.py``).

Before each weight update, AWP moves every weight matrix ``w`` (convolution and linear
weights: parameters with more than one dimension; biases and BatchNorm parameters are left
alone, as the reference's ``diff_in_weights`` skips tensors with ``dim <= 1``) one step up the
adversarial loss, with a size relative to the layer's own norm::

    v = gamma * ||w|| / ||g|| * g,   g = d L_awp / d w   (norms per layer, over the whole tensor)

then takes the update's gradient at ``w + v`` and restores ``w`` before the optimizer steps,
so the step ``w <- w - lr * grad L(w + v)`` is applied to the original weights.

How this maps onto the reference code:

- ``calc_awp`` copies the model into a proxy, takes one SGD step (lr 0.01, no momentum) on
  ``-L_awp`` and returns the per-layer normalised difference; for plain SGD that difference
  is the gradient direction, so here it is one ``torch.autograd.grad`` on the model itself.
  The proxy kept the model's BatchNorm running statistics out of the ascent forward; here they
  are saved and put back, so the ascent pass leaves no trace either. Like the proxy, the
  ascent runs in train mode (batch statistics).
- ``perturb`` adds ``gamma * diff``; ``restore`` subtracts it after the update's backward and
  before ``optimizer.step()``. Here the original weights are copied and written back, which
  restores them exactly (``w + v - v`` need not round back to ``w``).
- ``L_awp`` is ``loss = "ce"``: cross-entropy on ``x_adv`` (AT_AWP), or ``loss = "trades-kl"``:
  ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` with batch-mean KL (TRADES_AWP).
- ``warmup_epochs``: the reference's ``--awp-warmup`` (no perturbation before that epoch).

artplug's four technique kinds cannot express this (a perturbation changes the input, a loss
term must not touch weights, a transform's ``apply`` runs once), so AWP is a model transform
whose ``apply`` changes nothing and which implements the optional :class:`artplug.UpdateHook`
capability (``before_update`` / ``after_backward_update``), called by the engine around every
weight update.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

import artplug

__version__ = "0.1.0"

# The reference's EPS in diff_in_weights: guards a zero gradient (a dead layer) from 0/0.
_EPS = 1e-20


class AdversarialWeightPerturbation:
    """AWP: take each update's gradient at weights moved up the adversarial loss (Wu 2020)."""

    name = "awp"

    class Params(BaseModel):
        """The recipe keys of ``[[transform]] use = "awp"``."""

        model_config = ConfigDict(extra="forbid", frozen=True)
        gamma: float = Field(5e-3, ge=0.0, description="relative radius of the weight step")
        loss: Literal["ce", "trades-kl"] = Field(
            "ce", description="the loss the weights ascend: PGD-AT's CE or TRADES' objective"
        )
        beta: float = Field(6.0, ge=0.0, description="KL weight of loss = 'trades-kl'")
        warmup_epochs: int = Field(0, ge=0, description="epochs without weight perturbation")

    def __init__(self, params: Params) -> None:
        self.params = params
        # (parameter, its value before before_update) for the step in progress.
        self._saved: list[tuple[nn.Parameter, Tensor]] = []

    def apply(self, model: nn.Module) -> nn.Module:
        """AWP does not change the network; it acts around each update (``before_update``)."""
        return model

    def ascent_loss(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """The loss whose gradient gives the weight perturbation's direction (``L_awp``)."""
        logits_adv = artplug.full_precision(model(x_adv))
        if self.params.loss == "ce":
            return F.cross_entropy(logits_adv, y)
        logits = artplug.full_precision(model(x))
        robust = F.kl_div(
            F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean"
        )
        return F.cross_entropy(logits, y) + self.params.beta * robust

    def perturbation(
        self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor
    ) -> list[tuple[nn.Parameter, Tensor]]:
        """``(w, v)`` for every weight matrix ``w`` of ``model``; changes nothing.

        ``v = gamma * ||w|| / (||g|| + eps) * g`` with ``g`` the gradient of
        :meth:`ascent_loss`. Buffers (BatchNorm running statistics) are as they were.
        """
        weights = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        loss = self.ascent_loss(model, x, x_adv, y)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
            return [
                (w, self.params.gamma * w.norm() / (g.norm() + _EPS) * g)
                for w, g in zip(weights, grads, strict=True)
                if g is not None
            ]

    def before_update(
        self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, state: artplug.StepState
    ) -> None:
        """Move the weights to ``w + v`` for the coming update (AdvWeightPerturb.perturb)."""
        self._saved = []
        if self.params.gamma == 0.0 or state.progress.epoch < self.params.warmup_epochs:
            return
        steps = self.perturbation(model, x, x_adv, y)
        with torch.no_grad():
            for w, v in steps:
                self._saved.append((w, w.detach().clone()))
                w.add_(v)

    def after_backward_update(self, model: nn.Module) -> None:
        """Put the original weights back before the optimizer steps (AdvWeightPerturb.restore)."""
        with torch.no_grad():
            for w, original in self._saved:
                w.copy_(original)
        self._saved = []


@artplug.hookimpl
def register_model_transforms(register: artplug.Register) -> None:
    """Register AWP as a model transform (it is an :class:`artplug.UpdateHook` too)."""
    register(AdversarialWeightPerturbation)
