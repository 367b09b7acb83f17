"""The four technique kinds (typing Protocols) and the frozen data they exchange.

A technique is a plain class registered through one of the ``register_*`` hooks. The engine
instantiates it once with its validated ``Params`` and calls its methods directly on every step;
pluggy is never on the hot path. mypy checks plugin classes against these Protocols, and
:meth:`artplug.registry.Registry.add` re-checks their shape when they are registered.

Knob names (what schedules may set, see :class:`Schedule`):

- ``lr_scale``: multiplies ``[optim] lr`` for every optimizer parameter group. Schedules set a
  scale, not an absolute rate, because they are built from their own ``Params`` only: the base
  rate then lives in one place (``[optim] lr``) and ``--set optim.lr=...`` works with any schedule.
- ``threat.eps_scale``: multiplies the recipe's eps for training attacks (``StepState.threat``);
  evaluation always uses the recipe's full eps.
- ``perturbation.<param>``: a field of the perturbation's ``Params``.
- ``loss.<id>.weight`` and ``loss.<id>.<param>``: a loss term's weight or a field of its ``Params``;
  ``<id>`` is the term's ``id`` in the recipe, by default its ``use`` name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import Tensor, nn

Norm = Literal["linf", "l2"]
Kind = Literal["perturbation", "loss", "transform", "schedule"]
KINDS: tuple[Kind, ...] = ("perturbation", "loss", "transform", "schedule")
RECIPE_TABLE: dict[Kind, str] = {
    "perturbation": "[perturbation]",
    "loss": "[[loss]]",
    "transform": "[[transform]]",
    "schedule": "[[schedule]]",
}
"""The recipe table each kind of technique is chosen in (``use = NAME``)."""
Need = Literal["clean", "adv"]
TransformStage = Literal["activation", "sites", "features", "head"]
TRANSFORM_STAGES: tuple[TransformStage, ...] = ("activation", "sites", "features", "head")
"""The stages of a model transform, in the order transforms must be listed (and are applied).

