"""Generic training schedules: learning-rate shapes and an eps warm-up.

Every schedule here is a pure function of :class:`artplug.Progress`, evaluated at the start of
every optimizer step, and sets knobs: ``lr_scale`` multiplies ``[optim] lr``,
``threat.eps_scale`` multiplies the recipe's eps for training attacks, and ``momentum`` (set by
``cyclic-lr`` only) replaces the optimizer's momentum (SGD ``momentum``, Adam's first beta).

Milestones count epochs *done*, from 0: a milestone ``e`` takes effect at the first step of
the epoch that has ``e`` finished epochs behind it, i.e. the ``(e + 1)``-th epoch counted from 1.
Reference codes that loop ``for epoch in range(1, epochs + 1)`` and decay ``if epoch >= 75``
(TRADES, AT_HE) therefore need the milestone ``74.0`` (see docs/techniques/trades.md).

Sources of the shapes:

- ``piecewise-lr``: step decay; the default milestones are the 110-epoch CIFAR-10 baseline of
  T. Pang, X. Yang, Y. Dong, H. Su, J. Zhu, "Bag of Tricks for Adversarial Training", ICLR 2021
  (arXiv:2010.00467): ×0.1 at epoch 100 and again at 105, evaluated on the fractional epoch.
- ``cosine-lr``: cosine annealing (I. Loshchilov, F. Hutter, "SGDR", ICLR 2017,
  arXiv:1608.03983) without restarts, after an optional linear warm-up.
- ``cyclic-lr``: the triangular one-cycle shape of E. Wong, L. Rice, J. Z. Kolter, "Fast is
  better than free", ICLR 2020 (peak at half of training) and of SLAT (Park & Lee, ICCV 2021;
  peak at 2/5). Both reference codes build ``torch.optim.lr_scheduler.CyclicLR`` with its
  defaults, which also cycle the SGD momentum between 0.9 and 0.8, inversely to the rate;
  ``cyclic-lr`` does the same through the ``momentum`` knob unless ``cycle_momentum = false``.
- ``linear-eps-warmup``: eps grows linearly to the recipe's value (Bag of Tricks lists ε
  warm-up among the tricks it tested).
"""

from __future__ import annotations

import itertools
import math
from typing import Self

from pydantic import Field, field_validator, model_validator

import artplug

LR_SCALE = "lr_scale"
EPS_SCALE = "threat.eps_scale"
MOMENTUM = "momentum"


class PiecewiseLR:
    """Step-decay learning rate: multiply by `factor` at each milestone epoch (Bag of Tricks).

    ``lr_scale = factor ** k`` where ``k`` is the number of milestones ``<= progress.epoch_float``
    (epochs done, counted from 0). An integer milestone ``e`` therefore decays from the first
    step of the 0-based epoch ``e``, the ``(e + 1)``-th epoch counted from 1; a fractional one
    decays inside its epoch. Bag of Tricks evaluates its schedule at ``epoch + (i + 1) / n``
    (0-based epoch, batch ``i`` of ``n``), so its decay ``t >= 100`` starts one step earlier,
    at the last step of the 100th epoch; TRADES and AT_HE decay when the 1-based epoch reaches
    75, which is the milestone ``74.0`` here. An empty list keeps the scale at 1.
    """

    name = "piecewise-lr"
    paper = (
        'default milestones: T. Pang, X. Yang, Y. Dong, H. Su, J. Zhu, "Bag of Tricks '
        'for Adversarial Training", ICLR 2021 (arXiv:2010.00467)'
    )

    class Params(artplug.Params):
        """Parameters of the ``piecewise-lr`` schedule."""

        milestones: list[float] = Field(
            default_factory=lambda: [100.0, 105.0],
            description="epochs done (counted from 0, fractional allowed) after which the scale "
            "is multiplied by factor; 74 = from the 75th epoch counted from 1",
        )
        factor: float = Field(0.1, gt=0.0, le=1.0, description="decay factor per milestone")

        @field_validator("milestones")
        @classmethod
        def _increasing(cls, milestones: list[float]) -> list[float]:
            if any(m < 0 for m in milestones):
                raise ValueError(f"milestones must be >= 0 epochs, got {milestones}")
            if any(b <= a for a, b in itertools.pairwise(milestones)):
                raise ValueError(f"milestones must be strictly increasing, got {milestones}")
            return milestones

    def __init__(self, params: Params) -> None:
        self.params = params

    def knobs(self) -> frozenset[str]:
        """``{"lr_scale"}``."""
        return frozenset({LR_SCALE})

    def values(self, progress: artplug.Progress) -> dict[str, float]:
        """The step-decay scale at ``progress.epoch_float``."""
        epoch = progress.epoch_float
        passed = sum(1 for m in self.params.milestones if m <= epoch)
        return {LR_SCALE: float(self.params.factor**passed)}


