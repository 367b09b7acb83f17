"""artplug: adversarial training as composable plugins, built on ART.

The public API for plugin authors lives here; plugin modules import only from this package
root (``import artplug``), never from its submodules' internals.
"""

from __future__ import annotations

import pluggy

from artplug.errors import ArtplugError, CheckpointError, DataError, PluginError, RecipeError
from artplug.kinds import (
    TRANSFORM_STAGES,
    AfterBackward,
    ChecksRecipe,
    LossTerm,
    ModelTransform,
    Outputs,
    Params,
    Perturbation,
    Progress,
    RecipeView,
    Replays,
    Schedule,
    Staged,
    Stateful,
    StepState,
    Threat,
    TransformStage,
    UpdateHook,
)
from artplug.latent import (
    LATENT_SITES_TRANSFORM,
    LatentSite,
    LatentStepParams,
    add_latent_site,
    capture_latents,
    latent_sign_step,
    latent_sites,
)
from artplug.ops import (
    ascent_step,
    attack_logit_scale,
    full_precision,
    is_no_weight_decay,
    logit_scale,
    no_weight_decay,
    project,
    project_ball,
    projected_ascent,
    random_start,
    set_logit_scale,
)
from artplug.phase import Phase, current_phase
from artplug.registry import Register

__version__ = "0.1.0.dev0"

hookimpl = pluggy.HookimplMarker("artplug")
"""Marker for hook implementations: ``@artplug.hookimpl def register_loss_terms(register): ...``"""

__all__ = [
    "LATENT_SITES_TRANSFORM",
    "TRANSFORM_STAGES",
    "AfterBackward",
    "ArtplugError",
    "CheckpointError",
    "ChecksRecipe",
    "DataError",
    "LatentSite",
    "LatentStepParams",
    "LossTerm",
    "ModelTransform",
    "Outputs",
    "Params",
    "Perturbation",
    "Phase",
    "PluginError",
    "Progress",
    "RecipeError",
    "RecipeView",
    "Register",
    "Replays",
    "Schedule",
    "Staged",
    "Stateful",
    "StepState",
    "Threat",
    "TransformStage",
    "UpdateHook",
    "__version__",
    "add_latent_site",
    "ascent_step",
    "attack_logit_scale",
    "capture_latents",
    "current_phase",
    "full_precision",
    "hookimpl",
    "is_no_weight_decay",
    "latent_sign_step",
    "latent_sites",
    "logit_scale",
    "no_weight_decay",
    "project",
    "project_ball",
    "projected_ascent",
    "random_start",
    "set_logit_scale",
]
