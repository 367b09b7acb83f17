"""MOAT: multi-stage optimization based adversarial training — a parametrised READING.

Reference: X. Wang, C. Song, L. Wang, K. He, "Multi-stage Optimization based Adversarial
Training", arXiv:2106.15357 (2021).

What the abstract says: single-step adversarial training tends to catastrophic overfitting;
MOAT adds multi-step adversarial examples to single-step training and, to keep the cost low,
periodically trains the model on benign examples, single-step adversarial examples and
multi-step adversarial examples, stage by stage ("mixed benign examples" are mentioned too).

What is a READING (the paper body and any official code could not be read; see
docs/techniques/moat.md and docs/techniques/README.md, what could not be read): the stage lengths
and their unit (epochs here), the order, the
rule that the stages cycle for the whole run, the single-step attack (FGSM from a uniform
random start with step 1.25·ε, as FastAT), the multi-step attack (PGD-10 with step ε/4, i.e.
2/255 at 8/255, from a uniform random start), and the meaning of mixing (a fixed fraction of
each adversarial batch left clean). Every one of these is a parameter; do not claim the
paper's numbers with these defaults until the paper has been read.

Each adversarial stage can also delegate to another built-in perturbation
(docs/techniques/README.md, combinations,
row MOAT): ``single_attack = "slat"`` runs SLAT (plugins/slat.py; a [READING] of the matrix's
"SLAT as single-step stage") and ``multi_attack = "spat"`` runs the SPAT-like attack
(plugins/spat.py), each with its own parameters in the ``slat`` / ``spat`` sub-table.

This module registers the perturbation ``moat`` (one generator with three stages, chosen by its
``stage`` parameter) and the schedule ``moat-stages``, which sets the knob
``perturbation.stage`` from the fractional epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F

# SLAT's step and latent sites come from artplug itself (artplug/latent.py), and the SPAT-like
# stage is the registered ``spat`` perturbation, looked up by name (artplug.technique): moat
# imports no other plugin, so with slat or spat disabled moat still loads, and a recipe that
# delegates to the missing one fails validation with one line naming it.
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

import artplug

StageName = Literal["clean", "single", "multi"]
SingleAttack = Literal["fgsm-rs", "slat"]
MultiAttack = Literal["pgd", "spat"]
STAGE_CODES: dict[str, int] = {"clean": 0, "single": 1, "multi": 2}
STAGE_KNOB = "perturbation.stage"


def _default_order() -> list[StageName]:
    return ["clean", "single", "multi"]


class MOAT:
    """MOAT's multi-stage generator (Wang et al. 2021, a reading): clean, single or multi step.

    ``stage`` (read at every call, usually set by the ``moat-stages`` schedule):

    - 0: the clean batch, unchanged;
    - 1: single step, by ``single_attack``:

      - ``"fgsm-rs"`` (default): FGSM from a uniform random point of the ball with step
        ``single_step_size`` (None: 1.25·eps, FastAT's 10/255 at ε = 8/255);
      - ``"slat"``: the ``slat`` perturbation with the ``slat`` sub-table's parameters (input
        sign step from the clean point plus latent sign steps stored into the sites of the
        ``latent-sites`` transform, which the recipe must list);

    - 2: multi step, by ``multi_attack``:

      - ``"pgd"`` (default): ``multi_steps`` PGD steps of ``multi_step_size`` (None: eps/4,
        2/255 at ε = 8/255) from a uniform random start;
      - ``"spat"``: the SPAT-like attack with the ``spat`` sub-table's parameters (its defaults,
        10 steps of 2.5·eps/10 = eps/4 from a uniform start, match the PGD stage's).

    The built-in attacks ascend the summed cross-entropy of ``attack_logit_scale · outputs``
    with the steepest-ascent step of the threat's norm and project onto the ball and [0, 1]. eps
    is the step's training threat (``state.threat``); explicit step sizes are not scaled by an
    eps warm-up, the defaults are. A delegated stage is exactly that perturbation's
    ``generate`` on the same model, batch rows, state and random numbers.

    ``clean_fraction`` = r (our reading of "mixed benign examples"): in stages 1 and 2 the first
    ⌊r·B⌋ examples of each batch stay clean and only the rest are attacked (attacking fewer
    examples is also cheaper). The attack sees only the attacked rows, which matters for
    BatchNorm only when ``[perturbation] model_mode = "train"``. Under SLAT the clean rows also
    get a zero latent step, so they pass the update forward entirely unperturbed.

    Latent sites: SLAT's steps stay in the sites until they are cleared, and the sites add them
    to every ``"update-adv"`` forward. ``generate`` therefore clears every site of the model at
    each call, before anything else, so in stages 0 and 2 (and in stage 1 with FGSM-RS) the
    update forward is never perturbed by the latent step of an earlier SLAT stage.

    Readings: the stage meanings and defaults above (see the module docstring), the use of SLAT
    as the single-step stage and of SPAT as the multi-step stage (docs/techniques/README.md,
    combinations, row MOAT),
    and the clean rows' zero latent step.
    """

    name = "moat"
    paper = (
        'X. Wang, C. Song, L. Wang, K. He, "Multi-stage Optimization based Adversarial '
        'Training", arXiv:2106.15357 (2021); a parametrised reading of the abstract'
    )

    class Params(artplug.Params):
        """Parameters of the ``moat`` perturbation."""

        stage: int = Field(
            2,
            ge=0,
            le=2,
            description="0 = clean, 1 = single step (single_attack), 2 = multi step "
            "(multi_attack); the moat-stages schedule sets it",
        )
        single_attack: SingleAttack = Field(
            "fgsm-rs",
            description="stage-1 attack: 'fgsm-rs' (FGSM from a uniform random start) or "
            "'slat' (the slat perturbation; needs the latent-sites transform)",
        )
        single_step_size: float | None = Field(
            None,
            gt=0,
            description="fgsm-rs step in pixel units; None means 1.25 * eps (with 'slat' the "
            "step is slat.alpha * eps)",
        )
        slat: artplug.LatentStepParams | None = Field(
            None,
            description="parameters of the slat perturbation for single_attack = 'slat' "
            "(a sub-table, e.g. slat = { alpha = 0.9 }); None means slat's defaults",
        )
        multi_attack: MultiAttack = Field(
            "pgd",
            description="stage-2 attack: 'pgd' (from a uniform random start) or 'spat' (the "
            "SPAT-like attack; needs [perturbation] model_mode = 'eval')",
        )
        multi_steps: int = Field(
            10, ge=1, description="pgd steps of stage 2 (with 'spat': spat.steps)"
        )
        multi_step_size: float | None = Field(
            None,
            gt=0,
            description="pgd step in pixel units; None means eps / 4 (with 'spat': spat.step_size)",
        )
        spat: dict[str, Any] | None = Field(
            None,
            description="parameters of the spat perturbation for multi_attack = 'spat' "
            "(a sub-table, e.g. spat = { steps = 5 }, checked against spat's own parameters "
            "when the recipe is validated; 'artplug list spat' lists them); None means "
            "spat's defaults",
        )
        clean_fraction: float = Field(
            0.0,
            ge=0.0,
            lt=1.0,
            description="r: in stages 1 and 2 the first floor(r * batch) examples stay clean "
            "(a reading of 'mixed benign examples')",
        )

        @model_validator(mode="after")
        def _sub_parameters_match_the_attacks(self) -> Self:
            # A sub-table or step of an attack that does not run would be ignored without a
            # word; say so instead. (multi_steps has a default and is always present in a
            # resolved recipe, so it is documented as unused with spat rather than rejected.)
            problems = []
            if self.slat is not None and self.single_attack != "slat":
                problems.append(
                    f"the slat sub-table is used only with single_attack = 'slat', not "
                    f"{self.single_attack!r}"
                )
            if self.single_step_size is not None and self.single_attack == "slat":
                problems.append(
                    "single_step_size is the fgsm-rs step; with single_attack = 'slat' the "
                    "step is slat.alpha * eps (set slat = { alpha = ... })"
                )
            if self.spat is not None and self.multi_attack != "spat":
                problems.append(
                    f"the spat sub-table is used only with multi_attack = 'spat', not "
                    f"{self.multi_attack!r}"
                )
            if self.multi_step_size is not None and self.multi_attack == "spat":
                problems.append(
                    "multi_step_size is the pgd step; with multi_attack = 'spat' set "
                    "spat = { step_size = ... }"
                )
            if self.spat is not None and self.multi_attack == "spat":
                # Checked here too (not only in check_recipe) so that a bad sub-table is an
                # error of these parameters wherever they are built, e.g. by a schedule.
                try:
                    spat_class = artplug.technique("perturbation", "spat")
                except KeyError:
                    pass  # check_recipe names the missing plugin with its fix
                else:
                    try:
                        _spat_params(spat_class, self.spat)
                    except ValueError as exc:
                        problems.append(f"the spat sub-table: {_first_error(exc)}")
            if problems:
                raise ValueError("; ".join(problems))
            return self

    def __init__(self, params: Params) -> None:
        self.params = params
        # The delegates are built once; generate() hands them the current sub-parameters at
        # every call, since schedules may replace self.params between steps.
        self._slat_defaults = artplug.LatentStepParams.model_validate({})
        self._spat: Any = None
        self._spat_table: dict[str, Any] | None = None
        if params.multi_attack == "spat":
            # Raises KeyError (spat not installed or disabled) or ValidationError (a bad
            # sub-table): both become one recipe error naming this perturbation.
            spat_class = artplug.technique("perturbation", "spat")
            self._spat = spat_class(_spat_params(spat_class, params.spat))
            self._spat_table = params.spat

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return the batch for the current stage (detached, in [0, 1], inside the ball)."""
        # Read params at call time: the moat-stages schedule swaps them between steps (the
        # engine validates every update, so ``stage`` is an int in [0, 2]).
        params = self.params
        threat = state.threat
        x = x.detach()
        sites = artplug.latent_sites(model)
        # First of all, at every stage: a SLAT step left in the sites by an earlier stage-1
        # call would otherwise perturb this step's update forward (SLAT clears them only at
        # its own next call, which a clean or multi-step stage never makes).
        for site in sites:
            site.clear()
        stage = params.stage
        if stage == 0:
            return x
        n_clean = math.floor(params.clean_fraction * x.shape[0])
        if n_clean >= x.shape[0]:
            return x
        x_att, y_att = x[n_clean:], y[n_clean:]
        if stage == 1 and params.single_attack == "slat":
            # Delegated before the eps = 0 shortcut: SLAT still takes latent steps at eps 0
            # (e.g. at the start of an eps warm-up), as it does as a perturbation of its own.
            slat = params.slat or self._slat_defaults
            adv = artplug.latent_sign_step(model, x_att, y_att, state, slat)
            _pad_latent_steps(sites, n_clean)
        elif stage == 2 and params.multi_attack == "spat":
            adv = self._spat_delegate(params).generate(model, x_att, y_att, state)
        elif threat.eps == 0:
            # Python numbers only: no host sync. The ball of radius 0 is the point x.
            return x
        else:
            adv = self._builtin_attack(model, x_att, y_att, threat, stage)
        if n_clean == 0:
            return adv
        return torch.cat([x[:n_clean], adv]).detach()

    def _spat_delegate(self, params: Params) -> Any:
        """The spat perturbation with ``params.spat`` as its parameters.

        Built on first use when a schedule switched ``multi_attack`` to spat after __init__,
        and re-validated whenever a schedule replaced the sub-table.
        """
        if self._spat is None:
            spat_class = artplug.technique("perturbation", "spat")
            self._spat = spat_class(_spat_params(spat_class, params.spat))
            self._spat_table = params.spat
        elif params.spat is not self._spat_table:
            self._spat.params = _spat_params(type(self._spat), params.spat)
            self._spat_table = params.spat
        return self._spat

    def _builtin_attack(
        self, model: nn.Module, x: Tensor, y: Tensor, threat: artplug.Threat, stage: int
    ) -> Tensor:
        """FGSM-RS (stage 1) or PGD (stage 2) on the attacked rows ``x``."""
        params = self.params
        scale = artplug.attack_logit_scale(model)

        def objective(outputs: Tensor) -> Tensor:
            # Sum, not mean: each example's gradient is independent of the batch size.
            return F.cross_entropy(scale * outputs, y, reduction="sum")

        if stage == 1:
            steps = 1
            size = params.single_step_size
            step_size = 1.25 * threat.eps if size is None else size
        else:
            steps = params.multi_steps
            size = params.multi_step_size
            step_size = threat.eps / 4 if size is None else size
        start = artplug.random_start(x, threat)
        return artplug.projected_ascent(
            model, x, start, threat, objective, steps=steps, step_size=step_size
        )

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Rules of the delegated stages: SLAT's sites and losses, SPAT's own rules."""
        has_sites = artplug.LATENT_SITES_TRANSFORM in recipe.transforms
        if params.single_attack == "slat":
            if not has_sites:
                yield (
                    'single_attack = "slat" perturbs latent feature maps; add [[transform]] '
                    'use = "latent-sites" (before any guided-dropout or hypersphere transform)'
                )
            if "trades" in recipe.losses:
                yield (
                    'single_attack = "slat" cannot be combined with the trades loss, which also '
                    "trains the single-step stage: TRADES-SLAT is not defined (the KL gradient "
                    "at the clean point is zero, and SLAT has no random start); use "
                    'single_attack = "fgsm-rs", or the cross-entropy or he-margin loss'
                )
        elif has_sites:
            yield (
                "the latent-sites transform is filled only by the slat attack, and "
                f"single_attack = {params.single_attack!r} never runs it (the sites would stay "
                'empty); set single_attack = "slat" or drop the transform'
            )
        if params.multi_attack == "spat":
            try:
                spat_class = artplug.technique("perturbation", "spat")
            except KeyError as exc:
                yield f'multi_attack = "spat" needs the spat perturbation: {exc.args[0]}'
                return
            try:
                spat_params = _spat_params(spat_class, params.spat)
            except ValueError as exc:
                yield f"the spat sub-table: {_first_error(exc)}"
                return
            for reason in spat_class.check_recipe(spat_params, recipe):
                yield f'multi_attack = "spat" (its parameters: the spat sub-table): {reason}'


def _spat_params(spat_class: type[Any], table: dict[str, Any] | None) -> Any:
    """The ``spat`` sub-table validated by the registered spat perturbation's ``Params``."""
    return spat_class.Params.model_validate(table or {})