class CosineLR:
    """Cosine-annealed learning rate after an optional linear warm-up (SGDR without restarts).

    During warm-up (``epoch_float < warmup_epochs``) the scale rises linearly from 0 to 1. After
    it, the scale follows ``final + (1 - final) * (1 + cos(pi * t)) / 2`` where ``t`` runs from 0
    at the end of warm-up to 1 at ``total_steps``, measured in steps. The last step of a run has
    ``t = 1 - 1/remaining`` (steps count from 0), so the scale approaches but does not reach
    ``final_scale``.
    """

    name = "cosine-lr"
    paper = (
        'I. Loshchilov, F. Hutter, "SGDR: Stochastic Gradient Descent with Warm '
        'Restarts", ICLR 2017 (arXiv:1608.03983), without restarts'
    )

    class Params(artplug.Params):
        """Parameters of the ``cosine-lr`` schedule."""

        warmup_epochs: float = Field(
            0.0, ge=0.0, description="epochs of linear warm-up from 0 to 1 (0 = none)"
        )
        final_scale: float = Field(
            0.0, ge=0.0, le=1.0, description="scale reached at the end of training"
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def knobs(self) -> frozenset[str]:
        """``{"lr_scale"}``."""
        return frozenset({LR_SCALE})

    def values(self, progress: artplug.Progress) -> dict[str, float]:
        """The warm-up or cosine scale at this step."""
        warmup = self.params.warmup_epochs
        if progress.epoch_float < warmup:
            return {LR_SCALE: progress.epoch_float / warmup}
        # Warm-up length in steps may be fractional (e.g. 0.5 epochs of 9 steps); t stays
        # continuous either way, starting at exactly 0 when warm-up ends.
        warmup_steps = warmup * progress.steps_per_epoch
        remaining = progress.total_steps - warmup_steps
        if remaining <= 0:
            # Warm-up covers the whole run: nothing left to anneal.
            return {LR_SCALE: 1.0}
        t = min(1.0, max(0.0, (progress.step - warmup_steps) / remaining))
        final = self.params.final_scale
        return {LR_SCALE: final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))}


