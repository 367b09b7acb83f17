"""The training engine: build the components of a recipe, then run one readable loop.

One optimizer step (DESIGN §4)::

    knobs = merge(s.values(progress) for s in schedules); apply knobs
    repeat perturbation.replays times:
        model in the recipe's attack mode; x_adv = perturbation.generate(model, x, y, state)
        model.train(); forwards the loss terms need; loss = sum(weight * term(out, state))
        zero_grad; backward (scaled under fp16 AMP)
        perturbation.after_backward(x_adv.grad, state)      # only if the perturbation has it
        optimizer.step()
    every log_every steps: one host sync, metrics to the tracker and the display
    every eval.every_epochs epochs: ART validation; a checkpoint every epoch

Data stays on the device, and nothing inside the step calls ``.item()`` or ``.cpu()``: the
running sums are device tensors read only at the logging cadence.

:func:`fit` is the loop and nothing more; what happens after it (the final evaluation,
``eval.json``, the gate, the curve, plots, model logging) is :mod:`artplug.workflows`'s, cost
accounting is :mod:`artplug.costs`'s and checkpoint selection :mod:`artplug.selection`'s.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import artplug
from artplug import checkpoint as ckpt
from artplug import distributed, phase
from artplug.costs import (
    CostLedger,
    PassCounter,
    counter_state,
    load_counter,
    peak_memory_mb,
    reset_peak_memory,
)
from artplug.data import BatchLoader, DatasetSplits, dataset_shape, load_dataset
from artplug.display import Display, clock
from artplug.errors import (
    ArtplugError,
    CheckpointError,
    DivergenceError,
    PluginError,
    RecipeError,
)
from artplug.interrupt import StopRequest
from artplug.kinds import (
    LossTerm,
    Outputs,
    Perturbation,
    Progress,
    Schedule,
    StepState,
    Threat,
    UpdateHook,
)
from artplug.models import build_model
from artplug.recipe import ResolvedRecipe, TechniqueSpec
from artplug.selection import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_NAME,
    GOOD_CHECKPOINT_NAME,
    CheckpointPolicy,
    OverfitWatch,
)
from artplug.tracking import NullTracker, Tracker, flatten


def select_device(requested: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU; a CUDA request without CUDA is a user error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ArtplugError(
            f"run.device = {requested!r} but torch sees no CUDA device "
            f'(torch {torch.__version__}); use device = "auto" or "cpu"'
        )
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class LossSlot:
    """A loss term instance with its recipe id and current weight (a knob)."""

    id: str
    term: LossTerm
    weight: float


@dataclass
class Components:
    """Everything a run needs, built from a resolved recipe."""

    recipe: ResolvedRecipe
    device: torch.device
    data: DatasetSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    perturbation: Perturbation
    losses: list[LossSlot]
    schedules: list[Schedule]
    train_loader: BatchLoader
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    channels_last: bool
    base_lrs: list[float] = field(default_factory=list)
    loss_terms_checked: bool = False
    """Whether the loss terms' outputs passed :func:`check_loss_terms` (done on the first step)."""
    update_hooks: list[UpdateHook] = field(default_factory=list)
    """The recipe's transforms that are also :class:`UpdateHook` s, in ``[[transform]]`` order."""
    world: distributed.World | None = None
    """This process's place in a distributed run (torchrun); ``None`` for one process."""
    ddp: nn.Module | None = None
    """``model`` in DistributedDataParallel (distributed runs): the update's forwards go through
    it, so that their backward all-reduces the gradients; attacks use ``model`` itself."""
    gradient_taker: artplug.AfterBackward | None = field(init=False)
    """The perturbation as :class:`artplug.AfterBackward`, or ``None`` (resolved here)."""
    replaying: artplug.Replays | None = field(init=False)
    """The perturbation as :class:`artplug.Replays`, or ``None`` (one pass per minibatch)."""

    def __post_init__(self) -> None:
        # The optional capabilities are resolved once, at build: an isinstance check on a
        # runtime-checkable Protocol inspects attributes, which the step should not repeat.
        p = self.perturbation
        self.gradient_taker = p if isinstance(p, artplug.AfterBackward) else None
        self.replaying = p if isinstance(p, artplug.Replays) else None

    @property
    def threat(self) -> Threat:
        """The recipe's threat model (full eps)."""
        return self.recipe.threat.threat()

    @property
    def eval_threat(self) -> Threat:
        """The threat validation and the final evaluation attack: ``[eval] eps`` if set.

        A paper may train at eps 0.031 while RobustBench evaluates at 8/255 = 0.0313725...;
        ``[eval] eps`` keeps the training threat and moves only the evaluation's radius.
        """
        eps = self.recipe.eval.eps
        threat = self.threat
        return threat if eps is None else Threat(threat.norm, eps)


def _amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``run.amp`` on ``device``, or ``None`` for fp32 (docs/precision.md).

    ``"auto"``: bf16 on CUDA, fp32 elsewhere. ``"bf16"``/``"fp16"``: that dtype on CUDA or CPU
    (CPU autocast is slow; it exists so that the mixed-precision paths run in CPU tests).
    """
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if device.type not in ("cuda", "cpu"):
        raise ArtplugError(
            f"run.amp = {setting!r} needs a CUDA or CPU device, not {device.type!r}; "
            'use amp = "off"'
        )
    # bf16 needs no loss scaling and has fp32's range, so it is the default on CUDA.
    return torch.float16 if setting == "fp16" else torch.bfloat16


def build(recipe: ResolvedRecipe, *, device: torch.device | None = None) -> Components:
    """Instantiate data, model (with transforms), optimizer and techniques for ``recipe``.

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group
    (:func:`artplug.distributed.setup`): the device is ``cuda:LOCAL_RANK`` or the CPU, the
    loader yields this rank's slice of each global batch, the model is wrapped for
    DistributedDataParallel (BatchNorm synchronised with ``run.sync_bn``) and the random
    generators are reseeded from the seed and the rank after everything is built.
    """
    world = distributed.setup(recipe.run.device)
    if world is not None:
        distributed.check_global_batch(recipe.data.batch_size, world.size)
        device = world.device
    device = device if device is not None else select_device(recipe.run.device)
    if recipe.run.threads:
        # Process-wide; torch's default (one thread per core) is kept when threads is 0. On a
        # shared machine that default oversubscribes the cores and can be 10-20x slower.
        torch.set_num_threads(recipe.run.threads)
    seed_everything(recipe.run.seed)
    data = load_dataset(
        recipe.data.dataset,
        root=recipe.data.root,
        download=recipe.data.download,
        val_size=recipe.data.val_size,
        seed=recipe.run.seed,
        synthetic=recipe.data.synthetic_spec(),
        device=device,  # only the synthetic dataset uses it: generated where it is trained
    )
    channels, height, _ = data.input_shape
    model: nn.Module = build_model(
        recipe.model.arch,
        in_channels=channels,
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
        depth=recipe.model.depth,
        width=recipe.model.width,
        dropout=recipe.model.dropout,
    )
    # Transforms run on CPU before .to(device) and before the optimizer exists, so that any
    # parameters they add are moved and trained like the others.
    model, transforms = transform_model(recipe, model)
    if world is not None and recipe.run.sync_bn:
        model = distributed.convert_sync_batchnorm(model, device)
    channels_last = recipe.run.channels_last == "on" or (
        recipe.run.channels_last == "auto" and device.type == "cuda"
    )
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _build_optimizer(recipe, model)
    amp_dtype = _amp_dtype(recipe.run.amp, device)
    # fp16's narrow range needs dynamic loss scaling (as FastAT's apex AMP had); bf16 does not.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    augment = recipe.data.augment == "on" or (recipe.data.augment == "auto" and height >= 32)
    train_loader = BatchLoader(
        *data.train,
        batch_size=recipe.data.batch_size,
        shuffle=True,
        drop_last=len(data.train[0]) > recipe.data.batch_size,
        augment=augment,
        # Horizontal flips change the meaning of digits (SVHN house numbers too).
        flip=recipe.data.dataset not in ("svhn", "digits", "mnist-5k"),
        device=device,
        seed=recipe.run.seed,
        # The split is copied to the GPU once; pinned memory makes that copy asynchronous.
        non_blocking=device.type == "cuda",
        shard=(world.rank, world.size) if world is not None else (0, 1),
    )
    components = Components(
        recipe=recipe,
        device=device,
        data=data,
        model=model,
        optimizer=optimizer,
        perturbation=construct(recipe, recipe.perturbation),
        losses=[LossSlot(s.id, construct(recipe, s), s.weight) for s in recipe.losses],
        schedules=[construct(recipe, s) for s in recipe.schedules],
        train_loader=train_loader,
        amp_dtype=amp_dtype,
        scaler=scaler,
        channels_last=channels_last,
        base_lrs=[group["lr"] for group in optimizer.param_groups],
        update_hooks=[t for t in transforms if isinstance(t, UpdateHook)],
        world=world,
        ddp=distributed.wrap(model, world) if world is not None else None,
    )
    if world is not None:
        # Every rank built the same seeded model; from here on the ranks' random streams
        # (random starts, dropout) differ, reproducibly for a given world size.
        seed_everything(distributed.seed_for_rank(recipe.run.seed, world.rank))
    return components


# Technique code that rejects its parameters or its model raises these; anything else is a bug.
_TECHNIQUE_REJECTIONS = (ValueError, KeyError, ArtplugError)


def _rejected(recipe: ResolvedRecipe, spec: TechniqueSpec, exc: BaseException) -> RecipeError:
    """A technique's rejection at build time as the one-line recipe error naming its place."""
    if isinstance(exc, ArtplugError):
        message = exc.one_line()
    elif isinstance(exc, KeyError) and exc.args:
        message = str(exc.args[0])  # str(KeyError) would quote the message
    else:
        message = str(exc)
    message = message.removeprefix(f"{spec.use}: ")  # the location names the technique already
    return RecipeError(recipe.source, [f"{spec.location} ({spec.use}): {message}"])