def _first_error(exc: ValueError) -> str:
    """A pydantic validation error as one line: location and message of each problem."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in errors()
        )
    return str(exc)


def _pad_latent_steps(sites: list[artplug.LatentSite], n_clean: int) -> None:
    """Give the ``n_clean`` leading clean rows a zero latent step in every site.

    SLAT ran on the attacked rows only, so its steps have ``B − n_clean`` rows while the update
    forward sees all ``B``; a zero step leaves a clean row's map unchanged (the domain
    constraint's clip of an unshifted map is the identity).
    """
    if n_clean == 0:
        return
    for site in sites:
        delta = site.delta
        if delta is not None:
            site.delta = torch.cat([delta.new_zeros((n_clean, *delta.shape[1:])), delta])


class MOATStages:
    """MOAT's stage scheduler (a reading): cycle clean → single-step → multi-step by epochs.

    The run is cut into cycles of ``clean_epochs + single_step_epochs + multi_step_epochs``
    epochs (fractional allowed); inside a cycle the stages follow ``order``, each for its
    length, and the cycles repeat for the whole run. At a boundary the later stage starts
    (the exact fraction ``step / steps_per_epoch`` is compared with ``<``); a stage of length 0
    is skipped. The knob ``perturbation.stage`` takes 0 (clean), 1 (single step) or 2 (multi
    step) as floats; the engine rounds it into the ``moat`` perturbation's integer ``stage``.

    The lengths, their unit, the default order and the cycling rule are our reading of the
    abstract's "periodically ... stage by stage" (docs/techniques/moat.md), not the paper's values.
    """

    name = "moat-stages"
    paper = (
        'X. Wang, C. Song, L. Wang, K. He, "Multi-stage Optimization based Adversarial '
        'Training", arXiv:2106.15357 (2021); a parametrised reading of the abstract'
    )

    class Params(artplug.Params):
        """Parameters of the ``moat-stages`` schedule."""

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
