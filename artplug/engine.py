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
import json
import math
import random
import re
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
from artplug.data import BatchLoader, DatasetSplits, load_dataset
from artplug.display import Display
from artplug.errors import ArtplugError, CheckpointError
from artplug.kinds import LossTerm, Outputs, Perturbation, Progress, Schedule, StepState, Threat
from artplug.models import build_model
from artplug.recipe import ResolvedRecipe
from artplug.tracking import NullTracker, Tracker, flatten

CHECKPOINT_NAME = "checkpoint-last.pt"


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

    @property
    def threat(self) -> Threat:
        """The recipe's threat model (full eps)."""
        return self.recipe.threat.threat()


def _amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ArtplugError(f'run.amp = {setting!r} needs a CUDA device; use amp = "auto"')
    # bf16 needs no loss scaling and has fp32's range, so it is the default on CUDA.
    return torch.float16 if setting == "fp16" else torch.bfloat16


def build(recipe: ResolvedRecipe, *, device: torch.device | None = None) -> Components:
    """Instantiate data, model (with transforms), optimizer and techniques for ``recipe``."""
    device = device if device is not None else select_device(recipe.run.device)
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
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    augment = recipe.data.augment == "on" or (recipe.data.augment == "auto" and height >= 32)
    train_loader = BatchLoader(
        *data.train,
        batch_size=recipe.data.batch_size,
        shuffle=True,
        drop_last=len(data.train[0]) > recipe.data.batch_size,
        augment=augment,
        # Horizontal flips change the meaning of digits (SVHN house numbers too).
        flip=recipe.data.dataset not in ("svhn", "digits"),
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


def _build_optimizer(recipe: ResolvedRecipe, model: nn.Module) -> torch.optim.Optimizer:
    optim = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
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
    """What a finished (or interrupted) run leaves behind."""

    run_dir: Path
    final: dict[str, float]
    history: list[dict[str, float]]
    wall_time_s: float
    epochs_done: int
    checkpoint: Path


def make_run_dir(recipe: ResolvedRecipe) -> Path:
    """A fresh folder ``<out_dir>/<run name>-<timestamp>`` for the run's files."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe.run.name).strip("-") or "run"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(recipe.run.out_dir) / f"{slug}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def _subset(x: Tensor, y: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    if n is None or n >= len(x):
        return x, y
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(x), generator=generator)[:n].sort().values
    return x[index], y[index]


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
            x_adv = perturbation.generate(model, x, y, state)
            model.train()
            if after_backward is not None:
                x_adv.requires_grad_(True)
            logits_clean = model(x) if needs_clean else None
            logits_adv = model(x_adv) if needs_adv else None
            out = Outputs(x, y, x_adv, logits_clean, logits_adv)
            parts = [slot.term(out, state) for slot in c.losses]
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
    from artplug.evaluate import evaluate

    x, y = getattr(c.data, split)
    if len(x) == 0:  # e.g. data.val_size = 0: nothing to validate on
        return {}
    x, y = _subset(x, y, n, c.recipe.run.seed)

    def announce(name: str) -> None:
        display.status(f"  evaluating {split}: {name} on {len(x)} examples")

    return evaluate(
        c.model,
        x,
        y,
        c.threat,
        attacks,
        batch_size=c.recipe.eval.batch_size,
        seed=c.recipe.run.seed,
        device=c.device,
        on_attack=announce,
    )


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
    try:
        c.model.load_state_dict(payload["model"])
        c.optimizer.load_state_dict(payload["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{source}: does not match this recipe's model ({first})") from None
    if c.scaler is not None and payload.get("scaler"):
        c.scaler.load_state_dict(payload["scaler"])
    load_state = getattr(c.perturbation, "load_state_dict", None)
    if callable(load_state) and payload.get("perturbation") is not None:
        load_state(payload["perturbation"])
    ckpt.restore_rng_states(payload["rng"])
    return int(payload["epoch"]), int(payload["step"])


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


def train_epoch(
    c: Components,
    epoch: int,
    step: int,
    *,
    meter: _Meter | None = None,
    on_window: Callable[[dict[str, float], int], None] | None = None,
    max_steps: int | None = None,
) -> int:
    """Run the optimizer steps of one epoch, starting at global step ``step``; return the next.

    With a ``meter``, every ``run.log_every`` steps (and at the epoch's end) the running sums
    are read in one host sync and handed to ``on_window(metrics, step)``.
    """
    steps_per_epoch = len(c.train_loader)
    total_steps = steps_per_epoch * c.recipe.run.epochs
    log_every = c.recipe.run.log_every
    if meter is not None:
        meter.reset()
    for x, y in _batches(c, epoch):
        knobs = train_step(c, x, y, Progress(epoch, step, steps_per_epoch, total_steps), meter)
        step += 1
        if meter is not None and (step % log_every == 0 or step % steps_per_epoch == 0):
            window = meter.read()
            meter.reset()
            window["train/lr"] = c.optimizer.param_groups[0]["lr"]
            window.update({f"knob/{k}": v for k, v in knobs.items()})
            if on_window is not None:
                on_window(window, step)
        if max_steps is not None and step >= max_steps:
            break
    return step


def fit(
    c: Components,
    tracker: Tracker | None = None,
    *,
    run_dir: Path | None = None,
    display: Display | None = None,
    resume_from: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
) -> RunResult:
    """Train ``c`` as its recipe says, evaluate, checkpoint, and report to ``tracker``.

    ``max_steps`` stops early after that many optimizer steps (smoke tests). The run folder gets
    the resolved recipe, ``checkpoint-last.pt`` after every epoch, ``metrics.jsonl`` and
    ``eval.json``; all of it survives a crash or Ctrl-C.
    """
    tracker = tracker if tracker is not None else NullTracker()
    display = display if display is not None else Display(enabled=False)
    recipe = c.recipe
    run_dir = run_dir if run_dir is not None else make_run_dir(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    recipe_path = run_dir / "recipe.resolved.toml"
    recipe_path.write_text(recipe.to_toml(), encoding="utf-8")
    tracker.log_artifact(recipe_path)
    metrics_log = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")

    steps_per_epoch = len(c.train_loader)
    start_epoch, step = 0, 0
    if resume_from is not None:
        start_epoch, step = restore(c, resume_from, "checkpoint")
    meter = _Meter(c.device, [slot.id for slot in c.losses])
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    epochs_done = start_epoch

    def log(metrics: Mapping[str, float], at_step: int) -> None:
        tracker.log_metrics(metrics, step=at_step)
        metrics_log.write(json.dumps({"step": at_step, **metrics}) + "\n")
        metrics_log.flush()

    windows = _EpochWindows()

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

    try:
        for epoch in range(start_epoch, recipe.run.epochs):
            epoch_started = time.perf_counter()
            windows.start(epoch)
            step = train_epoch(
                c, epoch, step, meter=meter, on_window=on_window, max_steps=max_steps
            )
            epoch_time = time.perf_counter() - epoch_started
            summary = windows.summary()
            summary["time/epoch_s"] = epoch_time
            summary["epoch"] = float(epoch + 1)
            finished = max_steps is not None and step >= max_steps
            last_epoch = epoch + 1 == recipe.run.epochs or finished
            every = recipe.eval.every_epochs
            if every and (epoch + 1) % every == 0 and not last_epoch:
                val = _evaluate(c, "val", recipe.eval.attacks, recipe.eval.n_examples, display)
                summary.update({f"val/{k}_acc": v for k, v in val.items()})
            log(summary, step)
            history.append(summary)
            epochs_done = epoch + 1
            ckpt.save_atomic(
                _checkpoint_payload(c, epochs_done, step, tracker.run_id), checkpoint_path
            )
            display.line(_epoch_line(summary, recipe.run.epochs))
            if finished:
                break

        final = _evaluate(c, "test", recipe.eval.final_attacks, recipe.eval.test_examples, display)
        wall = time.perf_counter() - started
        results = {
            "split": "test",
            "n_examples": min(
                len(c.data.test[0]), recipe.eval.test_examples or len(c.data.test[0])
            ),
            "threat": {"norm": recipe.threat.norm, "eps": recipe.threat.eps},
            "accuracy": final,
            "epochs": epochs_done,
            "wall_time_s": wall,
            "checkpoint": CHECKPOINT_NAME,
        }
        eval_path = run_dir / "eval.json"
        eval_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        log({f"test/{k}_acc": v for k, v in final.items()} | {"time/wall_s": wall}, step)
        tracker.log_artifact(eval_path)
        tracker.log_artifact(checkpoint_path, artifact_path="checkpoints")
        tracker.log_artifact(run_dir / "metrics.jsonl")
        return RunResult(run_dir, final, history, wall, epochs_done, checkpoint_path)
    finally:
        metrics_log.close()


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
