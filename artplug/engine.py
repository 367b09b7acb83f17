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
    every eval.every_epochs epochs and at the end: ART evaluation; a checkpoint every epoch

Data stays on the device, and nothing inside the step calls ``.item()`` or ``.cpu()``: the
running sums are device tensors read only at the logging cadence.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
import traceback
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
from artplug import phase
from artplug.data import BatchLoader, DatasetSplits, load_dataset
from artplug.display import Display
from artplug.errors import ArtplugError, CheckpointError, DivergenceError, PluginError
from artplug.interrupt import StopRequest
from artplug.kinds import LossTerm, Outputs, Perturbation, Progress, Schedule, StepState, Threat
from artplug.models import build_model
from artplug.recipe import ResolvedRecipe
from artplug.sanity import CheckResult
from artplug.tracking import NullTracker, Tracker, flatten

CHECKPOINT_NAME = "checkpoint-last.pt"
GOOD_CHECKPOINT_NAME = "checkpoint-good.pt"
BEST_CHECKPOINT_NAME = "checkpoint-best.pt"


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
    """Instantiate data, model (with transforms), optimizer and techniques for ``recipe``."""
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
    )
    channels, height, _ = data.input_shape
    model = build_model(
        recipe.model.arch,
        in_channels=channels,
        num_classes=data.num_classes,
        image_size=height,
        mean=data.mean,
        std=data.std,
        depth=recipe.model.depth,
        width=recipe.model.width,
        dropout=recipe.model.dropout,
    )
    # Transforms run on CPU before .to(device) and before the optimizer exists, so that any
    # parameters they add are moved and trained like the others.
    for spec in recipe.transforms:
        model = spec.build().apply(model)
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
    )
    return Components(
        recipe=recipe,
        device=device,
        data=data,
        model=model,
        optimizer=optimizer,
        perturbation=recipe.perturbation.build(),
        losses=[LossSlot(s.id, s.build(), s.weight) for s in recipe.losses],
        schedules=[s.build() for s in recipe.schedules],
        train_loader=train_loader,
        amp_dtype=amp_dtype,
        scaler=scaler,
        channels_last=channels_last,
        base_lrs=[group["lr"] for group in optimizer.param_groups],
    )


NO_WEIGHT_DECAY = "artplug_no_weight_decay"
"""Attribute a transform sets to ``True`` on a parameter that ``[optim] weight_decay`` must skip."""


def _build_optimizer(recipe: ResolvedRecipe, model: nn.Module) -> torch.optim.Optimizer:
    optim = recipe.optim
    trained = [p for p in model.parameters() if p.requires_grad]
    # Parameters flagged by a transform (e.g. SmoothReLU's b) get no weight decay: decay would
    # pull such a shape parameter towards a different function, not towards small weights.
    exempt = [p for p in trained if getattr(p, NO_WEIGHT_DECAY, False)]
    decayed = [p for p in trained if not getattr(p, NO_WEIGHT_DECAY, False)]
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
    # Knobs travel as floats; an integer parameter (e.g. attack steps) gets a rounded int.
    if isinstance(current, bool):
        return bool(value)
    if isinstance(current, int):
        return round(value)
    return value


def _update_params(technique: Any, updates: Mapping[str, float]) -> None:
    params = technique.params
    changed = {
        name: _coerce_like(getattr(params, name), value)
        for name, value in updates.items()
        if getattr(params, name) != value
    }
    if changed:
        # Params are frozen pydantic models: swap in an updated copy instead of mutating.
        technique.params = params.model_copy(update=changed)


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


