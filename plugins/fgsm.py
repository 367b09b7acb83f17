"""FGSM adversarial training, optionally from a random start ("Fast is better than free").

References:

- I. J. Goodfellow, J. Shlens, C. Szegedy, "Explaining and Harnessing Adversarial Examples",
  ICLR 2015 (arXiv:1412.6572): one signed-gradient step of length ε from the clean input.
- E. Wong, L. Rice, J. Z. Kolter, "Fast is better than free: Revisiting adversarial training",
  ICLR 2020 (arXiv:2001.03994): start uniformly in the ball and take a longer step
  (α = 1.25 ε, 10/255 at ε = 8/255). Its README lists a too-large step and a too-small
  random-start region among the causes of catastrophic overfitting.

FastAT also uses a cyclic learning rate (the ``cyclic-lr`` schedule) and few epochs; its early
stop on a PGD check is not part of this perturbation. FastAT crafts the step with BN in train
mode (``[perturbation] model_mode = "train"``); artplug's default is eval mode.
Under an L2 threat the step is the L2-normalised gradient (the "fast gradient method").
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

import artplug


class FGSM:
    """Single-step FGSM attack; with random_start it is FastAT's FGSM-RS (Wong et al. 2020).

    From the clean input (or a uniform random point of the ball), take one steepest-ascent step
    on the cross-entropy and project onto the ball and [0, 1]. ``step_size = None`` means ``eps``
    without a random start (Goodfellow et al.) and ``1.25 * eps`` with one (FastAT's α = 10/255
    at ε = 8/255). ``eps`` is the step's training threat (``state.threat``, scaled by any eps
    warm-up); an explicit ``step_size`` is not scaled.
    """

    name = "fgsm"
    paper = (
        'I. J. Goodfellow, J. Shlens, C. Szegedy, "Explaining and Harnessing '
        'Adversarial Examples", ICLR 2015 (arXiv:1412.6572); with random_start: E. '
        'Wong, L. Rice, J. Z. Kolter, "Fast is better than free: Revisiting adversarial '
        'training", ICLR 2020 (arXiv:2001.03994)'
    )

    class Params(artplug.Params):
        """Parameters of the ``fgsm`` perturbation."""

        random_start: bool = Field(
            False, description="start uniformly in the ball (FastAT) instead of at the clean input"
        )
        step_size: float | None = Field(
            None,
            gt=0,
            description="step length in pixel units; None means 1.25 * eps with a random start, "
            "eps without",
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return the FGSM adversarial batch (detached, in [0, 1], inside ``state.threat``)."""
        # Read params at call time: schedules replace self.params between steps.
        params = self.params
        threat = state.threat
        x = x.detach()
        if threat.eps == 0:
            # A Python float, so no host sync; the ball is the point x.
            return x
        random_start = bool(params.random_start)
        if params.step_size is not None:
            step_size = params.step_size
        else:
            step_size = 1.25 * threat.eps if random_start else threat.eps
        start = artplug.random_start(x, threat) if random_start else x
        scale = artplug.attack_logit_scale(model)

        def objective(outputs: Tensor) -> Tensor:
            # Sum, not mean: the per-example gradient does not depend on the batch size.
            return F.cross_entropy(scale * outputs, y, reduction="sum")

        return artplug.projected_ascent(
            model, x, start, threat, objective, steps=1, step_size=step_size
        )


@artplug.hookimpl
def register_perturbations(register: artplug.Register) -> None:
    """Register the ``fgsm`` perturbation."""
    register(FGSM)