def construct(recipe: ResolvedRecipe, spec: TechniqueSpec) -> Any:
    """Instantiate ``spec``; a technique that rejects its parameters is a :class:`RecipeError`."""
    try:
        return spec.build()
    except _TECHNIQUE_REJECTIONS as exc:
        raise _rejected(recipe, spec, exc) from exc


def transform_model(recipe: ResolvedRecipe, model: nn.Module) -> tuple[nn.Module, list[Any]]:
    """Apply the recipe's transforms to ``model`` in order; return it and the transforms.

    A transform that rejects the model (``latent-sites`` with a module name the model does not
    have) is a :class:`~artplug.errors.RecipeError` naming its place, e.g. ``transform[0]
    (latent-sites)``: a user error (exit 2), not a traceback.
    """
    transforms = []
    for spec in recipe.transforms:
        transform = construct(recipe, spec)
        try:
            model = transform.apply(model)
        except _TECHNIQUE_REJECTIONS as exc:
            raise _rejected(recipe, spec, exc) from exc
        transforms.append(transform)
    return model, transforms


def check_build(recipe: ResolvedRecipe) -> None:
    """Build what ``recipe`` builds without data, on the CPU: ``artplug validate``'s last check.

    The model gets its input shape and classes from :func:`~artplug.data.dataset_shape`, the
    transforms are applied to it and every technique is instantiated, so that a technique that
    rejects its parameters or the model fails here, before any training. No data is loaded
    and neither ART nor MLflow is imported.
    """
    (channels, _, _), num_classes = dataset_shape(recipe.data.dataset, recipe.data.synthetic_spec())
    model = build_model(
        recipe.model.arch,
        in_channels=channels,
        num_classes=num_classes,
        mean=(0.5,) * channels,  # any statistics do: the weights are never used
        std=(0.5,) * channels,
        depth=recipe.model.depth,
        width=recipe.model.width,
        dropout=recipe.model.dropout,
    )
    transform_model(recipe, model)
    for spec in (recipe.perturbation, *recipe.losses, *recipe.schedules):
        construct(recipe, spec)


def _build_optimizer(recipe: ResolvedRecipe, model: nn.Module) -> torch.optim.Optimizer:
    optim = recipe.optim
    trained = [p for p in model.parameters() if p.requires_grad]
    # Parameters flagged by a transform (e.g. SmoothReLU's b) get no weight decay: decay would
    # pull such a shape parameter towards a different function, not towards small weights.
    # (marked with artplug.no_weight_decay).
    exempt = [p for p in trained if artplug.is_no_weight_decay(p)]
    decayed = [p for p in trained if not artplug.is_no_weight_decay(p)]
    params: list[dict[str, Any]] = [{"params": decayed}]
    if exempt:
        params.append({"params": exempt, "weight_decay": 0.0})
    if optim.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=optim.lr,
            momentum=optim.momentum,
            nesterov=optim.nesterov and optim.momentum > 0,
            weight_decay=optim.weight_decay,
        )
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


# ------------------------------------------------------------------------------------------
# Knobs


def _coerce_like(current: Any, value: float) -> Any:
    # Knobs travel as floats; an integer parameter (e.g. attack steps) gets a rounded int, so
    # that the strict validation of the technique's Params accepts 5.0 as steps = 5.
    if isinstance(current, bool):
        return bool(value)
    if isinstance(current, int):
        return round(value)
    return value


def _update_params(technique: Any, updates: Mapping[str, float]) -> None:
    """Swap in a copy of ``technique.params`` with knob ``updates``, validated by its model.

    Params are frozen pydantic models, and ``model_copy(update=...)`` would not validate: a
    schedule could push a value out of its field's bounds unnoticed. An invalid knob value is a
    :class:`PluginError` naming the technique, the knob and pydantic's reason.
    """
    params = technique.params
    changed = {
        name: _coerce_like(getattr(params, name), value)
        for name, value in updates.items()
        if getattr(params, name) != value
    }
    if not changed:
        return
    # Imported here: the rest of the engine needs no pydantic (kept to this function's edit).
    from pydantic import ValidationError

    try:
        technique.params = artplug.kinds.updated_params(params, changed)
    except ValidationError as exc:
        name = technique.name
        reasons = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise PluginError(
            f"{name}: a schedule set an invalid parameter value ({reasons}); fix the "
            "schedule's parameters in the recipe"
        ) from None


def apply_knobs(c: Components, knobs: Mapping[str, float]) -> Threat:
    """Push knob values into the optimizer and the techniques; return the step's threat."""
    threat = c.threat
    if not knobs:
        return threat
    scale = knobs.get("lr_scale")
    if scale is not None:
        for group, base in zip(c.optimizer.param_groups, c.base_lrs, strict=True):
            group["lr"] = base * scale
    momentum = knobs.get("momentum")
    if momentum is not None:
        # As torch's CyclicLR does: SGD's momentum, or Adam's first beta.
        for group in c.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum
    eps_scale = knobs.get("threat.eps_scale")
    if eps_scale is not None:
        threat = threat.scaled(eps_scale)
    perturbation_updates: dict[str, float] = {}
    loss_updates: dict[str, dict[str, float]] = {}
    for name, value in knobs.items():
        if name.startswith("perturbation."):
            perturbation_updates[name.removeprefix("perturbation.")] = value
        elif name.startswith("loss."):
            term_id, _, param = name.removeprefix("loss.").rpartition(".")
            loss_updates.setdefault(term_id, {})[param] = value
    if perturbation_updates:
        _update_params(c.perturbation, perturbation_updates)
    for slot in c.losses:
        updates = loss_updates.get(slot.id)
        if updates:
            weight = updates.pop("weight", None)
            if weight is not None:
                slot.weight = weight
            if updates:
                _update_params(slot.term, updates)
    return threat


# ------------------------------------------------------------------------------------------
# The loop