@dataclass
class RunResult:
    """What a finished (or interrupted) run leaves behind.

    ``checkpoint`` is the last epoch's checkpoint (what ``resume`` continues from);
    ``used_checkpoint`` and ``used_epoch`` name the one the final evaluation ran on. ``report``
    is the content of ``eval.json``; ``sanity`` the gate's results (``None`` when it did not run);
    ``cost`` the training cost (``eval.json``'s ``cost`` entry, see :class:`CostLedger`).
    ``rollbacks`` lists the rollbacks ``run.on_nonfinite = "rollback"`` made (each a dict:
    ``step``, ``terms``, ``to_step``, ``lr_multiplier``) and ``lr_multiplier`` is the factor
    they left on the learning rate (``0.5 ** len(rollbacks)``). ``training_complete`` is false
    when ``max_steps`` cut training short of the recipe's epochs (``resume`` may continue it).
    """

    run_dir: Path
    final: dict[str, float]
    history: list[dict[str, float]]
    wall_time_s: float
    epochs_done: int
    checkpoint: Path
    used_checkpoint: str = CHECKPOINT_NAME
    used_epoch: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    sanity: list[CheckResult] | None = None
    cost: dict[str, Any] = field(default_factory=dict)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    lr_multiplier: float = 1.0
    training_complete: bool = True


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

    def read(self) -> dict[str, float]:
        sums = self.sums.tolist()  # the one host sync of the logging window
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
        sums = self.sums.tolist()
        keys = ["train/loss"] + [f"train/loss.{term_id}" for term_id in self.term_ids]
        values = [sums[0], *sums[3:]]
        return [key for key, value in zip(keys, values, strict=True) if not math.isfinite(value)]

    def state_dict(self) -> dict[str, Any]:
        """The unread window as plain data, for a checkpoint written between two reads."""
        return {"sums": self.sums.tolist(), "elapsed_s": time.perf_counter() - self.started}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Undo :meth:`state_dict`: the next read covers the restored steps too."""
        sums = [float(v) for v in state["sums"]]
        if len(sums) != 3 + len(self.term_ids):
            raise CheckpointError(
                f"the checkpoint's running loss sums have {len(sums) - 3} terms, the recipe "
                f"{len(self.term_ids)}"
            )
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
    after_backward = getattr(perturbation, "after_backward", None)
    needs_clean = any("clean" in slot.term.needs for slot in c.losses)
    needs_adv = any("adv" in slot.term.needs for slot in c.losses)
    autocast = (
        torch.autocast(c.device.type, dtype=c.amp_dtype)
        if c.amp_dtype is not None
        else contextlib.nullcontext()
    )
    for replay in range(getattr(perturbation, "replays", 1)):
        state = StepState(progress, knobs, model, threat, replay)
        with autocast:
            model.train(attack_train_mode)
            with phase.running("attack"):
                x_adv = perturbation.generate(model, x, y, state)
            model.train()
            if after_backward is not None:
                x_adv.requires_grad_(True)
            # The phases tell transforms which pass this is (artplug/phase.py): a latent
            # perturbation site perturbs only the update's forward of x_adv.
            with phase.running("update-clean"):
                logits_clean = model(x) if needs_clean else None
            with phase.running("update-adv"):
                logits_adv = model(x_adv) if needs_adv else None
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
        if after_backward is not None:
            after_backward(x_adv.grad, state)
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

    def announce(name: str) -> None:
        display.status(f"  evaluating {split}: {name} on {len(x)} examples")

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
        on_attack=announce,
    )


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
    )
    # The keys are the requested entries without repeats, then "worst".
    if sum(name not in ("clean", "worst") for name in accuracies) < 2:
        accuracies.pop("worst", None)
    return accuracies


def _checkpoint_payload(c: Components, epoch: int, step: int, run_id: str | None) -> dict[str, Any]:
    state_dict = getattr(c.perturbation, "state_dict", None)
    return {
        "artplug_version": artplug.__version__,
        "recipe": c.recipe.to_dict(),
        "epoch": epoch,
        "step": step,
        "model": c.model.state_dict(),
        "optimizer": c.optimizer.state_dict(),
        "scaler": c.scaler.state_dict() if c.scaler is not None else None,
        "perturbation": state_dict() if callable(state_dict) else None,
        "rng": ckpt.rng_states(),
        "tracking_run_id": run_id,
    }


def restore(c: Components, payload: Mapping[str, Any], source: str) -> tuple[int, int]:
    """Load a checkpoint into built components; return (epochs done, steps done)."""
    load_weights(c, payload, source)
    _load_matching(c.optimizer.load_state_dict, payload, "optimizer", source)
    if c.scaler is not None and payload.get("scaler"):
        c.scaler.load_state_dict(payload["scaler"])
    load_state = getattr(c.perturbation, "load_state_dict", None)
    if callable(load_state) and payload.get("perturbation") is not None:
        load_state(payload["perturbation"])
    try:
        ckpt.restore_rng_states(payload["rng"])
    except (KeyError, TypeError, ValueError) as exc:
        # ckpt.load(purpose="resume") checks the states' shape; this covers hand-built payloads.
        raise CheckpointError(
            f"{source}: cannot restore the random generator states ({type(exc).__name__}: {exc})"
        ) from None
    return int(payload["epoch"]), int(payload["step"])


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


# ------------------------------------------------------------------------------------------
# Cost accounting


class PassCounter:
    """Counts the network passes of training steps, in example rows, from outside the step.

    A forward hook on the top-level model adds each forward's batch size to ``forward_rows``,
    and to ``attack_rows`` too when the forward runs inside ``Perturbation.generate`` (phase
    ``"attack"``). When the output requires grad, a tensor hook on it adds the same rows to
    ``backward_rows`` each time a gradient flows back through it: the weight update's
    ``loss.backward()`` and an attack's ``torch.autograd.grad`` alike, while a forward whose
    output no loss uses (or that ran under ``no_grad``) costs no backward. Forwards in phase
    ``"eval"`` (validation, evaluation, anything outside the training step) are not counted.
    ``examples`` is the number of training rows the step loop drew (``train_epoch`` adds them),
    once per minibatch however many FreeAT replays reuse it.

    Only the top-level model's passes count: a plugin that calls a submodule directly (part
    of the network) adds nothing. Nothing here reads a device tensor, so counting costs no
    host sync.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero every count."""
        self.examples = 0
        self.forward_rows = 0
        self.backward_rows = 0
        self.attack_rows = 0

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        """Count ``model``'s passes inside the ``with`` block (the hook is removed after)."""
        handle = model.register_forward_hook(self._on_forward)
        try:
            yield
        finally:
            handle.remove()

    def _on_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        current = phase.current_phase()
        if current == "eval" or not isinstance(output, Tensor) or output.dim() == 0:
            return
        rows = int(output.shape[0])
        self.forward_rows += rows
        if current == "attack":
            self.attack_rows += rows
        if output.requires_grad:
            # A tensor hook, not a module backward hook: module full-backward hooks wrap the
            # module's inputs and outputs and break in-place ops and torch.func transforms.
            output.register_hook(functools.partial(self._on_backward, rows))

    def _on_backward(self, rows: int, grad: Tensor) -> None:
        self.backward_rows += rows


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA ``device`` (process RSS has no reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory in MiB: CUDA memory allocated by tensors on a CUDA ``device`` since the last
    :func:`reset_peak_memory`, else the whole process's maximum resident set size since it
    started (it never goes down); ``None`` where neither can be read (no ``resource`` module).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


PEAK_MEMORY_SOURCES = {
    "cuda": "torch.cuda.max_memory_allocated, reset every epoch",
    "other": "process max resident set size (resource.getrusage), process-wide, since start",
}


class CostLedger:
    """The training cost of a run, epoch by epoch: metrics, run totals and ``eval.json``'s entry.

    Per epoch (:meth:`record_epoch`, logged at the epoch's last step):

    - ``cost/forward_per_example``, ``cost/backward_per_example``: full-network forward and
      backward passes (:class:`PassCounter` rows) divided by the epoch's training examples.
      PGD-k with cross-entropy on the adversarial batch costs ``k + 1`` of each;
    - ``cost/attack_steps``: forward passes inside the attack per minibatch, averaged over the
      epoch (attack rows / training examples; ``k`` for PGD-k, 0 without an attack);
    - ``cost/examples_per_s``, ``cost/epoch_s``: training throughput and time (the steps only;
      validation and checkpoints are not included);
    - ``cost/peak_memory_mb``: see :func:`peak_memory_mb` (omitted where it cannot be read).

    Run totals (:meth:`totals`): ``cost/total_forward_per_example`` and
    ``cost/total_backward_per_example`` (sums of the per-epoch values: the passes one training
    example went through over the whole run, on average) and ``cost/train_s`` (sum of
    ``cost/epoch_s``). The ledger travels in checkpoints, so a resumed run keeps its totals.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.epochs: list[dict[str, float]] = []

    def record_epoch(
        self, epoch: int, counter: PassCounter, seconds: float, peak_mb: float | None
    ) -> dict[str, float]:
        """Store epoch ``epoch`` (1-based) and return its ``cost/*`` metrics."""
        examples = counter.examples
        per_example = 1.0 / examples if examples else 0.0
        entry = {
            "epoch": float(epoch),
            "examples": float(examples),
            "forward_per_example": counter.forward_rows * per_example,
            "backward_per_example": counter.backward_rows * per_example,
            "attack_steps": counter.attack_rows * per_example,
            "examples_per_s": examples / seconds if seconds > 0 else 0.0,
            "epoch_s": seconds,
        }
        if peak_mb is not None:
            entry["peak_memory_mb"] = peak_mb
        # A resumed run re-trains the epoch after its last checkpoint: the new record wins.
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch] + [entry]
        return {f"cost/{k}": v for k, v in entry.items() if k not in ("epoch", "examples")}

    def totals(self) -> dict[str, float]:
        """The run totals as metrics (see the class docstring)."""
        return {
            "cost/total_forward_per_example": sum(e["forward_per_example"] for e in self.epochs),
            "cost/total_backward_per_example": sum(e["backward_per_example"] for e in self.epochs),
            "cost/train_s": sum(e["epoch_s"] for e in self.epochs),
        }

    def report(self) -> dict[str, Any]:
        """The ``cost`` entry of ``eval.json``: totals, peak memory and every epoch's record."""
        peaks = [e["peak_memory_mb"] for e in self.epochs if "peak_memory_mb" in e]
        source = "cuda" if self.device.type == "cuda" else "other"
        return {
            **{k.removeprefix("cost/"): v for k, v in self.totals().items()},
            "peak_memory_mb": max(peaks) if peaks else None,
            "peak_memory_source": PEAK_MEMORY_SOURCES[source],
            "epochs": self.state_dict(),
        }

    def state_dict(self) -> list[dict[str, float]]:
        """Plain data for checkpoints."""
        return [dict(e) for e in self.epochs]

    def load_state_dict(self, state: list[dict[str, float]] | None) -> None:
        """Undo :meth:`state_dict` (``None``: a checkpoint from before cost accounting)."""
        self.epochs = [dict(e) for e in state or []]


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


_COUNTS = ("examples", "forward_rows", "backward_rows", "attack_rows")


def _counter_state(counter: PassCounter) -> dict[str, int]:
    return {name: int(getattr(counter, name)) for name in _COUNTS}


def _load_counter(counter: PassCounter, state: Mapping[str, Any]) -> None:
    for name in _COUNTS:
        setattr(counter, name, int(state.get(name, 0)))


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


class OverfitWatch:
    """Catastrophic-overfitting detection (Wong et al. 2020, FastAT), after every epoch.

    ``eval.overfit_rule`` picks the rule; both compare with the last *healthy* epoch (a
    collapsed epoch never becomes the reference) and a drop must exceed ``eval.overfit_drop``
    (absolute accuracy; 0.2 by default, as in FastAT):

    ``"artplug"`` (default, the stricter rule)
        attack ``eval.overfit_examples`` fixed training examples with ``fgsm`` and ``pgd-20``
        from the attack table (eval mode). A collapse is PGD accuracy dropping by more than
        ``overfit_drop`` while FGSM accuracy does not fall: the model has learnt to defeat the
        single-step attack only. A PGD drop with FGSM falling too (a plain bad epoch) is not
        flagged. :meth:`artplug_collapse`.
    ``"fast-at"``
        what FastAT's ``train_fgsm.py --early-stop`` does: PGD-5 (step eps/4 = 2/255 at 8/255,
        one random start) on one training batch with the model in train mode
        (:func:`artplug.sanity.fast_at_pgd_accuracy`), and a collapse is that accuracy dropping
        by more than ``overfit_drop`` from the previous epoch's, which starts at 0 (so the first
        epoch never collapses). :meth:`fast_at_collapse`. The reference redraws its batch every
        epoch (the first batch of the shuffled, augmented loader) and lets the check move the
        BatchNorm running statistics; here the batch is fixed (``data.batch_size`` training
        examples from a seeded draw, not augmented), so epochs compare the same examples, and
        the check attacks a copy of the model, so training is not changed by it.
    """

    ATTACKS = ("fgsm", "pgd-20")
    FAST_AT_KEY = "pgd-5-train"
    """Metric key of the ``fast-at`` rule: ``overfit/pgd-5-train_acc``."""

    def __init__(self, c: Components) -> None:
        self.c = c
        settings = c.recipe.eval
        self.rule = settings.overfit_rule
        self.drop = settings.overfit_drop
        x, y = c.data.train
        # A fixed seeded subset, the same every epoch, so the accuracies are comparable.
        size = c.recipe.data.batch_size if self.rule == "fast-at" else settings.overfit_examples
        self.x, self.y = _subset(x, y, size, c.recipe.run.seed + 1)
        self.previous: dict[str, float] | None = None

    @staticmethod
    def artplug_collapse(
        before: Mapping[str, float] | None, now: Mapping[str, float], drop: float
    ) -> bool:
        """The ``artplug`` rule on ``{"fgsm": ..., "pgd-20": ...}`` accuracies.

        True when PGD-20 accuracy fell by more than ``drop`` from ``before`` (the last healthy
        epoch; ``None`` before the first) while FGSM accuracy did not fall.
        """
        if before is None:
            return False
        return now["pgd-20"] < before["pgd-20"] - drop and now["fgsm"] >= before["fgsm"]

    @staticmethod
    def fast_at_collapse(previous: float, now: float, drop: float) -> bool:
        """The ``fast-at`` rule: ``robust_acc - prev_robust_acc < -drop``, as FastAT writes it.

        ``previous`` is the last healthy epoch's PGD accuracy, 0 before the first epoch.
        """
        return now - previous < -drop

    def _measure(self) -> dict[str, float]:
        c = self.c
        if self.rule == "fast-at":
            from artplug.sanity import fast_at_pgd_accuracy

            pgd = fast_at_pgd_accuracy(
                c.model, self.x, self.y, c.threat, seed=c.recipe.run.seed, device=c.device
            )
            return {self.FAST_AT_KEY: pgd}
        from artplug.evaluate import evaluate

        return evaluate(
            c.model,
            self.x,
            self.y,
            c.threat,
            self.ATTACKS,
            batch_size=c.recipe.eval.batch_size,
            seed=c.recipe.run.seed,
            device=c.device,
        )

    def check(self, epoch: int) -> tuple[dict[str, float], str | None]:
        """Return the epoch's metrics and, on a collapse, a one-line description of it."""
        accuracy = self._measure()
        metrics = {f"overfit/{name}_acc": value for name, value in accuracy.items()}
        before = self.previous
        event = None
        if self.rule == "fast-at":
            previous = before[self.FAST_AT_KEY] if before is not None else 0.0
            pgd = accuracy[self.FAST_AT_KEY]
            if self.fast_at_collapse(previous, pgd, self.drop):
                event = (
                    f"catastrophic overfitting at epoch {epoch} (fast-at rule): PGD-5 accuracy "
                    f"on a fixed training batch of {len(self.x)} in train mode fell "
                    f"{100 * previous:.1f}% -> {100 * pgd:.1f}%"
                )
        elif before is not None and self.artplug_collapse(before, accuracy, self.drop):
            pgd, fgsm = accuracy["pgd-20"], accuracy["fgsm"]
            event = (
                f"catastrophic overfitting at epoch {epoch}: PGD-20 accuracy on "
                f"{len(self.x)} training examples fell {100 * before['pgd-20']:.1f}% -> "
                f"{100 * pgd:.1f}% while FGSM accuracy went {100 * before['fgsm']:.1f}% -> "
                f"{100 * fgsm:.1f}%"
            )
        if event is not None:
            metrics["overfit/detected"] = 1.0
        else:
            # Only a healthy epoch becomes the reference for the next comparison.
            self.previous = accuracy
        return metrics, event


class CheckpointPolicy:
    """Which validated epoch is the best one, and whether validation has stopped improving.

    A validation is scored by ``(robust accuracy, clean accuracy)``, compared in that order:
    robust accuracy under the first non-clean entry of ``eval.attacks`` (the clean accuracy
    when there is none), clean accuracy breaking ties. Only a strictly better score is a new
    best, so among equal scores the earliest epoch wins. ``stale`` counts the validations since
    the last improvement; with ``patience > 0`` the policy is :attr:`exhausted` when it reaches
    ``patience`` (early stopping against robust overfitting, Rice et al. 2020).
    """

    def __init__(self, attacks: list[str], patience: int = 0) -> None:
        robust = [name for name in attacks if name != "clean"]
        self.key = robust[0] if robust else "clean"
        self.patience = patience
        self.best_epoch: int | None = None
        self.best_score: tuple[float, float] | None = None
        self.stale = 0

    def update(self, val: Mapping[str, float], epoch: int) -> bool:
        """Record the validation accuracies of ``epoch``; True when it is the new best."""
        score = (val[self.key], val.get("clean", 0.0))
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.stale = score, epoch, 0
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        """True when ``patience`` validations in a row brought no improvement."""
        return self.patience > 0 and self.stale >= self.patience

    def describe(self) -> str:
        """The best score in words, e.g. ``val pgd-20 45.0% (clean 80.1%)``."""
        if self.best_score is None:
            return "no validation yet"
        robust, clean = self.best_score
        if self.key == "clean":
            return f"val clean {100 * robust:.1f}%"
        return f"val {self.key} {100 * robust:.1f}% (clean {100 * clean:.1f}%)"

    def state_dict(self) -> dict[str, Any]:
        """Plain data stored in every checkpoint, so that ``resume`` keeps the best so far."""
        score = list(self.best_score) if self.best_score is not None else None
        return {
            "key": self.key,
            "best_epoch": self.best_epoch,
            "best_score": score,
            "stale": self.stale,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Undo :meth:`state_dict`; a state scored on another attack is ignored."""
        if not state or state.get("key") != self.key or state.get("best_score") is None:
            return
        robust, clean = state["best_score"]
        self.best_score = (float(robust), float(clean))
        self.best_epoch = int(state["best_epoch"])
        self.stale = int(state.get("stale", 0))


def fit(
    c: Components,
    tracker: Tracker | None = None,
    *,
    run_dir: Path | None = None,
    display: Display | None = None,
    resume_from: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    stop: StopRequest | None = None,
) -> RunResult:
    """Train ``c`` as its recipe says, evaluate, checkpoint, and report to ``tracker``.

    ``max_steps`` stops early after that many optimizer steps (smoke tests). The run folder gets
    the resolved recipe, ``checkpoint-last.pt`` after every epoch, ``checkpoint-best.pt``
    whenever validation improves, ``metrics.jsonl`` and ``eval.json``; all of it survives a
    crash or Ctrl-C. After training the final evaluation runs on the checkpoint that
    ``eval.select`` picks (the catastrophic-overfitting stop, when it triggers, overrides it),
    then the sanity gate (``eval.sanity``) and the eps curve (``eval.eps_curve``).

    Every epoch also logs its training cost (``cost/*``, :class:`CostLedger`; the run totals
    are logged with the test metrics and written to ``eval.json``). When training ends (or
    fails) the training curves and schedules are drawn into ``plots/`` (:mod:`artplug.plots`)
    and logged; after the evaluation the model itself is logged with MLflow's PyTorch flavour
    when ``tracking.log_model`` is on and the tracker tracks (:func:`log_trained_model`).

    Divergence: a logging window with a non-finite loss, or non-finite weights at an epoch's
    end, raises :class:`~artplug.errors.DivergenceError` naming the step, the loss terms and
    the last good checkpoint (``run.on_nonfinite = "stop"``), or with ``"rollback"`` restores
    that checkpoint, halves the learning rate and goes on, at most ``run.max_rollbacks``
    times. Nothing non-finite is ever checkpointed, validated, selected or evaluated.

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
    recipe = c.recipe
    settings = recipe.eval
    run_dir = run_dir if run_dir is not None else make_run_dir(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    metrics_path = run_dir / "metrics.jsonl"
    recipe_path = run_dir / "recipe.resolved.toml"
    already_logged: set[tuple[int, str]] = set()
    if resume_from is not None:
        dropped = _prepare_resumed_folder(run_dir, recipe, int(resume_from["step"]), display)
        if tracker.run_id is not None and tracker.run_id == resume_from.get("tracking_run_id"):
            # The killed process sent these (step, metric) pairs to this very run already; the
            # replay computes the same values, and MLflow would keep both copies.
            already_logged = dropped
    recipe_path.write_text(recipe.to_toml(), encoding="utf-8")
    tracker.log_artifact(recipe_path)
    metrics_log = metrics_path.open("a", encoding="utf-8")

    steps_per_epoch = len(c.train_loader)
    policy = CheckpointPolicy(settings.attacks, settings.early_stop_patience)
    ledger = CostLedger(c.device)
    meter = _Meter(c.device, [slot.id for slot in c.losses])
    counter = PassCounter()
    windows = _EpochWindows()
    history: list[dict[str, float]] = []
    # The recipe's learning rates; rollbacks scale them (and so every lr schedule) for good.
    base_lrs = list(c.base_lrs)
    lr_multiplier = 1.0
    rollbacks: list[dict[str, Any]] = []
    epoch, step, skip, epoch_s_before = 0, 0, 0, 0.0

    def load_state(payload: Mapping[str, Any], source: str) -> None:
        """Continue from ``payload``: weights, optimizer, RNG, selection, cost and position."""
        nonlocal epoch, step, skip, epoch_s_before, lr_multiplier
        epoch, step = restore(c, payload, source)
        policy.load_state_dict(payload.get("selection"))
        ledger.load_state_dict(payload.get("cost"))
        lr_multiplier = float(payload.get("lr_multiplier", 1.0))
        c.base_lrs = [base * lr_multiplier for base in base_lrs]
        history[:] = [h for h in history if h["epoch"] <= epoch]
        partial = payload.get("partial_epoch")
        skip, epoch_s_before = 0, 0.0
        if partial:
            skip = int(partial["batch"])
            meter.load_state_dict(partial["meter"])
            windows.load_state_dict(partial["windows"])
            _load_counter(counter, partial["counter"])
            epoch_s_before = float(partial.get("epoch_s", 0.0))

    def payload_now(epochs_done: int, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        payload = _checkpoint_payload(c, epochs_done, step, tracker.run_id)
        payload["selection"] = policy.state_dict()
        payload["cost"] = ledger.state_dict()
        payload["lr_multiplier"] = lr_multiplier
        payload["rollbacks"] = [dict(r) for r in rollbacks]
        if partial is not None:
            payload["partial_epoch"] = partial
        return payload

    # The last state whose training was all finite: what a rollback returns to and what a
    # divergence error names. checkpoint-last.pt is written only after the finiteness checks,
    # so once this run wrote it, it is that state.
    initial_good: Mapping[str, Any] | None = None
    good_at: tuple[int, int] | None = None
    good_written = False
    if resume_from is not None:
        load_state(resume_from, "checkpoint")
        rollbacks.extend(dict(r) for r in resume_from.get("rollbacks") or [])
        initial_good, good_at = resume_from, (epoch, step)
        if not checkpoint_path.exists():
            # A fork starts in a new folder: give it its starting point, so that the folder
            # can be resumed or evaluated even before (or without) another epoch.
            ckpt.save_atomic({**resume_from, "tracking_run_id": tracker.run_id}, checkpoint_path)
            good_written = True
    elif recipe.run.on_nonfinite == "rollback":
        # Before the first checkpoint a rollback goes back to the start: keep a copy of it.
        initial_good = copy.deepcopy(payload_now(0))
    started = time.perf_counter()
    epochs_done = epoch

    def describe_good() -> str:
        if good_at is None:
            return "none (it diverged before the first checkpoint)"
        where = str(checkpoint_path) if checkpoint_path.exists() else "the starting checkpoint"
        return f"{where} (epoch {good_at[0]}, step {good_at[1]})"

    def roll_back(exc: DivergenceError) -> bool:
        """Restore the last good state with half the learning rate; False when not allowed."""
        nonlocal lr_multiplier, metrics_log
        if recipe.run.on_nonfinite != "rollback" or len(rollbacks) >= recipe.run.max_rollbacks:
            return False
        if good_written:
            payload: Mapping[str, Any] = ckpt.load(checkpoint_path, purpose="resume")
            source = str(checkpoint_path)
        else:
            assert initial_good is not None
            payload, source = initial_good, "the start of the run"
        multiplier = lr_multiplier * 0.5
        saved = float(payload.get("lr_multiplier", 1.0))
        load_state(payload, source)
        lr_multiplier = multiplier
        c.base_lrs = [base * multiplier for base in base_lrs]
        for group in c.optimizer.param_groups:
            # The restored lr carries the multiplier of its time; move it to the new one (a
            # schedule's lr_scale knob sets lr from base_lrs, which already has it).
            group["lr"] = group["lr"] * multiplier / saved
        rollbacks.append(
            {
                "step": exc.step,
                "terms": list(exc.terms),
                "to_step": step,
                "lr_multiplier": multiplier,
            }
        )
        # The replay from the restored step rewrites the curves after it.
        metrics_log.close()
        _truncate_metrics(metrics_path, step)
        metrics_log = metrics_path.open("a", encoding="utf-8")
        event = (
            f"{exc.one_line()}; rolled back to {source} (step {step}) with the learning rate "
            f"halved (x{multiplier:g}), rollback {len(rollbacks)} of {recipe.run.max_rollbacks}"
        )
        tracker.set_tags({f"artplug.event.rollback.{len(rollbacks)}": event})
        display.line(f"WARNING: {event}")
        return True

    def diverged(exc: DivergenceError) -> DivergenceError:
        """``exc`` with what the user needs: the last good checkpoint and what to change."""
        gave_up = ""
        if rollbacks:
            gave_up = (
                f"; gave up after {len(rollbacks)} rollbacks (learning rate x{lr_multiplier:g})"
            )
        hint = (
            'lower optim.lr or set run.on_nonfinite = "rollback"'
            if recipe.run.on_nonfinite == "stop"
            else "lower optim.lr or raise run.max_rollbacks"
        )
        message = f"{exc}{gave_up}; last good checkpoint: {describe_good()}; {hint}"
        tracker.set_tags({"artplug.event.divergence": message})
        return DivergenceError(
            message,
            step=exc.step,
            terms=exc.terms,
            checkpoint=str(checkpoint_path) if good_at is not None else None,
        )

    def check_finite() -> None:
        """The epoch-end guard: the window not logged yet, then the weights (two host syncs)."""
        bad = meter.nonfinite()
        if bad:
            first = _window_first_step(step, recipe.run.log_every, steps_per_epoch)
            raise DivergenceError(
                f"training diverged by step {step}: {_nonfinite_message(bad)} (steps "
                f"{first}-{step}, not logged yet)",
                step=step,
                terms=[k.removeprefix("train/loss.") for k in bad if k != "train/loss"],
            )
        if not model_is_finite(c.model):
            raise DivergenceError(
                f"training diverged by step {step}: the model's weights are not finite",
                step=step,
            )

    def log(metrics: Mapping[str, float], at_step: int) -> None:
        tracked = metrics
        if already_logged:
            tracked = {k: v for k, v in metrics.items() if (at_step, k) not in already_logged}
        if tracked:
            tracker.log_metrics(tracked, step=at_step)
        metrics_log.write(json.dumps({"step": at_step, **metrics}) + "\n")
        metrics_log.flush()

    def on_window(window: dict[str, float], at_step: int) -> None:
        log(window, at_step)
        windows.add(window)
        display.status(
            f"epoch {windows.epoch + 1}/{recipe.run.epochs} step "
            f"{at_step - windows.epoch * steps_per_epoch}/{steps_per_epoch} "
            f"loss {window['train/loss']:.4f} "
            f"adv_acc {100 * window['train/adv_acc']:.1f}% "
            f"{window['time/examples_per_s']:.0f} ex/s"
        )

    watch = OverfitWatch(c) if settings.overfit_check != "off" else None
    good_path = run_dir / GOOD_CHECKPOINT_NAME
    best_path = run_dir / BEST_CHECKPOINT_NAME
    used_checkpoint = CHECKPOINT_NAME
    used_epoch = 0
    overfit_event: str | None = None
    early_stop: str | None = None
    plots_drawn = False
    truncated = False

    try:
        with stop.deferred() if stop is not None else contextlib.nullcontext():
            while epoch < recipe.run.epochs:
                if skip == 0:
                    windows.start(epoch)
                    counter.reset()
                    epoch_s_before = 0.0
                reset_peak_memory(c.device)
                epoch_started = time.perf_counter()
                step_before = step
                try:
                    with counter.watching(c.model):
                        step = train_epoch(
                            c,
                            epoch,
                            step,
                            meter=meter,
                            on_window=on_window,
                            max_steps=max_steps,
                            counter=counter,
                            skip=skip,
                            stop=stop,
                        )
                    check_finite()
                except DivergenceError as exc:
                    if roll_back(exc):
                        continue
                    raise diverged(exc) from None
                if c.device.type == "cuda":
                    # The step never syncs; kernels still queued belong to this epoch's time.
                    torch.cuda.synchronize(c.device)
                epoch_time = epoch_s_before + time.perf_counter() - epoch_started
                position = skip + step - step_before
                skip = 0
                if stop is not None and stop.requested:
                    # A mid-epoch checkpoint: resume skips the `position` batches already done
                    # in the epoch's seeded order and carries on with the same RNG states.
                    partial = {
                        "batch": position,
                        "meter": meter.state_dict(),
                        "windows": windows.state_dict(),
                        "counter": _counter_state(counter),
                        "epoch_s": epoch_time,
                    }
                    ckpt.save_atomic(payload_now(epoch, partial), checkpoint_path)
                    display.line(
                        f"stopping after step {step} (epoch {epoch + 1}, batch {position}/"
                        f"{steps_per_epoch}); checkpoint written to {checkpoint_path}"
                    )
                    raise stop.interrupted(checkpoint_path, step)
                summary = windows.summary()
                summary["time/epoch_s"] = epoch_time
                summary["epoch"] = float(epoch + 1)
                summary.update(
                    ledger.record_epoch(epoch + 1, counter, epoch_time, peak_memory_mb(c.device))
                )
                finished = max_steps is not None and step >= max_steps
                last_epoch = epoch + 1 == recipe.run.epochs or finished
                every = settings.every_epochs
                # The last epoch is validated only when it can become the selected checkpoint;
                # otherwise the final evaluation on the test split follows right away.
                validate = bool(every) and (
                    (not last_epoch and (epoch + 1) % every == 0)
                    or (last_epoch and settings.select == "best")
                )
                improved = False
                if validate:
                    val = _evaluate(c, "val", settings.attacks, settings.n_examples, display)
                    summary.update({f"val/{k}_acc": v for k, v in val.items()})
                    if val:
                        improved = policy.update(val, epoch + 1)
                log(summary, step)
                history.append(summary)
                epoch += 1
                epochs_done = epoch
                payload = payload_now(epochs_done)
                ckpt.save_atomic(payload, checkpoint_path)
                good_written, good_at = True, (epochs_done, step)
                if improved:
                    ckpt.save_atomic(payload, best_path)
                del payload
                line = _epoch_line(summary, recipe.run.epochs)
                display.line(line + ("  (best so far)" if improved else ""))
                if watch is not None:
                    metrics, event = watch.check(epochs_done)
                    log(metrics, step)
                    if event is None:
                        shutil.copyfile(checkpoint_path, good_path)
                    elif overfit_event is None:
                        overfit_event = event
                        tracker.set_tags({"artplug.event.catastrophic_overfitting": event})
                        display.line(f"WARNING: {event}")
                        if settings.overfit_check == "stop" and good_path.exists():
                            good = ckpt.load(good_path)
                            c.model.load_state_dict(good["model"])
                            used_checkpoint, used_epoch = GOOD_CHECKPOINT_NAME, int(good["epoch"])
                            display.line(
                                f"stopping; restored {GOOD_CHECKPOINT_NAME} (after epoch "
                                f"{good['epoch']}) for the final evaluation"
                            )
                            break
                if policy.exhausted:
                    early_stop = (
                        f"early stop after epoch {epochs_done}: robust validation accuracy "
                        f"({policy.key}) did not improve for {policy.stale} validations; best "
                        f"{policy.describe()} after epoch {policy.best_epoch}"
                    )
                    tracker.set_tags({"artplug.event.early_stop": early_stop})
                    display.line(early_stop)
                    break
                if finished:
                    truncated = epochs_done < recipe.run.epochs
                    break
                if stop is not None and stop.requested:
                    break
        if stop is not None and stop.requested:
            # Asked to stop during an epoch's validation: that epoch's checkpoint is written.
            display.line(f"stopping after epoch {epochs_done}; checkpoint: {checkpoint_path}")
            raise stop.interrupted(checkpoint_path, step)

        # Drawn before the final evaluation, so that a failure there still leaves them.
        plots_drawn = True
        write_plots(run_dir, recipe.run.name, tracker, display)
        used_checkpoint, used_epoch, reason = _choose_checkpoint(
            c, policy, best_path, used_checkpoint, used_epoch, epochs_done
        )
        if not model_is_finite(c.model):
            # Cannot happen through the checks above; a NaN model must never be evaluated,
            # reported or logged all the same.
            raise DivergenceError(
                f"{used_checkpoint} (epoch {used_epoch}) has non-finite weights; it is not "
                "evaluated",
                step=step,
            )
        display.line(f"final evaluation on {used_checkpoint} (epoch {used_epoch}): {reason}")
        final = evaluate_test(c, display)
        wall = time.perf_counter() - started
        results: dict[str, Any] = {
            "split": "test",
            **final_report_fields(c, final),
            "epochs": epochs_done,
            "wall_time_s": wall,
            "checkpoint": used_checkpoint,
            "checkpoint_epoch": used_epoch,
            "checkpoint_reason": reason,
            "best_checkpoint": (
                {
                    "file": BEST_CHECKPOINT_NAME,
                    "epoch": policy.best_epoch,
                    "metric": policy.key,
                    "val_accuracy": policy.best_score[0],
                    "val_clean_accuracy": policy.best_score[1],
                }
                if policy.best_score is not None and best_path.exists()
                else None
            ),
            "early_stop": early_stop,
            "catastrophic_overfitting": overfit_event,
            "cost": ledger.report(),
            # False when --max-steps cut training short: `artplug resume` may continue it.
            "training_complete": not truncated,
            "rollbacks": [dict(r) for r in rollbacks],
            "lr_multiplier": lr_multiplier,
        }
        eval_path = run_dir / "eval.json"
        _write_json(eval_path, results)
        log(
            {f"test/{k}_acc": v for k, v in final.items()}
            | {"time/wall_s": wall}
            | ledger.totals(),
            step,
        )
        tracker.set_tags(
            {
                "artplug.checkpoint.used": used_checkpoint,
                "artplug.checkpoint.epoch": str(used_epoch),
            }
        )
        sanity: list[CheckResult] | None = None
        if settings.sanity:
            sanity, results["sanity"] = run_gate(c, tracker, display, log, step)
            _write_json(eval_path, results)
        if settings.eps_curve:
            results["eps_curve"] = run_eps_curve(c, run_dir, tracker, display, log, step)
            _write_json(eval_path, results)
        if recipe.tracking.log_model and tracker.run_id is not None:
            results["mlflow_model"] = log_trained_model(c, tracker, display)
            _write_json(eval_path, results)
        tracker.log_artifact(eval_path)
        tracker.log_artifact(checkpoint_path, artifact_path="checkpoints")
        if best_path.exists():
            tracker.log_artifact(best_path, artifact_path="checkpoints")
        if used_checkpoint == GOOD_CHECKPOINT_NAME:
            tracker.log_artifact(good_path, artifact_path="checkpoints")
        tracker.log_artifact(run_dir / "metrics.jsonl")
        return RunResult(
            run_dir,
            final,
            history,
            wall,
            epochs_done,
            checkpoint_path,
            used_checkpoint=used_checkpoint,
            used_epoch=used_epoch,
            report=results,
            sanity=sanity,
            cost=results["cost"],
            rollbacks=results["rollbacks"],
            lr_multiplier=lr_multiplier,
            training_complete=not truncated,
        )
    except BaseException:
        if not plots_drawn:
            # The curves of a failed or interrupted run are what explains it.
            write_plots(run_dir, recipe.run.name, tracker, display)
        raise
    finally:
        metrics_log.close()


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


def write_plots(run_dir: Path, name: str, tracker: Tracker, display: Display) -> list[Path]:
    """Draw the run's plots from its ``metrics.jsonl`` into ``plots/``, then log that folder.

    The PNGs land in the run folder first, so they exist even when tracking is off or broken.
    Plotting is a convenience: any failure is reported (stderr, a WARNING line) and the run
    goes on.
    """
    from artplug import plots

    try:
        drawn = plots.plot_run(
            plots.read_metrics(run_dir / plots.METRICS_FILE), run_dir / plots.PLOTS_DIR, name=name
        )
    except ImportError as exc:
        display.line(f"WARNING: no plots: matplotlib is needed for them ({exc})")
        return []
    except Exception as exc:
        traceback.print_exc()
        display.line(f"WARNING: the run's plots could not be drawn ({type(exc).__name__}: {exc})")
        return []
    if drawn:
        tracker.log_artifact(run_dir / plots.PLOTS_DIR, artifact_path=plots.PLOTS_DIR)
    return drawn


# Rows of the test split that go with a logged model to infer its input/output signature.
MODEL_SAMPLE_ROWS = 8


def exportable_model(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` in eval mode and the default memory format, ready to pickle."""
    exported = copy.deepcopy(model).to("cpu")
    return exported.to(memory_format=torch.contiguous_format).eval()


def log_trained_model(c: Components, tracker: Tracker, display: Display) -> str | None:
    """Log ``c.model`` (as it is now) with the tracker's :meth:`~Tracker.log_model`.

    The logged module is a CPU copy in eval mode: what ``mlflow.pytorch.load_model`` gives back
    is a classifier that takes float32 NCHW batches in [0, 1] (normalisation is inside the
    model) and returns logits. Its signature comes from the first test images. The classes of
    its modules must be importable where it is loaded (artplug, and ``artplug_plugins`` or the
    third-party plugin packages whose transforms changed the network).
    """
    # A tracker written before log_model joined the protocol simply logs no model.
    log_model = getattr(tracker, "log_model", None)
    if log_model is None:
        return None
    model = exportable_model(c.model)
    sample = c.data.test[0][:MODEL_SAMPLE_ROWS].detach().to("cpu", torch.float32).contiguous()
    uri: str | None = log_model(model, sample, requirements=[f"artplug=={artplug.__version__}"])
    if uri is not None:
        display.line(f"model logged to MLflow: mlflow.pytorch.load_model({uri!r})")
    return uri


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _choose_checkpoint(
    c: Components,
    policy: CheckpointPolicy,
    best_path: Path,
    used: str,
    used_epoch: int,
    epochs_done: int,
) -> tuple[str, int, str]:
    """Load the checkpoint the final evaluation uses into ``c.model``; (file, epoch, reason)."""
    if used == GOOD_CHECKPOINT_NAME:
        # The catastrophic-overfitting stop already restored the last healthy epoch.
        return (
            used,
            used_epoch,
            (
                "the catastrophic-overfitting stop restored the last good checkpoint "
                "(this takes precedence over eval.select)"
            ),
        )
    if c.recipe.eval.select == "last":
        return CHECKPOINT_NAME, epochs_done, "eval.select = 'last'"
    if policy.best_epoch is None:
        return (
            CHECKPOINT_NAME,
            epochs_done,
            (
                "eval.select = 'best' but no validation ran (eval.every_epochs = 0 or an empty "
                "validation split), so the last checkpoint is used"
            ),
        )
    if not best_path.exists():
        return (
            CHECKPOINT_NAME,
            epochs_done,
            (
                f"eval.select = 'best' but {BEST_CHECKPOINT_NAME} is missing from the run folder, "
                "so the last checkpoint is used"
            ),
        )
    if policy.best_epoch != epochs_done:
        c.model.load_state_dict(ckpt.load(best_path)["model"])
    return (
        BEST_CHECKPOINT_NAME,
        policy.best_epoch,
        (f"best robust validation accuracy, {policy.describe()}"),
    )


def _test_subset(c: Components, n: int | None) -> tuple[Tensor, Tensor]:
    """The first ``n`` test examples in order: the gate and the curve see a prefix of the
    examples the final evaluation attacked."""
    x, y = c.data.test
    return _first(x, y, n)


def run_gate(
    c: Components,
    tracker: Tracker,
    display: Display,
    log: Callable[[Mapping[str, float], int], None],
    step: int,
) -> tuple[list[CheckResult] | None, dict[str, Any]]:
    """Run the gate on the model as it is now; log, tag and announce its results.

    A failed check marks the run (tags, a WARNING line, ``eval.json``) and nothing more. An
    exception inside the gate is a bug, but the trained model and its evaluation matter more:
    its traceback goes to stderr, the run is tagged ``artplug.sanity = ERROR: ...`` and goes on.
    """
    from artplug import sanity as gate

    settings = c.recipe.eval
    limit = min(settings.sanity_examples, settings.test_examples or settings.sanity_examples)
    x, y = _test_subset(c, limit)
    try:
        results = gate.run_sanity_gate(
            c.model,
            x,
            y,
            c.eval_threat,
            batch_size=settings.batch_size,
            seed=c.recipe.run.seed,
            device=c.device,
            tolerance=settings.sanity_tolerance,
            black_box=settings.sanity_black_box,
            on_check=lambda name: display.status(f"  sanity gate: {name} on {len(x)} examples"),
        )
    except Exception as exc:
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        tracker.set_tags({"artplug.sanity": f"ERROR: {message}"})
        display.line(f"WARNING: the sanity gate could not run ({message})")
        return None, {"passed": None, "summary": f"ERROR: {message}", "error": message}
    log(gate.gate_metrics(results), step)
    tracker.set_tags(gate.gate_tags(results))
    summary = gate.gate_summary(results)
    display.line(
        f"sanity gate: {summary}" if summary == "passed" else f"WARNING: sanity gate {summary}"
    )
    return results, gate.gate_report(results, len(x), settings.sanity_tolerance)


def run_eps_curve(
    c: Components,
    run_dir: Path,
    tracker: Tracker,
    display: Display,
    log: Callable[[Mapping[str, float], int], None],
    step: int,
) -> dict[str, Any]:
    """Robust accuracy at every ``eval.eps_curve`` radius: metrics, ``eps_curve.png``, points."""
    from artplug import curves

    settings = c.recipe.eval
    x, y = _test_subset(c, settings.eps_curve_examples or settings.test_examples)
    attack = curves.DEFAULT_ATTACK
    report: dict[str, Any] = {"attack": attack, "norm": c.eval_threat.norm, "n_examples": len(x)}
    try:
        points = curves.robust_accuracy_curve(
            c.model,
            x,
            y,
            c.threat,
            settings.eps_curve,
            attack=attack,
            batch_size=settings.batch_size,
            seed=c.recipe.run.seed,
            device=c.device,
            on_point=lambda eps: display.status(f"  eps curve: {attack} at eps={eps:.4g}"),
        )
    except Exception as exc:
        traceback.print_exc()
        report["error"] = f"{type(exc).__name__}: {exc}"
        display.line(f"WARNING: the eps curve could not be computed ({report['error']})")
        return report
    report["points"] = [[eps, accuracy] for eps, accuracy in points]
    log(curves.curve_metrics(points, attack), step)
    display.line(
        f"eps curve ({attack}): "
        + ", ".join(f"{eps:.4g}: {100 * accuracy:.1f}%" for eps, accuracy in points)
    )
    plot = run_dir / curves.PLOT_NAME
    try:
        curves.plot_curve(
            points,
            plot,
            title=f"{c.recipe.run.name}: {attack} accuracy vs {c.threat.norm} eps "
            f"({len(x)} test examples)",
            attack=attack,
            mark_eps=c.eval_threat.eps,
        )
    except ImportError as exc:
        report["plot"] = None
        report["plot_error"] = f"matplotlib is needed for the plot ({exc})"
        display.line(f"WARNING: no {curves.PLOT_NAME}: {report['plot_error']}")
        return report
    report["plot"] = curves.PLOT_NAME
    tracker.log_artifact(plot)
    return report


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
    """Open the tracked run: params (flattened resolved recipe), tags, the recipe artifact."""
    from artplug.tracking import provenance_tags

    tracker.start()
    tracker.log_params(flatten(c.recipe.to_dict()))
    device_name = str(c.device)
    tags = provenance_tags(device=device_name, plugins=plugin_versions)
    tags["artplug.techniques"] = c.recipe.summary()
    tags["artplug.recipe"] = c.recipe.source
    tracker.set_tags(tags)
