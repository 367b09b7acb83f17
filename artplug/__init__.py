"""artplug: adversarial training as composable plugins, built on ART.

The public API for plugin authors lives here; plugin modules import only from this package
root (``import artplug``), never from its submodules' internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

from artplug import evaluate as _evaluate_module
from artplug.api import ApiError, Evaluation, TrainResult, make_evaluate_callable, train
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
    TRADES_STEP_RATIO,
    ascent_step,
    attack_logit_scale,
    full_precision,
    is_no_weight_decay,
    kl_attack_start,
    kl_terms,
    logit_scale,
    no_weight_decay,
    project,
    project_ball,
    projected_ascent,
    random_start,
    set_logit_scale,
)
from artplug.phase import Phase, current_phase
from artplug.plugins import technique
from artplug.registry import Register

__version__ = "0.1.0.dev0"

hookimpl = pluggy.HookimplMarker("artplug")
"""Marker for hook implementations: ``@artplug.hookimpl def register_loss_terms(register): ...``"""

# ``artplug.evaluate`` is the evaluation module (``import artplug.evaluate`` keeps working) and,
# called, the notebook API's ``evaluate(model, x, y, attacks=..., threat=...)`` (artplug.api).
make_evaluate_callable(_evaluate_module)
if TYPE_CHECKING:  # what type checkers see: artplug.evaluate(...) is artplug.api.evaluate
    from artplug.api import evaluate as evaluate

__all__ = [
    "LATENT_SITES_TRANSFORM",
    "TRADES_STEP_RATIO",
    "TRANSFORM_STAGES",
    "AfterBackward",
    "ApiError",
    "ArtplugError",
    "CheckpointError",
    "ChecksRecipe",
    "DataError",
    "Evaluation",
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
    "TrainResult",
    "TransformStage",
    "UpdateHook",
    "__version__",
    "add_latent_site",
    "ascent_step",
    "attack_logit_scale",
    "capture_latents",
    "current_phase",
    "evaluate",
    "full_precision",
    "hookimpl",
    "is_no_weight_decay",
    "kl_attack_start",
    "kl_terms",
    "latent_sign_step",
    "latent_sites",
    "logit_scale",
    "no_weight_decay",
    "project",
    "project_ball",
    "projected_ascent",
    "random_start",
    "set_logit_scale",
    "technique",
    "train",
]
