"""MOAT: multi-stage optimization based adversarial training — a parametrised READING.

Reference: X. Wang, C. Song, L. Wang, K. He, "Multi-stage Optimization based Adversarial
Training", arXiv:2106.15357 (2021).

What the abstract says: single-step adversarial training tends to catastrophic overfitting;
MOAT adds multi-step adversarial examples to single-step training and, to keep the cost low,
periodically trains the model on benign examples, single-step adversarial examples and
multi-step adversarial examples, stage by stage ("mixed benign examples" are mentioned too).

What is a READING (the paper body and any official code could not be read; see
techniques.md §2.6 and §10): the stage lengths and their unit (epochs here), the order, the
rule that the stages cycle for the whole run, the single-step attack (FGSM from a uniform
random start with step 1.25·ε, as FastAT), the multi-step attack (PGD-10 with step ε/4, i.e.
2/255 at 8/255, from a uniform random start), and the meaning of mixing (a fixed fraction of
each adversarial batch left clean). Every one of these is a parameter; do not claim the
paper's numbers with these defaults until the paper has been read.

This module registers the perturbation ``moat`` (one generator with three stages, chosen by its
``stage`` parameter) and the schedule ``moat-stages``, which sets the knob
``perturbation.stage`` from the fractional epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from typing import Literal, Self

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

import artplug

StageName = Literal["clean", "single", "multi"]
STAGE_CODES: dict[str, int] = {"clean": 0, "single": 1, "multi": 2}
STAGE_KNOB = "perturbation.stage"


def _default_order() -> list[StageName]:
    return ["clean", "single", "multi"]


class MOAT:
    """MOAT's multi-stage generator (Wang et al. 2021, a reading): clean, FGSM-RS or PGD by stage.

    ``stage`` (read at every call, usually set by the ``moat-stages`` schedule):

    - 0: the clean batch, unchanged;
    - 1: single step: FGSM from a uniform random point of the ball with step
      ``single_step_size`` (None: 1.25·eps, FastAT's 10/255 at ε = 8/255);
    - 2: multi step: ``multi_steps`` PGD steps of ``multi_step_size`` (None: eps/4, 2/255 at
      ε = 8/255) from a uniform random start.

    Both attacks ascend the summed cross-entropy of ``attack_logit_scale · outputs`` with the
    steepest-ascent step of the threat's norm and project onto the ball and [0, 1]. eps is the
    step's training threat (``state.threat``); explicit step sizes are not scaled by an eps
    warm-up, the defaults are.

    ``clean_fraction`` = r (our reading of "mixed benign examples"): in stages 1 and 2 the first
    ⌊r·B⌋ examples of each batch stay clean and only the rest are attacked (attacking fewer
    examples is also cheaper). The attack sees only the attacked rows, which matters for
    BatchNorm only when ``[perturbation] model_mode = "train"``.
    """

    name = "moat"

    class Params(BaseModel):
        """Parameters of the ``moat`` perturbation."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        stage: int = Field(
            2,
            ge=0,
            le=2,
            description="0 = clean, 1 = single-step FGSM-RS, 2 = multi-step PGD "
            "(the moat-stages schedule sets it)",
        )
        single_step_size: float | None = Field(
            None, gt=0, description="stage-1 step in pixel units; None means 1.25 * eps"
        )
        multi_steps: int = Field(10, ge=1, description="stage-2 PGD steps")
        multi_step_size: float | None = Field(
            None, gt=0, description="stage-2 step in pixel units; None means eps / 4"
        )
        clean_fraction: float = Field(
            0.0,
            ge=0.0,
            lt=1.0,
            description="r: in stages 1 and 2 the first floor(r * batch) examples stay clean "
            "(a reading of 'mixed benign examples')",
        )

    def __init__(self, params: Params) -> None:
        self.params = params

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return the batch for the current stage (detached, in [0, 1], inside the ball)."""
        # Read params at call time: the moat-stages schedule swaps them between steps, and
        # knob values may arrive as floats (the engine's model_copy does not re-validate).
        params = self.params
        threat = state.threat
        x = x.detach()
        stage = min(2, max(0, round(params.stage)))
        if stage == 0 or threat.eps == 0:
            # Python numbers only: no host sync. The ball of radius 0 is the point x.
            return x
        n_clean = math.floor(float(params.clean_fraction) * x.shape[0])
        if n_clean >= x.shape[0]:
            return x
        x_att, y_att = x[n_clean:], y[n_clean:]
        scale = artplug.attack_logit_scale(model)

        def objective(outputs: Tensor) -> Tensor:
            # Sum, not mean: each example's gradient is independent of the batch size.
            return F.cross_entropy(scale * outputs, y_att, reduction="sum")

        if stage == 1:
            steps = 1
            size = params.single_step_size
            step_size = 1.25 * threat.eps if size is None else float(size)
        else:
            steps = max(1, round(params.multi_steps))
            size = params.multi_step_size
            step_size = threat.eps / 4 if size is None else float(size)
        start = artplug.random_start(x_att, threat)
        adv = artplug.projected_ascent(
            model, x_att, start, threat, objective, steps=steps, step_size=step_size
        )
        if n_clean == 0:
            return adv
        return torch.cat([x[:n_clean], adv]).detach()


class MOATStages:
    """MOAT's stage scheduler (a reading): cycle clean → single-step → multi-step by epochs.

    The run is cut into cycles of ``clean_epochs + single_step_epochs + multi_step_epochs``
    epochs (fractional allowed); inside a cycle the stages follow ``order``, each for its
    length, and the cycles repeat for the whole run. At a boundary the later stage starts
    (the exact fraction ``step / steps_per_epoch`` is compared with ``<``); a stage of length 0
    is skipped. The knob ``perturbation.stage`` takes 0 (clean), 1 (single step) or 2 (multi
    step) as floats; the engine rounds it into the ``moat`` perturbation's integer ``stage``.

    The lengths, their unit, the default order and the cycling rule are our reading of the
    abstract's "periodically ... stage by stage" (techniques.md §2.6), not the paper's values.
    """

    name = "moat-stages"

    class Params(BaseModel):
        """Parameters of the ``moat-stages`` schedule."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        clean_epochs: float = Field(
            1.0,
            ge=0.0,
            allow_inf_nan=False,
            description="epochs per cycle on benign examples (stage 0)",
        )
        single_step_epochs: float = Field(
            3.0,
            ge=0.0,
            allow_inf_nan=False,
            description="epochs per cycle on single-step examples (stage 1)",
        )
        multi_step_epochs: float = Field(
            1.0,
            ge=0.0,
            allow_inf_nan=False,
            description="epochs per cycle on multi-step examples (stage 2)",
        )
        order: list[StageName] = Field(
            default_factory=_default_order,
            description="order of the stages within a cycle: a permutation of "
            "'clean', 'single', 'multi'",
        )

        @field_validator("order")
        @classmethod
        def _permutation(cls, order: list[StageName]) -> list[StageName]:
            if sorted(order) != sorted(STAGE_CODES):
                raise ValueError(
                    f"order must name each of 'clean', 'single', 'multi' exactly once, got {order}"
                )
            return order

        @model_validator(mode="after")
        def _cycle_not_empty(self) -> Self:
            if self.clean_epochs + self.single_step_epochs + self.multi_step_epochs <= 0:
                raise ValueError("the stage lengths must add up to more than 0 epochs")
            return self

    def __init__(self, params: Params) -> None:
        self.params = params

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Require the ``moat`` perturbation, whose ``stage`` this schedule sets."""
        if recipe.perturbation != MOAT.name:
            yield (
                "moat-stages switches the moat perturbation's stage; "
                'set [perturbation] use = "moat"'
            )

    def knobs(self) -> frozenset[str]:
        """``{"perturbation.stage"}``."""
        return frozenset({STAGE_KNOB})

    def stage_at(self, epoch: float | Fraction) -> int:
        """The stage code (0, 1, 2) at fractional epoch ``epoch``.

        Computed in exact rational arithmetic (lengths as written in decimal), so a boundary
        such as 0.1 + 0.2 epochs falls exactly where the recipe puts it.
        """
        p = self.params
        lengths = {
            "clean": _exact(p.clean_epochs),
            "single": _exact(p.single_step_epochs),
            "multi": _exact(p.multi_step_epochs),
        }
        t = _exact(epoch) % sum(lengths.values())
        end = Fraction(0)
        for stage in p.order:
            end += lengths[stage]
            if t < end:
                return STAGE_CODES[stage]
        raise AssertionError("unreachable: t is below the cycle length")  # pragma: no cover

    def values(self, progress: artplug.Progress) -> dict[str, float]:
        """The stage at ``progress.epoch_float``, as a float knob value."""
        epoch = Fraction(progress.step, max(progress.steps_per_epoch, 1))  # exact epoch_float
        return {STAGE_KNOB: float(self.stage_at(epoch))}


def _exact(value: float | Fraction) -> Fraction:
    """``value`` as the exact fraction of its shortest decimal form (0.1 -> 1/10)."""
    return value if isinstance(value, Fraction) else Fraction(repr(float(value)))


@artplug.hookimpl
def register_perturbations(register: artplug.Register) -> None:
    """Register the ``moat`` perturbation."""
    register(MOAT)


@artplug.hookimpl
def register_schedules(register: artplug.Register) -> None:
    """Register the ``moat-stages`` schedule."""
    register(MOATStages)
