"""artplug: adversarial training as composable plugins, built on ART.

The public API for plugin authors lives here; plugin modules import only from this package
root (``import artplug``), never from its submodules' internals.
"""

from __future__ import annotations

import pluggy

from artplug.errors import ArtplugError, CheckpointError, DataError, PluginError, RecipeError
from artplug.kinds import (
    LossTerm,
    ModelTransform,
    Outputs,
    Perturbation,
    Progress,
    RecipeView,
    Schedule,
    StepState,
    Threat,
)
from artplug.ops import (
    ascent_step,
    attack_logit_scale,
    full_precision,
    logit_scale,
    project,
    project_ball,
    projected_ascent,
    random_start,
)
from artplug.phase import Phase, current_phase
from artplug.registry import Register

__version__ = "0.1.0.dev0"

hookimpl = pluggy.HookimplMarker("artplug")
"""Marker for hook implementations: ``@artplug.hookimpl def register_loss_terms(register): ...``"""

__all__ = [
    "ArtplugError",
    "CheckpointError",
    "DataError",
    "LossTerm",
    "ModelTransform",
    "Outputs",
    "Perturbation",
    "Phase",
    "PluginError",
    "Progress",
    "RecipeError",
    "RecipeView",
    "Register",
    "Schedule",
    "StepState",
    "Threat",
    "__version__",
    "ascent_step",
    "attack_logit_scale",
    "current_phase",
    "full_precision",
    "hookimpl",
    "logit_scale",
    "project",
    "project_ball",
    "projected_ascent",
    "random_start",
]