def make_run_dir(recipe: ResolvedRecipe) -> Path:
    """A fresh folder ``<out_dir>/<run name>-<timestamp>`` for the run's files.

    Two runs started in the same second get ``...-<timestamp>`` and ``...-<timestamp>-2``:
    every candidate is created with ``mkdir(exist_ok=False)``, which is atomic, and a name
    taken in the meantime moves on to the next suffix (checking first and creating after
    would let two processes pick the same name).
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe.run.name).strip("-") or "run"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(recipe.run.out_dir) / f"{slug}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")  # itertools.count never ends


def remove_if_unused(run_dir: Path) -> bool:
    """Delete ``run_dir`` if the run left nothing in it worth keeping; True when removed.

    A run that failed before its first optimizer step (a tracking store that cannot be
    reached, a plugin that raises on the first batch) leaves at most the resolved recipe and
    an empty ``metrics.jsonl``: such a folder only hides the real runs.
    """
    if not run_dir.is_dir():
        return False
    for entry in run_dir.iterdir():
        # The tracking journal only mirrors what already went to MLflow (a FAILED run there).
        if entry.name in ("recipe.resolved.toml", "tracking.jsonl"):
            continue
        if entry.name == "metrics.jsonl" and entry.stat().st_size == 0:
            continue
        if entry.name == "plots" and entry.is_dir() and not any(entry.iterdir()):
            continue
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


def _subset(x: Tensor, y: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random subset of ``n`` examples, kept in their order (validation, overfit watch)."""
    if n is None or n >= len(x):
        return x, y
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(x), generator=generator)[:n].sort().values
    return x[index], y[index]


def _first(x: Tensor, y: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    """The first ``n`` examples in order (all for ``None``): the test split's subset.

    RobustBench reports robust accuracy on the first N test examples in order, not on a random
    subset, so that numbers on the same N are computed on the same images everywhere.
    """
    return (x, y) if n is None or n >= len(x) else (x[:n], y[:n])


def first_test_examples(c: Components, n: int | None) -> tuple[Tensor, Tensor]:
    """The first ``n`` test examples in order: the gate and the curve see a prefix of the
    examples the final evaluation attacked."""
    x, y = c.data.test
    return _first(x, y, n)


def test_subset_label(n: int, total: int) -> str:
    """``eval.json``'s ``subset``: ``"full test split"`` or ``"first N in order"``."""
    return "full test split" if n >= total else f"first {n} in order"


class _Meter:
    """Running sums on the device; read (one host sync) only at the logging cadence."""

    def __init__(self, device: torch.device, term_ids: list[str]) -> None:
        self.device = device
        self.term_ids = term_ids
        self.reset()

    def reset(self) -> None:
        zeros = torch.zeros(3 + len(self.term_ids), device=self.device, dtype=torch.float64)
        self.sums = zeros  # [loss * n, correct, n, term_1 * n, ...]
        self.started = time.perf_counter()

    def add(self, loss: Tensor, parts: list[Tensor], logits: Tensor, y: Tensor) -> None:
        n = y.shape[0]
        correct = (logits.detach().argmax(1) == y).sum()
        values = torch.stack(
            [loss.detach().double() * n, correct.double(), torch.tensor(float(n), device=y.device)]
            + [p.detach().double() * n for p in parts]
        )
        self.sums += values

    def _global_sums(self) -> list[float]:
        # In a distributed run every rank sums its own slices: the window's figures are those
        # of the global batches (and every rank takes the same divergence decision).
        return distributed.all_reduce_sum(self.sums).tolist()

    def read(self) -> dict[str, float]:
        sums = self._global_sums()  # the one host sync of the logging window
        n = max(sums[2], 1.0)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {
            "train/loss": sums[0] / n,
            "train/adv_acc": sums[1] / n,
            "time/examples_per_s": sums[2] / elapsed,
        }
        for term_id, value in zip(self.term_ids, sums[3:], strict=True):
            out[f"train/loss.{term_id}"] = value / n
        return out

    def nonfinite(self) -> list[str]:
        """The loss keys whose unread sums are not finite (one host sync; epoch ends only)."""
        sums = self._global_sums()
        keys = ["train/loss"] + [f"train/loss.{term_id}" for term_id in self.term_ids]
        values = [sums[0], *sums[3:]]
        return [key for key, value in zip(keys, values, strict=True) if not math.isfinite(value)]

    def state_dict(self) -> dict[str, Any]:
        """The unread window as plain data, for a checkpoint written between two reads."""
        return {"sums": self._global_sums(), "elapsed_s": time.perf_counter() - self.started}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Undo :meth:`state_dict`: the next read covers the restored steps too."""
        sums = [float(v) for v in state["sums"]]
        if len(sums) != 3 + len(self.term_ids):
            raise CheckpointError(
                f"the checkpoint's running loss sums have {len(sums) - 3} terms, the recipe "
                f"{len(self.term_ids)}"
            )
        world = distributed.current()
        if world is not None and not world.writer:
            sums = [0.0] * len(sums)  # the saved sums are global: rank 0 carries them alone
        self.sums = torch.tensor(sums, device=self.device, dtype=torch.float64)
        self.started = time.perf_counter() - float(state.get("elapsed_s", 0.0))


def _nonfinite_keys(window: Mapping[str, float]) -> list[str]:
    """The ``train/loss*`` entries of a read window that are NaN or infinite."""
    return [k for k, v in window.items() if k.startswith("train/loss") and not math.isfinite(v)]


def _nonfinite_message(keys: list[str]) -> str:
    """``loss terms: ce, trades`` for ``train/loss.<id>`` keys (the total alone otherwise)."""
    terms = [key.removeprefix("train/loss.") for key in keys if key.startswith("train/loss.")]
    if terms:
        return "non-finite loss terms: " + ", ".join(terms)
    return "the total loss is non-finite (no single term is)"


def _window_first_step(step: int, log_every: int, steps_per_epoch: int) -> int:
    """The first step of the logging window that ends at ``step`` (windows restart each epoch)."""
    since_log = ((step - 1) // log_every) * log_every
    since_epoch = ((step - 1) // steps_per_epoch) * steps_per_epoch
    return max(since_log, since_epoch) + 1


def model_is_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite.

    One reduction and one host sync for the whole model: called at epoch ends, before the
    model is validated, checkpointed, evaluated or logged, never inside a step.
    """
    flags = [
        torch.isfinite(t.detach()).all()
        for t in itertools.chain(model.parameters(), model.buffers())
        if t.is_floating_point() and t.numel()
    ]
    return bool(torch.stack(flags).all().item()) if flags else True


def plugin_origin(plugin: str) -> str:
    """``plugin 'x' from <distribution> <version>`` for error messages that blame a plugin."""
    from importlib import metadata

    from artplug.plugins import ENTRY_POINT_GROUP

    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP, name=plugin):
        if entry_point.dist is not None:
            dist = entry_point.dist
            return f"plugin {plugin!r} from {dist.name} {dist.version}"
    return f"plugin {plugin!r} (not from an installed distribution)"


def check_loss_terms(c: Components, parts: list[Any]) -> None:
    """Raise :class:`PluginError` naming the first loss term that broke its contract.

    A term must return a 0-dim tensor with a gradient path to the model (DESIGN §3). Only
    host-side metadata is read (type, shape, ``requires_grad``, ``grad_fn``): no host sync, so
    the first step pays nothing measurable, and later steps skip the check altogether.
    """
    specs = {spec.id: spec for spec in c.recipe.losses}
    for slot, part in zip(c.losses, parts, strict=True):
        if not isinstance(part, Tensor):
            problem = f"returned {type(part).__name__}, not a tensor"
        elif part.dim() != 0:
            problem = (
                f"returned a tensor of shape {tuple(part.shape)}; a loss term must return a "
                "0-dim tensor (reduce over the batch, e.g. .mean())"
            )
        elif not part.requires_grad or part.grad_fn is None:
            problem = (
                "returned a tensor that has no gradient path to the model (requires_grad is "
                "False or it is a leaf: detached, built with torch.tensor(), or .item()'d); "
                "training would not change the model through it"
            )
        else:
            continue
        spec = specs.get(slot.id)
        who = (
            f"{spec.location} ({spec.use}) of {plugin_origin(spec.plugin)}"
            if spec is not None
            else f"loss term {slot.id!r} ({type(slot.term).__qualname__})"
        )
        raise PluginError(f"{who} {problem}; fix the plugin, or remove the term from the recipe")
    c.loss_terms_checked = True