class CyclicLR:
    """Triangular one-cycle learning rate: up to 1 at `peak_at`, then down (FastAT, SLAT).

    Linear from ``start_scale`` to 1 on ``[0, peak_at]`` and from 1 to ``end_scale`` on
    ``[peak_at, 1]`` in ``progress.fraction`` (``step / total_steps``). FastAT peaks at 0.5 and
    SLAT at 0.4, both going 0 -> 1 -> 0 (times a peak rate of 0.2).

    Both reference codes use ``torch.optim.lr_scheduler.CyclicLR`` (``base_lr = 0``,
    ``step_size_up = peak_at · total``, ``step_size_down = (1 − peak_at) · total``) and call
    ``scheduler.step()`` after every optimizer step, so the ``k``-th step (from 0) runs at the
    rate the scheduler gives after ``k`` calls: the first step has exactly ``start_scale``, as
    here. With the scheduler's defaults (``cycle_momentum=True``, ``base_momentum=0.8``,
    ``max_momentum=0.9``) the momentum moves against the rate:
    ``momentum = max_momentum − (max_momentum − base_momentum) · h``, where ``h`` is the
    triangle's height (0 at the ends, 1 at the peak). ``cycle_momentum = true`` (the default)
    sets it through the ``momentum`` knob at every step, which overrides ``[optim] momentum``;
    ``false`` leaves the optimizer's momentum alone.
    """

    name = "cyclic-lr"
    paper = (
        'E. Wong, L. Rice, J. Z. Kolter, "Fast is better than free: Revisiting '
        'adversarial training", ICLR 2020 (arXiv:2001.03994); also SLAT (Park & Lee, '
        "ICCV 2021)"
    )

    class Params(artplug.Params):
        """Parameters of the ``cyclic-lr`` schedule."""

        peak_at: float = Field(
            0.5, gt=0.0, lt=1.0, description="fraction of training at which the scale is 1"
        )
        start_scale: float = Field(0.0, ge=0.0, description="scale at the first step")
        end_scale: float = Field(0.0, ge=0.0, description="scale at the end of training")
        cycle_momentum: bool = Field(
            True,
            description="cycle the momentum inversely to the rate (torch CyclicLR default, "
            "used by FastAT and SLAT); false keeps [optim] momentum",
        )
        base_momentum: float = Field(
            0.8, ge=0.0, lt=1.0, description="momentum at the peak of the rate"
        )
        max_momentum: float = Field(
            0.9, ge=0.0, lt=1.0, description="momentum at the ends, where the rate is lowest"
        )

        @model_validator(mode="after")
        def _momentum_order(self) -> Self:
            if self.base_momentum > self.max_momentum:
                raise ValueError(
                    f"base_momentum ({self.base_momentum}) must not exceed max_momentum "
                    f"({self.max_momentum})"
                )
            return self

    def __init__(self, params: Params) -> None:
        self.params = params

    def knobs(self) -> frozenset[str]:
        """``{"lr_scale", "momentum"}``, or ``{"lr_scale"}`` with ``cycle_momentum = false``."""
        if self.params.cycle_momentum:
            return frozenset({LR_SCALE, MOMENTUM})
        return frozenset({LR_SCALE})

    def height(self, progress: artplug.Progress) -> float:
        """The triangle's height in [0, 1] at ``progress.fraction`` (1 at ``peak_at``)."""
        p = self.params
        f = min(1.0, max(0.0, progress.fraction))
        if f <= p.peak_at:
            return f / p.peak_at
        return (1.0 - f) / (1.0 - p.peak_at)

    def values(self, progress: artplug.Progress) -> dict[str, float]:
        """The triangular scale (and the momentum) at ``progress.fraction``."""
        p = self.params
        f = min(1.0, max(0.0, progress.fraction))
        if f <= p.peak_at:
            scale = p.start_scale + (1.0 - p.start_scale) * f / p.peak_at
        else:
            scale = 1.0 + (p.end_scale - 1.0) * (f - p.peak_at) / (1.0 - p.peak_at)
        out = {LR_SCALE: scale}
        if p.cycle_momentum:
            span = p.max_momentum - p.base_momentum
            out[MOMENTUM] = p.max_momentum - span * self.height(progress)
        return out


class LinearEpsWarmup:
    """Linear eps warm-up: the training threat grows from `start_scale` × eps to eps.

    ``threat.eps_scale = start_scale + (1 - start_scale) * min(1, epoch_float / warmup_epochs)``.
    Only training attacks see the scaled eps; validation and the final evaluation always use the
    recipe's eps. A perturbation whose ``step_size`` is left at its default (a multiple of eps)
    scales its step with it.
    """

    name = "linear-eps-warmup"
    paper = (
        "eps warm-up, one of the tricks tested by T. Pang, X. Yang, Y. Dong, H. Su, J. "
        'Zhu, "Bag of Tricks for Adversarial Training", ICLR 2021 (arXiv:2010.00467)'
    )

    class Params(artplug.Params):
        """Parameters of the ``linear-eps-warmup`` schedule."""

        warmup_epochs: float = Field(
            5.0, gt=0.0, description="epochs over which eps grows to its full value"
        )
        start_scale: float = Field(
            0.0, ge=0.0, le=1.0, description="fraction of eps at the first step"
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def knobs(self) -> frozenset[str]:
        """``{"threat.eps_scale"}``."""
        return frozenset({EPS_SCALE})

    def values(self, progress: artplug.Progress) -> dict[str, float]:
        """The eps scale at ``progress.epoch_float``."""
        p = self.params
        ramp = min(1.0, progress.epoch_float / p.warmup_epochs)
        return {EPS_SCALE: p.start_scale + (1.0 - p.start_scale) * ramp}


@artplug.hookimpl
def register_schedules(register: artplug.Register) -> None:
    """Register ``piecewise-lr``, ``cosine-lr``, ``cyclic-lr`` and ``linear-eps-warmup``."""
    register(PiecewiseLR)
    register(CosineLR)
    register(CyclicLR)
    register(LinearEpsWarmup)
