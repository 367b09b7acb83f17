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
import json
import math
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
from artplug.errors import ArtplugError, CheckpointError
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
    """Accuracies on a seeded subset of ``split``; the test split also gets ``worst``."""
    from artplug.evaluate import evaluate

    x, y = getattr(c.data, split)
    if len(x) == 0:  # e.g. data.val_size = 0: nothing to validate on
        return {}
    x, y = _subset(x, y, n, c.recipe.run.seed)

    def announce(name: str) -> None:
        display.status(f"  evaluating {split}: {name} on {len(x)} examples")

    run = evaluate_with_worst if split == "test" else evaluate
    return run(
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
    ckpt.restore_rng_states(payload["rng"])
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


def evaluate_test(c: Components, display: Display | None = None) -> dict[str, float]:
    """``eval.final_attacks`` (plus ``worst``) on the seeded ``eval.test_examples`` test subset."""
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


def train_epoch(
    c: Components,
    epoch: int,
    step: int,
    *,
    meter: _Meter | None = None,
    on_window: Callable[[dict[str, float], int], None] | None = None,
    max_steps: int | None = None,
    counter: PassCounter | None = None,
) -> int:
    """Run the optimizer steps of one epoch, starting at global step ``step``; return the next.

    With a ``meter``, every ``run.log_every`` steps (and at the epoch's end) the running sums
    are read in one host sync and handed to ``on_window(metrics, step)``, together with the
    learning rate (``train/lr``) and the knobs the schedules set for that step (``knob/*``).
    With a ``counter``, the training examples drawn are added to ``counter.examples`` (the
    caller attaches it to the model with :meth:`PassCounter.watching`).
    """
    steps_per_epoch = len(c.train_loader)
    total_steps = steps_per_epoch * c.recipe.run.epochs
    log_every = c.recipe.run.log_every
    if meter is not None:
        meter.reset()
    for x, y in _batches(c, epoch):
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
        if max_steps is not None and step >= max_steps:
            break
    return step


class OverfitWatch:
    """Catastrophic-overfitting detection (Wong et al. 2020, FastAT).

    After every epoch it attacks a fixed set of training examples with ``fgsm`` and ``pgd-20``
    from the attack table. Catastrophic overfitting shows as PGD accuracy collapsing (dropping
    by more than ``eval.overfit_drop``, absolute, from the previous epoch) while FGSM accuracy
    does not fall: the model has learnt to defeat the single-step attack only.
    """

    ATTACKS = ("fgsm", "pgd-20")

    def __init__(self, c: Components) -> None:
        self.c = c
        settings = c.recipe.eval
        self.drop = settings.overfit_drop
        x, y = c.data.train
        # A fixed seeded subset, the same every epoch, so the accuracies are comparable.
        self.x, self.y = _subset(x, y, settings.overfit_examples, c.recipe.run.seed + 1)
        self.previous: dict[str, float] | None = None

    def check(self, epoch: int) -> tuple[dict[str, float], str | None]:
        """Return the epoch's metrics and, on a collapse, a one-line description of it."""
        from artplug.evaluate import evaluate

        c = self.c
        accuracy = evaluate(
            c.model,
            self.x,
            self.y,
            c.threat,
            self.ATTACKS,
            batch_size=c.recipe.eval.batch_size,
            seed=c.recipe.run.seed,
            device=c.device,
        )
        pgd, fgsm = accuracy["pgd-20"], accuracy["fgsm"]
        metrics = {"overfit/pgd-20_acc": pgd, "overfit/fgsm_acc": fgsm}
        event = None
        before = self.previous
        if before is not None and pgd < before["pgd-20"] - self.drop and fgsm >= before["fgsm"]:
            event = (
                f"catastrophic overfitting at epoch {epoch}: PGD-20 accuracy on "
                f"{len(self.x)} training examples fell {100 * before['pgd-20']:.1f}% -> "
                f"{100 * pgd:.1f}% while FGSM accuracy went {100 * before['fgsm']:.1f}% -> "
                f"{100 * fgsm:.1f}%"
            )
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
    """
    tracker = tracker if tracker is not None else NullTracker()
    display = display if display is not None else Display(enabled=False)
    recipe = c.recipe
    settings = recipe.eval
    run_dir = run_dir if run_dir is not None else make_run_dir(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    recipe_path = run_dir / "recipe.resolved.toml"
    recipe_path.write_text(recipe.to_toml(), encoding="utf-8")
    tracker.log_artifact(recipe_path)
    metrics_log = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")

    steps_per_epoch = len(c.train_loader)
    start_epoch, step = 0, 0
    policy = CheckpointPolicy(settings.attacks, settings.early_stop_patience)
    ledger = CostLedger(c.device)
    if resume_from is not None:
        start_epoch, step = restore(c, resume_from, "checkpoint")
        policy.load_state_dict(resume_from.get("selection"))
        ledger.load_state_dict(resume_from.get("cost"))
    meter = _Meter(c.device, [slot.id for slot in c.losses])
    counter = PassCounter()
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

    watch = OverfitWatch(c) if settings.overfit_check != "off" else None
    good_path = run_dir / GOOD_CHECKPOINT_NAME
    best_path = run_dir / BEST_CHECKPOINT_NAME
    used_checkpoint = CHECKPOINT_NAME
    used_epoch = 0
    overfit_event: str | None = None
    early_stop: str | None = None
    plots_drawn = False

    try:
        for epoch in range(start_epoch, recipe.run.epochs):
            windows.start(epoch)
            counter.reset()
            reset_peak_memory(c.device)
            epoch_started = time.perf_counter()
            with counter.watching(c.model):
                step = train_epoch(
                    c,
                    epoch,
                    step,
                    meter=meter,
                    on_window=on_window,
                    max_steps=max_steps,
                    counter=counter,
                )
            if c.device.type == "cuda":
                # The step never syncs; kernels still queued belong to this epoch's time.
                torch.cuda.synchronize(c.device)
            epoch_time = time.perf_counter() - epoch_started
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
            epochs_done = epoch + 1
            payload = _checkpoint_payload(c, epochs_done, step, tracker.run_id)
            payload["selection"] = policy.state_dict()
            payload["cost"] = ledger.state_dict()
            ckpt.save_atomic(payload, checkpoint_path)
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
                break

        # Drawn before the final evaluation, so that a failure there still leaves them.
        plots_drawn = True
        write_plots(run_dir, recipe.run.name, tracker, display)
        used_checkpoint, used_epoch, reason = _choose_checkpoint(
            c, policy, best_path, used_checkpoint, used_epoch, epochs_done
        )
        display.line(f"final evaluation on {used_checkpoint} (epoch {used_epoch}): {reason}")
        final = evaluate_test(c, display)
        wall = time.perf_counter() - started
        results: dict[str, Any] = {
            "split": "test",
            "n_examples": min(len(c.data.test[0]), settings.test_examples or len(c.data.test[0])),
            "threat": {"norm": recipe.threat.norm, "eps": recipe.threat.eps},
            "accuracy": final,
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
        )
    except BaseException:
        if not plots_drawn:
            # The curves of a failed or interrupted run are what explains it.
            write_plots(run_dir, recipe.run.name, tracker, display)
        raise
    finally:
        metrics_log.close()


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
    x, y = c.data.test
    return _subset(x, y, n, c.recipe.run.seed)


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
            c.threat,
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
    report: dict[str, Any] = {"attack": attack, "norm": c.threat.norm, "n_examples": len(x)}
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
            mark_eps=c.threat.eps,
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