def train_step(
    c: Components, x: Tensor, y: Tensor, progress: Progress, meter: _Meter | None = None
) -> dict[str, float]:
    """One optimizer step (``replays`` of them for FreeAT-style perturbations); returns knobs."""
    knobs: dict[str, float] = {}
    for schedule in c.schedules:
        knobs.update(schedule.values(progress))
    threat = apply_knobs(c, knobs)
    model, perturbation = c.model, c.perturbation
    attack_train_mode = c.recipe.perturbation.model_mode == "train"
    # Optional capabilities (artplug.AfterBackward, artplug.Replays), resolved at build. The
    # replay count is read per step: a schedule may change it through the technique's Params.
    gradient_taker = c.gradient_taker
    replays = c.replaying.replays if c.replaying is not None else 1
    needs_clean = any("clean" in slot.term.needs for slot in c.losses)
    needs_adv = any("adv" in slot.term.needs for slot in c.losses)
    autocast = (
        torch.autocast(c.device.type, dtype=c.amp_dtype)
        if c.amp_dtype is not None
        else contextlib.nullcontext()
    )
    for replay in range(replays):
        state = StepState(progress, knobs, model, threat, replay)
        with autocast:
            model.train(attack_train_mode)
            with phase.running("attack"):
                x_adv = perturbation.generate(model, x, y, state)
            model.train()
            # Before the update's forwards (and before x_adv may require grad): an update hook
            # moves the weights the update's gradient is taken at (AWP), see kinds.UpdateHook.
            if c.update_hooks:
                with phase.running("update"):
                    for hook in c.update_hooks:
                        hook.before_update(model, x, x_adv, y, state)
            if gradient_taker is not None:
                x_adv.requires_grad_(True)
            # The phases tell transforms which pass this is (artplug/phase.py): a latent
            # perturbation site perturbs only the update's forward of x_adv.
            # Through the DistributedDataParallel wrapper in a distributed run: the backward of
            # these forwards all-reduces the gradients (the attack's passes above do not).
            trained = c.ddp if c.ddp is not None else model
            with phase.running("update-clean"):
                logits_clean = trained(x) if needs_clean else None
            with phase.running("update-adv"):
                logits_adv = trained(x_adv) if needs_adv else None
            out = Outputs(x, y, x_adv, logits_clean, logits_adv)
            with phase.running("update"):
                parts = [slot.term(out, state) for slot in c.losses]
            if not c.loss_terms_checked:
                # Before backward(), whose own error for a bad term names no technique.
                check_loss_terms(c, parts)
            loss = parts[0] * c.losses[0].weight
            for slot, part in zip(c.losses[1:], parts[1:], strict=True):
                loss = loss + slot.weight * part
        c.optimizer.zero_grad(set_to_none=True)
        if c.scaler is not None:
            c.scaler.scale(loss).backward()
        else:
            loss.backward()
        # The gradient was taken at the hooks' weights; the optimizer steps from the originals.
        for hook in reversed(c.update_hooks):
            hook.after_backward_update(model)
        if gradient_taker is not None:
            gradient_taker.after_backward(x_adv.grad, state)
        if c.scaler is not None:
            c.scaler.step(c.optimizer)
            c.scaler.update()
        else:
            c.optimizer.step()
        if meter is not None:
            logits = logits_adv if logits_adv is not None else logits_clean
            assert logits is not None
            meter.add(loss, parts, logits, y)
    return knobs


