"""Which pass of a training step is running, for modules that behave differently per pass.

The engine marks every forward pass of a training step with a phase (a context variable, so it
is cheap to read in ``forward`` and safe under threads):

- ``"attack"``: inside ``Perturbation.generate`` (the passes that craft ``x_adv``);
- ``"update-clean"``: the engine's forward of the clean batch for the weight update;
- ``"update-adv"``: the engine's forward of ``x_adv`` for the weight update;
- ``"update"``: inside the loss terms (any extra forwards they run);
- ``"eval"``: everything else (validation, the sanity gate, evaluation, user code).

Model transforms read it with :func:`current_phase`: a backward-only smooth activation decides
whether to smooth the attacker's or the optimizer's gradient (Xie et al. 2020), and a latent
perturbation site adds its perturbation only in the ``"update-adv"`` forward (Park & Lee 2021).
A module's backward runs after its phase has ended, so a module that needs the phase in its
backward records it during its forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal, get_args

Phase = Literal["attack", "update-clean", "update-adv", "update", "eval"]
PHASES: tuple[Phase, ...] = get_args(Phase)

_current: ContextVar[Phase] = ContextVar("artplug_phase", default="eval")


def current_phase() -> Phase:
    """The phase of the training step now running (``"eval"`` outside the engine's step)."""
    return _current.get()


def is_update(phase: Phase) -> bool:
    """Whether ``phase`` belongs to the weight update (any ``update*`` phase)."""
    return phase.startswith("update")


@contextlib.contextmanager
def running(phase: Phase) -> Iterator[None]:
    """Mark the code inside the ``with`` block as ``phase``; the previous phase comes back after."""
    token = _current.set(phase)
    try:
        yield
    finally:
        _current.reset(token)