- ``"activation"``: replaces activation functions (smooth activations, SAT);
- ``"sites"``: hooks modules to perturb or read latent feature maps (SLAT's latent sites);
- ``"features"``: acts on the penultimate features (AALP's guided dropout);
- ``"head"``: replaces the final layer (the hypersphere cosine head).

Each stage may hook or replace only what the earlier stages left in place, so a later stage
never undoes an earlier one (a hooked module is not replaced; the head is replaced last).
"""


class Params(BaseModel):
    """Base class of every technique's nested ``Params``: strict, frozen, no unknown keys.

    Subclass it (``class Params(artplug.Params): steps: int = 10``) instead of setting
    ``model_config`` yourself: its fields are the recipe keys of the technique's table.

    - ``extra="forbid"``: a misspelled recipe key is an error, not silently ignored;
    - ``frozen=True``: a technique never mutates its parameters; a schedule's knob update
      swaps in a new, validated instance (see :func:`updated_params`), so read
      ``self.params`` at call time rather than caching its fields in ``__init__``;
    - ``strict=True``: the recipe's TOML types are checked, never coerced (``steps = "3"``
      and ``steps = 2.5`` are errors); an integer field still accepts ``3`` for a float one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def updated_params(params: BaseModel, updates: Mapping[str, Any]) -> BaseModel:
    """A copy of ``params`` with ``updates`` applied, validated by its own model.

    ``model_copy(update=...)`` would skip validation (a knob could push ``steps`` to 0 or set
    a float into an int field); this re-runs every field and model validator instead. Nested
    models are passed as instances so that strict validation accepts them unchanged. Raises
    pydantic's ``ValidationError`` when an update is invalid.
    """
    values = {name: getattr(params, name) for name in type(params).model_fields}
    values.update(updates)
    return type(params).model_validate(values)


@dataclass(frozen=True)
class Threat:
    """The threat model of a run: an ``norm`` ball of radius ``eps`` in pixel space [0, 1].

    One instance comes from the recipe's ``[threat]`` table and is shared by training attacks,
    validation and the final evaluation. During training ``StepState.threat`` may carry a
    smaller eps when a schedule sets the ``threat.eps_scale`` knob (eps warm-up).
    """

    norm: Norm
    eps: float

    def scaled(self, fraction: float) -> Threat:
        """The same ball with ``eps`` multiplied by ``fraction``."""
        return Threat(self.norm, self.eps * fraction)


@dataclass(frozen=True)
class Progress:
    """Where training stands; schedules are pure functions of it.

    ``step`` counts minibatches from 0 over the whole run (FreeAT replays of one minibatch share
    a step); ``epoch`` is the 0-based epoch index.
    """

    epoch: int
    step: int
    steps_per_epoch: int
    total_steps: int

    @property
    def fraction(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return self.step / max(self.total_steps, 1)

    @property
    def epoch_float(self) -> float:
        """Epochs done as a real number (``1.5`` = half-way through the second epoch)."""
        return self.step / max(self.steps_per_epoch, 1)


@dataclass(frozen=True)
class StepState:
    """What a perturbation or loss term may read during one optimizer step.

    ``knobs`` holds the values every schedule produced for this step; ``threat`` is the training
    threat for this step (already scaled by ``threat.eps_scale``); ``replay`` is the index of
    the current replay of the minibatch (always 0 unless the perturbation has ``replays > 1``).
    """

    progress: Progress
    knobs: Mapping[str, float]
    model: nn.Module
    threat: Threat
    replay: int = 0


@dataclass(frozen=True)
class Outputs:
    """The forward passes of one step, handed to every loss term.

    ``logits_clean`` and ``logits_adv`` are ``None`` unless some loss term lists ``"clean"`` or
    ``"adv"`` in its ``needs``. ``x_adv`` is always set: every recipe has a perturbation (one
    that leaves the batch clean returns ``x`` itself).
    """

    x: Tensor
    y: Tensor
    x_adv: Tensor
    logits_clean: Tensor | None
    logits_adv: Tensor | None


@dataclass(frozen=True)
class RecipeView:
    """The technique stack of a recipe, for a technique's optional ``check_recipe``.

    A technique class may define ``check_recipe(cls, params, recipe: RecipeView) ->
    Iterable[str]`` (a classmethod, see :class:`ChecksRecipe`); every string it returns is a
    reason why this combination is invalid, reported by ``artplug validate`` at the technique's
    location. Use it for rules the four kinds cannot express on their own ("he-margin needs
    the hypersphere transform"). The order of transforms is not such a rule: it follows from
    their :data:`TRANSFORM_STAGES`, which the recipe validator checks.
    """

    transforms: tuple[str, ...]
    perturbation: str
    losses: tuple[str, ...]
    schedules: tuple[str, ...]
    threat: Threat
    model_mode: str = "eval"


@runtime_checkable
class ModelTransform(Protocol):
    """Changes the network once, before training (e.g. smooth activations, a normalized head).

    ``apply`` is called once, in ``[[transform]]`` order, after the architecture is built and
    before ``.to(device)`` and before the optimizer exists, so new parameters are trained. It may
    replace submodules or wrap the model; the output shape ``(N, num_classes)`` must not change.

    A transform should declare its place in that order as a class attribute ``stage`` (one of
    :data:`TRANSFORM_STAGES`, see :class:`Staged`); the recipe validator rejects a recipe that
    lists staged transforms out of stage order. A transform without ``stage`` may go anywhere.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: Any) -> None: ...

    def apply(self, model: nn.Module) -> nn.Module:
        """Return the transformed model (may be the same object, changed in place)."""
        ...


@runtime_checkable
class Perturbation(Protocol):
    """Produces the training input ``x_adv`` for each optimizer step (PGD, FGSM, TRADES-KL, ...).

    ``generate`` is called every step (``replays`` times per minibatch) with the model in the
    recipe's attack mode (``[perturbation] model_mode``, ``"eval"`` by default) and gradients
    enabled; the engine restores train mode afterwards. The result must be detached, of the
    same shape, dtype and device as ``x``, inside ``[0, 1]`` and inside ``state.threat``'s ball
    around ``x``, and ``generate`` must leave no ``.grad`` on any parameter (take gradients with
    ``torch.autograd.grad`` with respect to the input only).

    Optional capabilities, each its own Protocol (the engine checks them with ``isinstance``):

    - :class:`Replays`: ``replays: int`` (default 1), how many optimizer steps reuse one
      minibatch (FreeAT).
    - :class:`AfterBackward`: ``after_backward(input_grad, state)``, called after the
      weight-update backward with the gradient of the loss with respect to ``x_adv`` (FreeAT
      reuses it). Under fp16 AMP it is the scaled gradient; use its sign or normalise it. When
      present, the engine makes ``x_adv`` require grad before the training forward.
    - :class:`Stateful`: ``state_dict()`` / ``load_state_dict(state)``, persistent state saved
      in checkpoints.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: Any) -> None: ...

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: StepState) -> Tensor:
        """Return the perturbed batch (detached, in [0, 1], inside the threat ball)."""
        ...


@runtime_checkable
class LossTerm(Protocol):
    """One term of the training objective; the total loss is ``sum(weight * term)``.

    ``needs`` (a subset of ``{"clean", "adv"}``, class or instance attribute) tells the engine
    which forward passes to run before calling the term. ``__call__`` returns a 0-dim, finite,
    differentiable tensor; it never calls ``backward()`` or ``step()``, and may run extra
    forward passes through ``state.model``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    needs: frozenset[str]

    def __init__(self, params: Any) -> None: ...

    def __call__(self, out: Outputs, state: StepState) -> Tensor:
        """Return this term's (unweighted) value for the step."""
        ...