def _batches(c: Components, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    c.train_loader.set_epoch(epoch)
    for x, y in c.train_loader:
        if c.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def _evaluate(
    c: Components, split: str, attacks: list[str], n: int | None, display: Display
) -> dict[str, float]:
    """Accuracies at the evaluation threat; the test split also gets ``worst``.

    Validation uses a seeded random subset of ``n`` examples; the test split its first ``n``
    examples in order (:func:`_first`).
    """
    from artplug.evaluate import evaluate

    x, y = getattr(c.data, split)
    if len(x) == 0:  # e.g. data.val_size = 0: nothing to validate on
        return {}
    x, y = _first(x, y, n) if split == "test" else _subset(x, y, n, c.recipe.run.seed)

    progress = _AttackProgress(display, split, attacks, len(x))
    run = evaluate_with_worst if split == "test" else evaluate
    return run(
        c.model,
        x,
        y,
        c.eval_threat,
        attacks,
        batch_size=c.recipe.eval.batch_size,
        seed=c.recipe.run.seed,
        device=c.device,
        on_attack=progress.attack,
        # Per-batch updates only redraw a live terminal line; off a terminal they would only
        # add lines (the status there is rate-limited plain lines).
        on_batch=progress.batch if display.live else None,
    )


class _AttackProgress:
    """The status line of an evaluation: which attack, i-th of n, its batches and time so far.

    ``  evaluating test: 3/5 apgd-ce on 500 examples, 120 batches, 0:42``. Batch updates are
    redrawn at most every ``interval_s`` seconds: an attack may run thousands of small batches
    a second, and the terminal need not see each.
    """

    def __init__(
        self,
        display: Display,
        split: str,
        attacks: list[str],
        n_examples: int,
        interval_s: float = 0.25,
    ) -> None:
        self.display, self.split, self.n_examples = display, split, n_examples
        self.names = list(dict.fromkeys(attacks))  # the evaluation runs each entry once
        self.interval_s = interval_s
        self.name = ""
        self.started = self.shown = time.monotonic()

    def _head(self) -> str:
        index = self.names.index(self.name) + 1 if self.name in self.names else 0
        return (
            f"  evaluating {self.split}: {index}/{len(self.names)} {self.name} on "
            f"{self.n_examples} examples"
        )

    def attack(self, name: str) -> None:
        """An entry starts."""
        self.name = name
        self.started = self.shown = time.monotonic()
        self.display.status(self._head())

    def batch(self, count: int) -> None:
        """The entry ran its ``count``-th batch through the model."""
        now = time.monotonic()
        if now - self.shown < self.interval_s:
            return
        self.shown = now
        self.display.status(f"{self._head()}, {count} batches, {clock(now - self.started)}")


def evaluate_with_worst(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    attacks: list[str],
    *,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
    on_attack: Callable[[str], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Per-entry accuracies plus ``worst``: an example counts only if it survives every entry.

    ``worst`` (from :func:`artplug.evaluate.evaluate_detailed`) is the per-example AND over
    the entries, i.e. the accuracy against an adversary that may pick the best of those
    attacks for each example. It is left out when fewer than two non-clean entries are
    requested, where it would only repeat the one attack's (or the clean) accuracy.
    """
    from artplug.evaluate import evaluate_detailed

    accuracies, _ = evaluate_detailed(
        model,
        x,
        y,
        threat,
        attacks,
        batch_size=batch_size,
        seed=seed,
        device=device,
        on_attack=on_attack,
        on_batch=on_batch,
    )
    # The keys are the requested entries without repeats, then "worst".
    if sum(name not in ("clean", "worst") for name in accuracies) < 2:
        accuracies.pop("worst", None)
    return accuracies


def _checkpoint_payload(c: Components, epoch: int, step: int, run_id: str | None) -> dict[str, Any]:
    # Only a perturbation with the artplug.Stateful capability has state to save.
    perturbation = c.perturbation
    extra: dict[str, Any] = {}
    if c.world is not None:
        # Every rank's generator states (a collective: every rank checkpoints at the same
        # points), so that a resumed distributed run continues each rank's own streams.
        extra = {
            "world_size": c.world.size,
            "rng_ranks": distributed.gather_objects(ckpt.rng_states()),
        }
    return {
        "artplug_version": artplug.__version__,
        "recipe": c.recipe.to_dict(),
        "epoch": epoch,
        "step": step,
        "model": c.model.state_dict(),
        "optimizer": c.optimizer.state_dict(),
        "scaler": c.scaler.state_dict() if c.scaler is not None else None,
        "perturbation": (
            perturbation.state_dict() if isinstance(perturbation, artplug.Stateful) else None
        ),
        "rng": ckpt.rng_states(),
        "tracking_run_id": run_id,
        **extra,
    }


def restore(c: Components, payload: Mapping[str, Any], source: str) -> tuple[int, int]:
    """Load a checkpoint into built components; return (epochs done, steps done)."""
    load_weights(c, payload, source)
    _load_matching(c.optimizer.load_state_dict, payload, "optimizer", source)
    if c.scaler is not None and payload.get("scaler"):
        c.scaler.load_state_dict(payload["scaler"])
    if isinstance(c.perturbation, artplug.Stateful) and payload.get("perturbation") is not None:
        c.perturbation.load_state_dict(payload["perturbation"])
    try:
        ckpt.restore_rng_states(_own_rng_states(c, payload))
    except (KeyError, TypeError, ValueError) as exc:
        # ckpt.load(purpose="resume") checks the states' shape; this covers hand-built payloads.
        raise CheckpointError(
            f"{source}: cannot restore the random generator states ({type(exc).__name__}: {exc})"
        ) from None
    return int(payload["epoch"]), int(payload["step"])


def _own_rng_states(c: Components, payload: Mapping[str, Any]) -> Any:
    """The generator states this process continues from: its rank's, when the checkpoint has
    them for this world size; otherwise (one process, or a fork into another world size) the
    saved ones, made distinct per rank by a reseed after the restore."""
    world = c.world
    if world is None:
        return payload["rng"]
    ranks = payload.get("rng_ranks")
    if int(payload.get("world_size", 1)) == world.size and isinstance(ranks, list):
        return ranks[world.rank]
    step = int(payload.get("step", 0))
    ckpt.restore_rng_states(payload["rng"])
    seed_everything(distributed.seed_for_rank(c.recipe.run.seed + step, world.rank))
    return ckpt.rng_states()


def load_weights(c: Components, payload: Mapping[str, Any], source: str) -> None:
    """Load only the model weights of a checkpoint (evaluation); CheckpointError on a mismatch."""
    _load_matching(c.model.load_state_dict, payload, "model", source)


def _load_matching(
    load: Callable[[Any], object], payload: Mapping[str, Any], key: str, source: str
) -> None:
    """``load(payload[key])``; a missing or mismatching entry becomes a one-line CheckpointError."""
    try:
        load(payload[key])
    except (KeyError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{source}: does not match this recipe's model ({first})") from None


def final_report_fields(c: Components, accuracy: Mapping[str, float]) -> dict[str, Any]:
    """``eval.json``'s fields describing a final evaluation's ``accuracy``.

    ``n_examples`` and ``subset`` (``"first N in order"`` or ``"full test split"``), ``threat``
    (the norm and the *evaluation* eps the numbers were measured at), ``train_eps`` (the
    ``[threat] eps`` the model was trained at), ``accuracy``, and ``strongest``/``worst`` from
    :func:`artplug.evaluate.robustness_summary`.
    """
    from artplug.evaluate import robustness_summary

    total = len(c.data.test[0])
    n = min(total, c.recipe.eval.test_examples or total)
    threat = c.eval_threat
    summary = robustness_summary(accuracy)
    return {
        "n_examples": n,
        "subset": test_subset_label(n, total),
        "test_split_size": total,
        "threat": {"norm": threat.norm, "eps": threat.eps},
        "train_eps": c.threat.eps,
        "accuracy": dict(accuracy),
        "strongest": summary["strongest"],
        "worst": summary["worst"],
    }


def final_table_title(c: Components) -> str:
    """The title of the printed final table (:func:`artplug.evaluate.table_title`)."""
    from artplug.evaluate import table_title

    total = len(c.data.test[0])
    n = min(total, c.recipe.eval.test_examples or total)
    threat = c.eval_threat
    return table_title(threat.norm, threat.eps, n, total, train_eps=c.threat.eps)


def evaluate_test(c: Components, display: Display | None = None) -> dict[str, float]:
    """``eval.final_attacks`` (plus ``worst``) on the first ``eval.test_examples`` test examples.

    The attacks run at :attr:`Components.eval_threat` (``[eval] eps``, else ``[threat] eps``).
    """
    display = display if display is not None else Display(enabled=False)
    settings = c.recipe.eval
    return _evaluate(c, "test", settings.final_attacks, settings.test_examples, display)


class _EpochWindows:
    """Averages the logging windows of one epoch into ``epoch/train_*`` metrics."""

    def __init__(self) -> None:
        self.start(0)

    def start(self, epoch: int) -> None:
        self.epoch = epoch
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, window: Mapping[str, float]) -> None:
        self.count += 1
        for key, value in window.items():
            if key.startswith("train/"):
                self.sums[key] = self.sums.get(key, 0.0) + value

    def summary(self) -> dict[str, float]:
        return {
            "epoch/train_" + key.removeprefix("train/").replace(".", "_"): value / self.count
            for key, value in self.sums.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a mid-epoch checkpoint."""
        return {"epoch": self.epoch, "sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Undo :meth:`state_dict`."""
        self.epoch = int(state["epoch"])
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.count = int(state["count"])


def train_epoch(
    c: Components,
    epoch: int,
    step: int,
    *,
    meter: _Meter | None = None,
    on_window: Callable[[dict[str, float], int], None] | None = None,
    max_steps: int | None = None,
    counter: PassCounter | None = None,
    skip: int = 0,
    stop: StopRequest | None = None,
) -> int:
    """Run the optimizer steps of one epoch, starting at global step ``step``; return the next.

    With a ``meter``, every ``run.log_every`` steps (and at the epoch's end) the running sums
    are read in one host sync and handed to ``on_window(metrics, step)``, together with the
    learning rate (``train/lr``) and the knobs the schedules set for that step (``knob/*``).
    A window whose loss (or one of its terms) is not finite raises
    :class:`~artplug.errors.DivergenceError` right after ``on_window`` has it: the check rides
    on that read, so it costs no extra host sync. With a ``counter``, the training examples
    drawn are added to ``counter.examples`` (the caller attaches it to the model with
    :meth:`PassCounter.watching`).

    ``skip`` batches of the epoch's (seeded, reproducible) order are passed over: they were
    trained before a mid-epoch checkpoint. The meter is then left as the caller restored it.
    With a ``stop`` request, the loop ends at the first step boundary after a signal.
    """
    steps_per_epoch = len(c.train_loader)
    total_steps = steps_per_epoch * c.recipe.run.epochs
    log_every = c.recipe.run.log_every
    if meter is not None and skip == 0:
        meter.reset()
    for index, (x, y) in enumerate(_batches(c, epoch)):
        if index < skip:
            continue
        if stop is not None and stop.requested:
            break
        if counter is not None:
            counter.examples += x.shape[0]
        knobs = train_step(c, x, y, Progress(epoch, step, steps_per_epoch, total_steps), meter)
        step += 1
        if meter is not None and (step % log_every == 0 or step % steps_per_epoch == 0):
            window = meter.read()
            meter.reset()
            window["train/lr"] = c.optimizer.param_groups[0]["lr"]
            window.update({f"knob/{k}": v for k, v in knobs.items()})
            if on_window is not None:
                on_window(window, step)
            bad = _nonfinite_keys(window)
            if bad:
                first = _window_first_step(step, log_every, steps_per_epoch)
                raise DivergenceError(
                    f"training diverged at step {step}: {_nonfinite_message(bad)} (window of "
                    f"steps {first}-{step})",
                    step=step,
                    terms=[k.removeprefix("train/loss.") for k in bad if k != "train/loss"],
                )
        if max_steps is not None and step >= max_steps:
            break
    return step


class MetricsLog:
    """``metrics.jsonl`` and the tracker, written together, one record per (step, metrics).

    ``already_logged`` holds the (step, key) pairs the tracker got from a killed process that a
    resumed run replays: the values are the same, and MLflow would keep both copies.
    """

    def __init__(
        self, path: Path, tracker: Tracker, already_logged: set[tuple[int, str]] | None = None
    ) -> None:
        self.path, self.tracker = path, tracker
        self.already_logged = already_logged or set()
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, metrics: Mapping[str, float], at_step: int) -> None:
        """Log ``metrics`` at ``at_step`` to the tracker (unless it has them) and the file."""
        tracked = metrics
        if self.already_logged:
            tracked = {k: v for k, v in metrics.items() if (at_step, k) not in self.already_logged}
        if tracked:
            self.tracker.log_metrics(tracked, step=at_step)
        self._file.write(json.dumps({"step": at_step, **metrics}) + "\n")
        self._file.flush()

    def truncate(self, step: int) -> None:
        """Drop the records after ``step``: a rollback's replay logs them again."""
        self._file.close()
        _truncate_metrics(self.path, step)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()


class Training:
    """The state of one training run: position, selection, cost, divergence and its files.

    :func:`fit` drives it epoch by epoch and returns it; the workflow layer
    (:mod:`artplug.workflows`) reads from it what the final evaluation and ``eval.json`` need.
    Everything a checkpoint stores comes from :meth:`payload` and goes back in :meth:`load`,
    except the wall times of the earlier segments (``wall_segments``), read once when a run
    resumes: a rollback restores the model, not the clock.
    """

    def __init__(
        self,
        c: Components,
        tracker: Tracker,
        display: Display,
        run_dir: Path,
        resume_from: Mapping[str, Any] | None,
    ) -> None:
        self.c, self.tracker, self.display, self.run_dir = c, tracker, display, run_dir
        # This segment's clock (a resumed run has one segment per process that trained it).
        self.started = time.perf_counter()
        recipe = c.recipe
        run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = run_dir / CHECKPOINT_NAME
        self.best_path = run_dir / BEST_CHECKPOINT_NAME
        self.good_path = run_dir / GOOD_CHECKPOINT_NAME
        already_logged: set[tuple[int, str]] = set()
        if resume_from is not None:
            dropped = _prepare_resumed_folder(run_dir, recipe, int(resume_from["step"]), display)
            if tracker.run_id is not None and tracker.run_id == resume_from.get("tracking_run_id"):
                # The killed process sent these (step, metric) pairs to this very run already.
                already_logged = dropped
        recipe_path = run_dir / "recipe.resolved.toml"
        recipe_path.write_text(recipe.to_toml(), encoding="utf-8")
        tracker.log_artifact(recipe_path)
        self.log = MetricsLog(run_dir / "metrics.jsonl", tracker, already_logged)

        self.steps_per_epoch = len(c.train_loader)
        self.policy = CheckpointPolicy(recipe.eval.attacks, recipe.eval.early_stop_patience)
        self.ledger = CostLedger(c.device, c.world.size if c.world is not None else 1)
        self.meter = _Meter(c.device, [slot.id for slot in c.losses])
        self.counter = PassCounter()
        self.windows = _EpochWindows()
        self.history: list[dict[str, float]] = []
        # The recipe's learning rates; rollbacks scale them (and so every lr schedule) for good.
        self.base_lrs = list(c.base_lrs)
        self.lr_multiplier = 1.0
        self.rollbacks: list[dict[str, Any]] = []
        self.epoch, self.step, self.skip, self.epoch_s_before = 0, 0, 0, 0.0
        self.used_checkpoint, self.used_epoch = CHECKPOINT_NAME, 0
        self.overfit_event: str | None = None
        self.early_stop: str | None = None
        self.truncated = False
        # The last state whose training was all finite: what a rollback returns to and what a
        # divergence error names. checkpoint-last.pt is written only after the finiteness
        # checks, so once this run wrote it, it is that state.
        self.initial_good: Mapping[str, Any] | None = None
        self.good_at: tuple[int, int] | None = None
        self.good_written = False
        # The wall times of the earlier segments, from the checkpoint: what a resumed run's
        # total wall time adds up (not restored by load(), which rollbacks use too).
        self.segments_before: list[float] = []
        if resume_from is not None:
            saved = resume_from.get("wall_segments")  # absent from older checkpoints
            self.segments_before = [float(s) for s in saved] if isinstance(saved, list) else []
            self.load(resume_from, "checkpoint")
            self.rollbacks.extend(dict(r) for r in resume_from.get("rollbacks") or [])
            self.initial_good, self.good_at = resume_from, (self.epoch, self.step)
            if not self.checkpoint_path.exists():
                # A fork starts in a new folder: give it its starting point, so that the folder
                # can be resumed or evaluated even before (or without) another epoch.
                ckpt.save_atomic(
                    {**resume_from, "tracking_run_id": tracker.run_id}, self.checkpoint_path
                )
                self.good_written = True
        elif recipe.run.on_nonfinite == "rollback":
            # Before the first checkpoint a rollback goes back to the start: keep a copy of it.
            self.initial_good = copy.deepcopy(self.payload())
        self.first_step = self.step  # where this segment started, for the remaining time

    def load(self, payload: Mapping[str, Any], source: str) -> None:
        """Continue from ``payload``: weights, optimizer, RNG, selection, cost and position."""
        c = self.c
        self.epoch, self.step = restore(c, payload, source)
        self.policy.load_state_dict(payload.get("selection"))
        self.ledger.load_state_dict(payload.get("cost"))
        self.lr_multiplier = float(payload.get("lr_multiplier", 1.0))
        c.base_lrs = [base * self.lr_multiplier for base in self.base_lrs]
        self.history[:] = [h for h in self.history if h["epoch"] <= self.epoch]
        partial = payload.get("partial_epoch")
        self.skip, self.epoch_s_before = 0, 0.0
        if partial:
            self.skip = int(partial["batch"])
            self.meter.load_state_dict(partial["meter"])
            self.windows.load_state_dict(partial["windows"])
            load_counter(self.counter, partial["counter"])
            self.epoch_s_before = float(partial.get("epoch_s", 0.0))

    def payload(self, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint of the state now (``partial``: the position inside an epoch)."""
        payload = _checkpoint_payload(self.c, self.epoch, self.step, self.tracker.run_id)
        payload["selection"] = self.policy.state_dict()
        payload["cost"] = self.ledger.state_dict()
        payload["lr_multiplier"] = self.lr_multiplier
        payload["rollbacks"] = [dict(r) for r in self.rollbacks]
        payload["wall_segments"] = self.wall_segments()
        if partial is not None:
            payload["partial_epoch"] = partial
        return payload

    def wall_segments(self) -> list[float]:
        """Wall time in seconds of each segment: the earlier processes', then this one so far."""
        return [*self.segments_before, time.perf_counter() - self.started]

    def timing(self, max_steps: int | None = None) -> str:
        """``elapsed 0:08  eta 0:34``: wall time so far (all segments) and the estimated rest.

        The estimate is this segment's time per step (validation included) times the steps
        left: to ``max_steps`` when it comes first, else to the recipe's last epoch.
        """
        segments = self.wall_segments()
        text = f"elapsed {clock(sum(segments))}"
        done = self.step - self.first_step
        if done <= 0:  # e.g. right after a rollback to a step before this segment's start
            return text
        total = self.steps_per_epoch * self.c.recipe.run.epochs
        end = min(total, max_steps) if max_steps is not None else total
        left = max(0, end - self.step)
        return f"{text}  eta {clock(segments[-1] / done * left)}"

    def start_epoch(self) -> None:
        """Reset the epoch's windows, counts and clocks (kept when resuming inside it)."""
        if self.skip == 0:
            self.windows.start(self.epoch)
            self.counter.reset()
            self.epoch_s_before = 0.0
        reset_peak_memory(self.c.device)
        self.epoch_started = time.perf_counter()
        self.step_before = self.step

    def end_epoch(self) -> tuple[float, int]:
        """The epoch's training time and the batches done in it; clears the resume skip."""
        if self.c.device.type == "cuda":
            # The step never syncs; kernels still queued belong to this epoch's time.
            torch.cuda.synchronize(self.c.device)
        seconds = self.epoch_s_before + time.perf_counter() - self.epoch_started
        position = self.skip + self.step - self.step_before
        self.skip = 0
        return seconds, position

    def on_window(self, window: dict[str, float], at_step: int) -> None:
        """A logging window from :func:`train_epoch`: log it, add it up, show progress."""
        self.log(window, at_step)
        self.windows.add(window)
        run = self.c.recipe.run
        # The batch within the epoch, counted from the epoch's start: the global step is not
        # epoch * steps_per_epoch after a --max-steps cut counted as an epoch.
        batch = self.skip + at_step - self.step_before
        self.display.status(
            f"epoch {self.windows.epoch + 1}/{run.epochs} step {batch}/{self.steps_per_epoch} "
            f"loss {window['train/loss']:.4f} "
            f"adv_acc {100 * window['train/adv_acc']:.1f}% "
            f"{window['time/examples_per_s']:.0f} ex/s"
        )

    def check_finite(self) -> None:
        """The epoch-end guard: the window not logged yet, then the weights (two host syncs)."""
        step = self.step
        bad = self.meter.nonfinite()
        if bad:
            first = _window_first_step(step, self.c.recipe.run.log_every, self.steps_per_epoch)
            raise DivergenceError(
                f"training diverged by step {step}: {_nonfinite_message(bad)} (steps "
                f"{first}-{step}, not logged yet)",
                step=step,
                terms=[k.removeprefix("train/loss.") for k in bad if k != "train/loss"],
            )
        if not model_is_finite(self.c.model):
            raise DivergenceError(
                f"training diverged by step {step}: the model's weights are not finite",
                step=step,
            )

    def roll_back(self, exc: DivergenceError) -> bool:
        """Restore the last good state with half the learning rate; False when not allowed."""
        run = self.c.recipe.run
        if run.on_nonfinite != "rollback" or len(self.rollbacks) >= run.max_rollbacks:
            return False
        if self.good_written:
            payload: Mapping[str, Any] = ckpt.load(self.checkpoint_path, purpose="resume")
            source = str(self.checkpoint_path)
        else:
            assert self.initial_good is not None
            payload, source = self.initial_good, "the start of the run"
        multiplier = self.lr_multiplier * 0.5
        saved = float(payload.get("lr_multiplier", 1.0))
        self.load(payload, source)
        self.lr_multiplier = multiplier
        self.c.base_lrs = [base * multiplier for base in self.base_lrs]
        for group in self.c.optimizer.param_groups:
            # The restored lr carries the multiplier of its time; move it to the new one (a
            # schedule's lr_scale knob sets lr from base_lrs, which already has it).
            group["lr"] = group["lr"] * multiplier / saved
        self.rollbacks.append(
            {
                "step": exc.step,
                "terms": list(exc.terms),
                "to_step": self.step,
                "lr_multiplier": multiplier,
            }
        )
        # The replay from the restored step rewrites the curves after it.
        self.log.truncate(self.step)
        event = (
            f"{exc.one_line()}; rolled back to {source} (step {self.step}) with the learning "
            f"rate halved (x{multiplier:g}), rollback {len(self.rollbacks)} of "
            f"{run.max_rollbacks}"
        )
        self.tracker.set_tags({f"artplug.event.rollback.{len(self.rollbacks)}": event})
        self.display.warn(event)
        return True

    def diverged(self, exc: DivergenceError) -> DivergenceError:
        """``exc`` with what the user needs: the last good checkpoint and what to change."""
        gave_up = ""
        if self.rollbacks:
            gave_up = (
                f"; gave up after {len(self.rollbacks)} rollbacks (learning rate "
                f"x{self.lr_multiplier:g})"
            )
        hint = (
            'lower optim.lr or set run.on_nonfinite = "rollback"'
            if self.c.recipe.run.on_nonfinite == "stop"
            else "lower optim.lr or raise run.max_rollbacks"
        )
        if self.good_at is None:
            good = "none (it diverged before the first checkpoint)"
        else:
            where = (
                str(self.checkpoint_path)
                if self.checkpoint_path.exists()
                else "the starting checkpoint"
            )
            good = f"{where} (epoch {self.good_at[0]}, step {self.good_at[1]})"
        message = f"{exc}{gave_up}; last good checkpoint: {good}; {hint}"
        self.tracker.set_tags({"artplug.event.divergence": message})
        return DivergenceError(
            message,
            step=exc.step,
            terms=exc.terms,
            checkpoint=str(self.checkpoint_path) if self.good_at is not None else None,
        )

    def interrupted(self, stop: StopRequest, position: int, seconds: float) -> BaseException:
        """Write a mid-epoch checkpoint and return the exception that ends the run.

        Resume skips the ``position`` batches already done in the epoch's seeded order and
        carries on with the same RNG states.
        """
        partial = {
            "batch": position,
            "meter": self.meter.state_dict(),
            "windows": self.windows.state_dict(),
            "counter": counter_state(self.counter),
            "epoch_s": seconds,
        }
        ckpt.save_atomic(self.payload(partial), self.checkpoint_path)
        self.display.line(
            f"stopping after step {self.step} (epoch {self.epoch + 1}, batch {position}/"
            f"{self.steps_per_epoch}); checkpoint written to {self.checkpoint_path}"
        )
        return stop.interrupted(self.checkpoint_path, self.step)

    def save(self, improved: bool) -> None:
        """Checkpoint the epoch just done (and as the best one when validation improved)."""
        payload = self.payload()
        ckpt.save_atomic(payload, self.checkpoint_path)
        self.good_written, self.good_at = True, (self.epoch, self.step)
        if improved:
            ckpt.save_atomic(payload, self.best_path)

    def watch_overfit(self, watch: OverfitWatch) -> bool:
        """Run the catastrophic-overfitting check; True when it stops training."""
        metrics, event = watch.check(self.epoch)
        self.log(metrics, self.step)
        if event is None:
            shutil.copyfile(self.checkpoint_path, self.good_path)
            return False
        if self.overfit_event is not None:
            return False
        self.overfit_event = event
        self.tracker.set_tags({"artplug.event.catastrophic_overfitting": event})
        self.display.warn(event)
        if self.c.recipe.eval.overfit_check != "stop" or not self.good_path.exists():
            return False
        good = ckpt.load(self.good_path)
        self.c.model.load_state_dict(good["model"])
        self.used_checkpoint, self.used_epoch = GOOD_CHECKPOINT_NAME, int(good["epoch"])
        self.display.line(
            f"stopping; restored {GOOD_CHECKPOINT_NAME} (after epoch {good['epoch']}) for the "
            "final evaluation"
        )
        return True

    def stop_early(self) -> None:
        """Record and announce the early stop (validation stopped improving)."""
        policy = self.policy
        self.early_stop = (
            f"early stop after epoch {self.epoch}: robust validation accuracy "
            f"({policy.key}) did not improve for {policy.stale} validations; best "
            f"{policy.describe()} after epoch {policy.best_epoch}"
        )
        self.tracker.set_tags({"artplug.event.early_stop": self.early_stop})
        self.display.line(self.early_stop)


def _validates(c: Components, epochs_done: int, last_epoch: bool) -> bool:
    """Whether the epoch just done is validated (``eval.every_epochs``).

    The last epoch is validated only when it can become the selected checkpoint; otherwise the
    final evaluation on the test split follows right away.
    """
    every = c.recipe.eval.every_epochs
    if not every:
        return False
    if last_epoch:
        return c.recipe.eval.select == "best"
    return epochs_done % every == 0


def fit(
    c: Components,
    tracker: Tracker | None = None,
    *,
    run_dir: Path | None = None,
    display: Display | None = None,
    resume_from: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    stop: StopRequest | None = None,
) -> Training:
    """Train ``c`` as its recipe says: validate, checkpoint and log every epoch.

    ``max_steps`` stops early after that many optimizer steps (smoke tests). The run folder gets
    the resolved recipe, ``checkpoint-last.pt`` after every epoch, ``checkpoint-best.pt``
    whenever validation improves and ``metrics.jsonl``; all of it survives a crash or Ctrl-C.
    Training ends after ``run.epochs``, at an early stop (``eval.early_stop_patience``) or at
    the catastrophic-overfitting stop (which restores ``checkpoint-good.pt``). Every epoch logs
    its training cost (``cost/*``, :class:`~artplug.costs.CostLedger`). The final evaluation,
    ``eval.json``, the plots and model logging are the workflow's
    (:func:`artplug.workflows.train_and_evaluate`); the returned :class:`Training` holds what
    they need, and its :attr:`Training.log` is still open for them.

    Divergence: a logging window with a non-finite loss, or non-finite weights at an epoch's
    end, raises :class:`~artplug.errors.DivergenceError` naming the step, the loss terms and
    the last good checkpoint (``run.on_nonfinite = "stop"``), or with ``"rollback"`` restores
    that checkpoint, halves the learning rate and goes on, at most ``run.max_rollbacks``
    times. Nothing non-finite is ever checkpointed, validated or selected.

    Interruption: once ``stop`` is requested (a signal, :mod:`artplug.interrupt`), training
    ends at the next step boundary, ``checkpoint-last.pt`` records the position inside the
    epoch (and the RNG, meter and cost state of that step), and
    :class:`~artplug.interrupt.RunInterrupted` is raised. ``resume_from`` such a checkpoint
    continues with the next batch of the same seeded epoch order: bit-identical weights to an
    uninterrupted run. A resumed run drops the lines of ``metrics.jsonl`` logged after its
    checkpoint and does not send the tracker again what it already holds for those steps.
    """
    tracker = tracker if tracker is not None else NullTracker()
    display = display if display is not None else Display(enabled=False)
    recipe, settings = c.recipe, c.recipe.eval
    run_dir = run_dir if run_dir is not None else make_run_dir(recipe)
    t = Training(c, tracker, display, run_dir, resume_from)  # resumes from the checkpoint
    watch = OverfitWatch(c) if settings.overfit_check != "off" else None
    stopping = (lambda: stop.requested) if stop is not None else (lambda: False)
    try:
        # Signals only set `stop`; the loop looks at it between steps.
        with stop.deferred() if stop is not None else contextlib.nullcontext():
            while t.epoch < recipe.run.epochs:
                t.start_epoch()
                try:
                    with t.counter.watching(c.model):
                        t.step = train_epoch(
                            c,
                            t.epoch,
                            t.step,
                            meter=t.meter,
                            on_window=t.on_window,
                            max_steps=max_steps,
                            counter=t.counter,
                            skip=t.skip,  # batches a mid-epoch checkpoint already did
                            stop=stop,
                        )
                    t.check_finite()  # nothing non-finite is ever checkpointed
                except DivergenceError as exc:
                    if t.roll_back(exc):
                        continue  # the same epoch again, from the last good checkpoint
                    raise t.diverged(exc) from None
                seconds, position = t.end_epoch()
                if stopping():
                    assert stop is not None
                    raise t.interrupted(stop, position, seconds)
                summary = t.windows.summary()
                summary["time/epoch_s"] = seconds
                summary["epoch"] = float(t.epoch + 1)
                summary.update(
                    t.ledger.record_epoch(t.epoch + 1, t.counter, seconds, peak_memory_mb(c.device))
                )
                finished = max_steps is not None and t.step >= max_steps
                improved = False
                if _validates(c, t.epoch + 1, t.epoch + 1 == recipe.run.epochs or finished):
                    val = _evaluate(c, "val", settings.attacks, settings.n_examples, display)
                    summary.update({f"val/{k}_acc": v for k, v in val.items()})
                    improved = bool(val) and t.policy.update(val, t.epoch + 1)
                t.log(summary, t.step)
                t.history.append(summary)
                t.epoch += 1
                t.save(improved)
                line = f"{_epoch_line(summary, recipe.run.epochs)}  {t.timing(max_steps)}"
                display.line(line + ("  (best so far)" if improved else ""))
                if watch is not None and t.watch_overfit(watch):
                    break  # the last healthy epoch is restored for the final evaluation
                if t.policy.exhausted:
                    t.stop_early()
                    break
                if finished:
                    t.truncated = t.epoch < recipe.run.epochs  # `resume` may continue it
                    break
                if stopping():
                    break
        if stopping():
            # Asked to stop during an epoch's validation: that epoch's checkpoint is written.
            display.line(f"stopping after epoch {t.epoch}; checkpoint: {t.checkpoint_path}")
            raise stop.interrupted(t.checkpoint_path, t.step)  # type: ignore[union-attr]
    except BaseException:
        t.log.close()
        raise
    return t


def _truncate_metrics(path: Path, step: int) -> set[tuple[int, str]]:
    """Drop the lines of ``metrics.jsonl`` logged after ``step``; return the (step, key) pairs.

    A line cut short by a kill (not valid JSON) is dropped too. The file is replaced
    atomically, so a crash here leaves the old one.
    """
    if not path.is_file():
        return set()
    kept: list[str] = []
    dropped: set[tuple[int, str]] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            at = int(record["step"])
        except (ValueError, TypeError, KeyError):
            continue
        if at <= step:
            kept.append(line)
        else:
            dropped.update((at, key) for key in record if key != "step")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped


def _prepare_resumed_folder(
    run_dir: Path, recipe: ResolvedRecipe, step: int, display: Display
) -> set[tuple[int, str]]:
    """Make a run folder ready to continue from the checkpoint at ``step``; destroy nothing.

    ``metrics.jsonl`` keeps only the lines up to ``step`` (the replay logs the rest again; the
    dropped (step, key) pairs are returned). An ``eval.json`` left by a ``--max-steps`` smoke
    run and a ``recipe.resolved.toml`` that ``--set`` changes are moved aside with the step in
    their name instead of being overwritten.
    """
    dropped = _truncate_metrics(run_dir / "metrics.jsonl", step)
    report = run_dir / "eval.json"
    if report.exists():
        aside = run_dir / f"eval.step-{step}.json"
        os.replace(report, aside)
        display.line(f"the earlier evaluation is kept as {aside}")
    recipe_path = run_dir / "recipe.resolved.toml"
    if recipe_path.exists() and recipe_path.read_text(encoding="utf-8") != recipe.to_toml():
        aside = run_dir / f"recipe.resolved.step-{step}.toml"
        os.replace(recipe_path, aside)
        display.line(f"the recipe changed; the earlier one is kept as {aside}")
    return dropped


def _epoch_line(summary: Mapping[str, float], epochs: int) -> str:
    parts = [f"epoch {int(summary['epoch'])}/{epochs}"]
    if "epoch/train_loss" in summary:
        parts.append(f"loss {summary['epoch/train_loss']:.4f}")
    if "epoch/train_adv_acc" in summary:
        parts.append(f"train adv acc {100 * summary['epoch/train_adv_acc']:.1f}%")
    for key, value in summary.items():
        if key.startswith("val/"):
            parts.append(f"{key} {100 * value:.1f}%")
    parts.append(f"{summary['time/epoch_s']:.1f}s")
    if not math.isfinite(summary.get("epoch/train_loss", 0.0)):
        parts.append("(loss is not finite: lower optim.lr?)")
    return "  ".join(parts)


def start_tracking(c: Components, tracker: Tracker, plugin_versions: Mapping[str, str]) -> None:
    """Open the tracked run: params (flattened resolved recipe), tags, the recipe artifact.

    The run's description (``mlflow.note.content``) says what runs: techniques, dataset,
    threat, epochs; :func:`artplug.workflows.finish` adds the test results at the end.
    """
    from artplug.tracking import NOTE_TAG, creation_note, provenance_tags, run_description

    tracker.start()
    tracker.log_params(flatten(c.recipe.to_dict()))
    device_name = str(c.device)
    tags = provenance_tags(device=device_name, plugins=plugin_versions)
    tags["artplug.techniques"] = c.recipe.summary()
    tags["artplug.recipe"] = c.recipe.source
    threat = c.eval_threat
    tags[NOTE_TAG] = run_description(
        c.recipe, eval_norm=threat.norm, eval_eps=threat.eps, note=creation_note(tracker)
    )
    tracker.set_tags(tags)
