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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import Tensor, nn

Norm = Literal["linf", "l2"]
Kind = Literal["perturbation", "loss", "transform", "schedule"]
KINDS: tuple[Kind, ...] = ("perturbation", "loss", "transform", "schedule")
Need = Literal["clean", "adv"]


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
    ``"adv"`` in its ``needs``. ``x_adv`` is ``None`` when the recipe has no perturbation.
    """

    x: Tensor
    y: Tensor
    x_adv: Tensor | None
    logits_clean: Tensor | None
    logits_adv: Tensor | None


@dataclass(frozen=True)
class RecipeView:
    """The technique stack of a recipe, for a technique's optional ``check_recipe``.

    A technique class may define ``check_recipe(cls, params, recipe: RecipeView) ->
    Iterable[str]`` (a classmethod); every string it returns is a reason why this combination
    is invalid, reported by ``artplug validate`` at the technique's location. Use it for rules
    the four kinds cannot express on their own ("he-margin needs the hypersphere transform").
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

    Optional members, looked up with ``getattr``:

    - ``replays: int`` (default 1): how many optimizer steps reuse one minibatch (FreeAT).
    - ``after_backward(input_grad, state)``: called after the weight-update backward with the
      gradient of the loss with respect to ``x_adv`` (FreeAT reuses it). Under fp16 AMP it is the
      scaled gradient; use its sign or normalise it. When present, the engine makes ``x_adv``
      require grad before the training forward.
    - ``state_dict()`` / ``load_state_dict(state)``: persistent state saved in checkpoints.
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


PROTOCOLS: dict[Kind, type] = {
    "perturbation": Perturbation,
    "loss": LossTerm,
    "transform": ModelTransform,
    "schedule": Schedule,
}
REQUIRED_METHODS: dict[Kind, tuple[str, ...]] = {
    "perturbation": ("generate",),
    "loss": ("__call__",),
    "transform": ("apply",),
    "schedule": ("knobs", "values"),
}