@runtime_checkable
class Schedule(Protocol):
    """Sets knobs (learning rate, eps, loss weights, ...) from training progress.

    ``values`` is called at the start of every optimizer step and must be a pure function of
    ``progress`` (so resuming a run needs no schedule state). It returns exactly the knobs named
    by ``knobs()``; two schedules of one recipe must not share a knob.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init__(self, params: Any) -> None: ...

    def knobs(self) -> frozenset[str]:
        """The knob names this schedule sets."""
        ...

    def values(self, progress: Progress) -> dict[str, float]:
        """The knob values for this step."""
        ...


@runtime_checkable
class Replays(Protocol):
    """Optional perturbation capability: reuse each minibatch for ``replays`` optimizer steps.

    FreeAT replays a minibatch m times, carrying its perturbation from one replay to the next;
    ``StepState.replay`` tells ``generate`` which replay runs. Without it a perturbation runs
    once per minibatch.
    """

    replays: int


@runtime_checkable
class AfterBackward(Protocol):
    """Optional perturbation capability: receive the input gradient of the weight update.

    With it, the engine makes ``x_adv`` require grad before the update forwards and calls
    ``after_backward(x_adv.grad, state)`` after ``backward()`` (before the optimizer step), so
    the perturbation can reuse the update's gradient for free (FreeAT). Under fp16 AMP the
    gradient is scaled by the loss scaler: use its sign or normalise it.
    """

    def after_backward(self, input_grad: Tensor | None, state: StepState) -> None:
        """Take the gradient of the training loss with respect to ``x_adv``."""
        ...


@runtime_checkable
class Stateful(Protocol):
    """Optional perturbation capability: state saved in checkpoints and restored on resume.

    ``state_dict`` returns tensors and plain Python values (``torch.save``-able);
    ``load_state_dict`` receives what it returned, from the checkpoint of a resumed run.
    """

    def state_dict(self) -> dict[str, Any]:
        """The state to save."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the saved state."""
        ...


@runtime_checkable
class ChecksRecipe(Protocol):
    """Optional capability of any technique class: reject combinations it cannot work in.

    Define it as a classmethod; it sees the technique's validated ``Params`` and the recipe's
    technique stack (:class:`RecipeView`) and yields one reason per problem (nothing when the
    recipe is fine). ``artplug validate`` reports each reason at the technique's location.
    """

    def check_recipe(self, params: Any, recipe: RecipeView) -> Iterable[str]:
        """Yield a reason for every rule this recipe breaks."""
        ...


@runtime_checkable
class Staged(Protocol):
    """Optional model-transform capability: its place in the transform order.

    ``stage`` is one of :data:`TRANSFORM_STAGES`; the recipe validator requires staged
    transforms to be listed in stage order (activation, sites, features, head).
    """

    stage: ClassVar[TransformStage]


def transform_stage(cls: type[Any]) -> TransformStage | None:
    """The declared stage of a model transform class, or ``None`` when it declares none."""
    return cls.stage if isinstance(cls, Staged) else None


REQUIRED_METHODS: dict[Kind, tuple[str, ...]] = {
    "perturbation": ("generate",),
    "loss": ("__call__",),
    "transform": ("apply",),
    "schedule": ("knobs", "values"),
}


@runtime_checkable
class UpdateHook(Protocol):
    """Optional capability of a model transform: act on the weights around each weight update.

    For techniques that change the *weights* the update's gradient is taken at (adversarial
    weight perturbation, sharpness-aware updates), which none of the four kinds can express: a
    perturbation changes the input, a loss term must not touch the weights, and a transform's
    ``apply`` runs once. A :class:`ModelTransform` that also defines both methods below is an
    update hook; the engine checks this once with ``isinstance`` and then, on every optimizer
    step (each replay), in ``[[transform]]`` order:

    1. ``before_update(model, x, x_adv, y, state)`` after the perturbation's ``generate`` and
       before the update's forward passes (phase ``"update"``, model in train mode, inside the
       run's autocast). ``x_adv`` is what ``generate`` returned (``x`` itself for ``none``).
       It may change the weights in place (under ``torch.no_grad()``) and may run its own
       forward passes; it must leave no ``.grad`` on parameters (use ``torch.autograd.grad``)
       and should leave buffers (BatchNorm running statistics) as they were.
    2. ``after_backward_update(model)`` after the update's backward and before
       ``optimizer.step()``: it must restore every weight it changed, so the gradient taken at
       the changed weights is applied to the original ones. Hooks are undone in reverse order.

    A transform without these methods costs the step nothing.
    """

    def before_update(
        self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, state: StepState
    ) -> None:
        """Change the weights (in place) that the coming update's gradient is taken at."""
        ...

    def after_backward_update(self, model: nn.Module) -> None:
        """Undo what ``before_update`` did to the weights, before the optimizer steps."""
        ...
