"""Free adversarial training: the attack's gradient comes "for free" with the weight update.

Reference: A. Shafahi, M. Najibi, A. Ghiasi, Z. Xu, J. Dickerson, C. Studer, L. S. Davis,
G. Taylor, T. Goldstein, "Adversarial Training for Free!", NeurIPS 2019 (arXiv:1904.12843).

FreeAT keeps one perturbation δ for the whole run. Each minibatch is replayed ``m`` times; every
replay trains on ``clip_[0,1](x + δ)`` and the single backward pass of that replay yields both
the weight gradient and the input gradient, which moves δ one signed step (of length ε in the
paper) before it is projected back into the ball. δ is not reset between minibatches: the
next batch starts from the perturbation the previous one left. This module registers the
perturbation ``free``; the replays and the δ update are driven by the engine through the
optional Perturbation members ``replays`` and ``after_backward``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

import artplug


class _ReplaysFromParams:
    """``replays`` of a FreeAT instance: its *current* params (a schedule may swap them).

    Read on the class (registry and contract checks introspect ``cls.replays``) it gives the
    ``Params`` default, so the attribute is an int both ways.
    """

    def __get__(self, obj: FreeAT | None, owner: type[FreeAT]) -> int:
        if obj is None:
            return int(owner.Params.model_fields["replays"].default)
        # The engine validates knob updates, so this is already an int >= 1.
        return obj.params.replays


class FreeAT:
    """FreeAT (Shafahi et al. 2019): replay each batch m times; δ persists, updated per backward.

    ``generate`` returns ``project(x + δ[:n], x, threat)`` for a batch of ``n`` examples, a fresh
    detached tensor the engine marks as requiring grad. After the engine's backward pass (the
    same one that produces the weight gradient), ``after_backward`` moves the first ``n`` rows
    of δ one steepest-ascent step of ``step_size`` (``eps`` when None, as in FreeAT) along the
    input gradient — ``sign`` for L-inf, the per-example L2-normalised gradient for L2 — and
    projects δ back into the ball (L-inf: clip to ±eps; L2: rescale onto the sphere when
    outside). Only steps and signs of the gradient are used, so fp16 AMP's loss scaling does not
    matter; a gradient with inf/NaN (a step the AMP scaler will skip) leaves δ unchanged.

    δ starts at zeros, lives on the batch's device and dtype, and carries over between
    minibatches and replays. A smaller batch (the last one) uses and updates ``δ[:n]``; a larger
    one extends δ with zeros; a batch of another feature shape restarts from zeros. It is saved
    in checkpoints (``state_dict``, on the CPU) and moved back to the batch's device lazily.

    Epoch accounting: ``[run] epochs`` counts passes over the data and each minibatch is
    replayed ``replays`` = m times, so FreeAT-m for E epochs takes E·m optimizer steps per batch
    and costs about as much as natural training for E·m epochs, or PGD-(m−1) training for E
    epochs. The paper divides the natural training budget by m: its CIFAR-10 run is 80k steps
    counting replays at batch 128 with m = 8, i.e. about 205 / 8 ≈ 26 passes; the FastAT
    repository's re-implementation uses 10 passes × 8 replays. Schedules see ``progress.step``
    counting minibatches (the replays of one batch share a step), so epoch milestones are
    passes over the data.

    Combinations: the δ update uses the gradient of whatever training loss the recipe has, so
    HE + FreeAT (the ``he-margin`` loss on a hypersphere head) puts the margin inside the δ
    ascent automatically, as in the HE authors' ImageNet code. ``[perturbation] model_mode`` is
    irrelevant: δ is updated from the training forward, in train mode. TRADES cannot be combined
    (its KL term needs its own attack pass; FreeAT has none), and neither can other generators
    such as SPAT's or SLAT's, since a recipe has one perturbation.
    """

    name = "free"
    paper = (
        "A. Shafahi, M. Najibi, A. Ghiasi, Z. Xu, J. Dickerson, C. Studer, L. S. Davis, "
        'G. Taylor, T. Goldstein, "Adversarial Training for Free!", NeurIPS 2019 '
        "(arXiv:1904.12843)"
    )

    class Params(artplug.Params):
        """Parameters of the ``free`` perturbation."""

        replays: int = Field(
            8, ge=1, description="m: optimizer steps (and δ updates) per minibatch"
        )
        step_size: float | None = Field(
            None,
            gt=0,
            description="δ step length per replay in pixel units; None means eps (FreeAT)",
        )

    replays = _ReplaysFromParams()

    def __init__(self, params: Params) -> None:
        self.params = params
        self._delta: Tensor | None = None

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Reject TRADES: its KL term needs a separate attack, and FreeAT has no attack pass."""
        if "trades" in recipe.losses:
            yield (
                "cannot be combined with the trades loss: TRADES needs its own KL attack, but "
                "FreeAT's δ comes from the training backward (no separate attack pass); use "
                '[perturbation] use = "trades-kl" for TRADES'
            )

    def _delta_for(self, x: Tensor) -> Tensor:
        """δ on ``x``'s device and dtype, with at least ``len(x)`` rows of ``x``'s shape."""
        delta = self._delta
        if delta is None or delta.shape[1:] != x.shape[1:]:
            delta = torch.zeros_like(x)
        else:
            # A no-op when already there; otherwise e.g. a δ restored from a CPU checkpoint.
            delta = delta.to(device=x.device, dtype=x.dtype)
            if delta.shape[0] < x.shape[0]:
                extra = x.new_zeros((x.shape[0] - delta.shape[0], *x.shape[1:]))
                delta = torch.cat([delta, extra])
        self._delta = delta
        return delta

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return ``project(x + δ[:n], x, state.threat)`` (fresh, detached; no forward pass)."""
        x = x.detach()
        delta = self._delta_for(x)
        # project() builds a new tensor (clamp), never a view of x: the engine sets
        # requires_grad on the result, which must not touch the batch itself.
        return artplug.project(x + delta[: x.shape[0]], x, state.threat).detach()

    def after_backward(self, input_grad: Tensor | None, state: artplug.StepState) -> None:
        """Move δ[:n] one ascent step along the training loss's input gradient, then project."""
        if input_grad is None:
            # No loss term used the adversarial forward: there is nothing to ascend.
            return
        grad = input_grad.detach()
        delta = self._delta_for(grad)
        n = grad.shape[0]
        threat = state.threat
        step_size = threat.eps if self.params.step_size is None else self.params.step_size
        old = delta[:n]
        # The ball only, no [0, 1] box: δ is shared by batches, each clipped in generate().
        new = artplug.project_ball(old + artplug.ascent_step(grad, step_size, threat.norm), threat)
        # An overflowing fp16 step (the scaler will skip it) must not poison δ with NaN;
        # torch.where keeps the decision on the device (no host sync).
        new = torch.where(torch.isfinite(grad).all(), new, old)
        delta[:n] = new.to(delta.dtype)

    def state_dict(self) -> dict[str, Any]:
        """``{"delta": δ on the CPU (a copy), or None before the first batch}``."""
        delta = self._delta
        return {"delta": None if delta is None else delta.detach().to("cpu", copy=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore δ; it moves to the batch's device and dtype at the next call."""
        delta = state.get("delta")
        self._delta = None if delta is None else delta.detach().clone()


@artplug.hookimpl
def register_perturbations(register: artplug.Register) -> None:
    """Register the ``free`` perturbation."""
    register(FreeAT)
