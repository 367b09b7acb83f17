"""How much does artplug's engine cost over a hand-written PGD-AT loop, and how does ART compare?

Times the same PGD adversarial-training work three ways in one process:

1. ``artplug``: components built from a recipe dict by the public core
   (:func:`artplug.plugins.load_plugins`, :func:`artplug.recipe.resolve`,
   :func:`artplug.engine.build`), trained with :func:`artplug.engine.train_epoch` and its metric
   meter, exactly as ``engine.fit`` runs an epoch (evaluation and checkpoints excluded);
2. ``hand-written``: a minimal PyTorch loop a competent researcher would write;
3. ``ART``: ``AdversarialTrainerMadryPGD`` on a ``PyTorchClassifier``.

All three start from the same weights, see the same data, batch size, number of batches per
epoch, eps, step size, attack steps, optimizer and attack-time model mode (eval for the attack,
train for the update). After one untimed warm-up epoch each, ``--repeats`` runs per contender
are timed, interleaved epoch by epoch (A1 B1 C1 A2 B2 C2 ...) so that machine noise is shared;
each run starts again from the common weights, and the ratios are taken from the median times.

Usage::

    python benchmarks/overhead.py [--epochs N] [--batch-size B] [--steps K] [--repeats R]
        [--device auto|cpu|cuda] [--model small-cnn|preact-resnet18] [--dataset digits]
        [--profile]

The exit code is 0 whatever the ratios (this is a measurement, not a test); 2 only when the
setup cannot run at all (``--device cuda`` without CUDA, a dataset that is not on disk).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import NOISY_SPREAD, load_average, noisy_contenders, synchronize, timed
from torch import Tensor, nn

from artplug import engine
from artplug.data import DATASETS
from artplug.errors import ArtplugError
from artplug.models import ARCHITECTURES, build_model
from artplug.plugins import load_plugins
from artplug.recipe import resolve

TARGET_RATIO = 1.05
"""The goal for median artplug time / median hand-written time on CPU."""


@dataclass(frozen=True)
class Settings:
    """The shared hyper-parameters: every contender trains with exactly these."""

    epochs: int
    batch_size: int
    steps: int
    repeats: int
    device: str
    model: str
    dataset: str
    eps: float = 0.1
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    @property
    def step_size(self) -> float:
        """PGD step: the usual ``2.5 * eps / steps``, passed explicitly to all three."""
        return 2.5 * self.eps / self.steps


def parse_args(argv: list[str] | None = None) -> tuple[Settings, bool]:
    """Read the command line into :class:`Settings` and the ``--profile`` flag."""
    parser = argparse.ArgumentParser(
        description="Time PGD adversarial training: artplug vs a hand-written loop vs ART.",
    )
    parser.add_argument("--epochs", type=int, default=8, help="timed epochs per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="PGD attack steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--model", choices=ARCHITECTURES, default="small-cnn")
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile one artplug epoch and print the top functions",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    settings = Settings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        steps=args.steps,
        repeats=args.repeats,
        device=args.device,
        model=args.model,
        dataset=args.dataset,
    )
    return settings, args.profile


# ------------------------------------------------------------------------------------------
# Shared helpers


def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    """Clean accuracy of ``model`` on ``(x, y)`` (untimed sanity check that it trained)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = 0
        for start in range(0, len(x), 512):
            xb = x[start : start + 512].to(device)
            yb = y[start : start + 512].to(device)
            correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def reset_weights(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Tensor],
    optim_state: dict[str, Any],
    seed: int,
) -> None:
    """Put a contender back at the common starting point before each run.

    Loading the never-stepped optimizer state clears the momentum buffers; reseeding makes the
    random starts and shuffles of every run draw from the same stream.
    """
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)
    model.train()
    torch.manual_seed(seed)
    np.random.seed(seed)


# ------------------------------------------------------------------------------------------
# Contender 1: artplug's engine


def artplug_recipe(s: Settings) -> dict[str, Any]:
    """The raw recipe dict (the shape of ``artplug.testing.digits_recipe``) for ``s``."""
    return {
        # log_every is left at its default (20): the periodic host sync is part of the cost.
        "run": {
            "name": "overhead-benchmark",
            "epochs": s.epochs,
            "seed": s.seed,
            "device": s.device,
            # fp32 and NCHW everywhere: the hand-written loop and ART run neither bf16 autocast
            # nor channels_last, which artplug turns on by default on CUDA.
            "amp": "off",
            "channels_last": "off",
        },
        "data": {"dataset": s.dataset, "batch_size": s.batch_size, "augment": "off"},
        "model": {"arch": s.model},
        "optim": {
            "name": "sgd",
            "lr": s.lr,
            "momentum": s.momentum,
            "nesterov": False,
            "weight_decay": s.weight_decay,
        },
        "threat": {"norm": "linf", "eps": s.eps},
        "perturbation": {
            "use": "pgd",
            "steps": s.steps,
            "step_size": s.step_size,
            "random_start": True,
            "restarts": 1,
            "model_mode": "eval",
        },
        "loss": [{"use": "cross-entropy"}],
        "schedule": [],  # constant LR, so the hand-written loop can be identical
        "eval": {"every_epochs": 0, "attacks": ["clean"], "final_attacks": ["clean"]},
        "tracking": {"backend": "none"},
    }


class ArtplugContender:
    """artplug's engine: ``train_epoch`` with its meter, as ``engine.fit`` calls it."""

    name = "artplug"

    def __init__(self, s: Settings) -> None:
        plugins = load_plugins(disabled=())
        recipe = resolve(artplug_recipe(s), plugins.registries, source="<benchmark>")
        self.c = engine.build(recipe)
        self.seed = s.seed
        # The common starting point of all three contenders.
        self.model_state = copy.deepcopy(self.c.model.state_dict())
        self.optim_state = copy.deepcopy(self.c.optimizer.state_dict())
        self.meter = engine._Meter(self.c.device, [slot.id for slot in self.c.losses])
        self.step = 0

    @property
    def model(self) -> nn.Module:
        """The trained module."""
        return self.c.model

    def reset(self) -> None:
        """Back to the initial weights and an empty optimizer state."""
        reset_weights(self.c.model, self.c.optimizer, self.model_state, self.optim_state, self.seed)
        # engine.fit keeps one meter and a global step counter for the whole run.
        self.meter = engine._Meter(self.c.device, [slot.id for slot in self.c.losses])
        self.step = 0

    def run_epoch(self, epoch: int) -> None:
        """One epoch of the engine's loop, as ``engine.fit`` runs it (no eval, no checkpoint)."""
        self.step = engine.train_epoch(
            self.c, epoch, self.step, meter=self.meter, on_window=_ignore_window
        )


def _ignore_window(window: dict[str, float], step: int) -> None:
    """The benchmark's logging sink: the window is computed (host sync included), then dropped."""


# ------------------------------------------------------------------------------------------
# Contender 2: a minimal hand-written PyTorch loop (no artplug inside)


def pgd_linf(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, steps: int
) -> Tensor:
    """L-inf PGD from a uniform random start: ``steps`` sign steps, projection, clamp."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        # Gradient w.r.t. the input only: the parameters' .grad is not computed.
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def handwritten_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    batches_per_epoch: int,
    eps: float,
    step_size: float,
    steps: int,
) -> None:
    """PGD adversarial training on device-resident ``(x, y)``: the reference loop."""
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, device=x.device)
        for i in range(batches_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            model.eval()
            x_adv = pgd_linf(model, xb, yb, eps, step_size, steps)
            model.train()
            loss = F.cross_entropy(model(x_adv), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


class HandWrittenContender:
    """The reference: :func:`handwritten_train` on its own copy of the model."""

    name = "hand-written"

    def __init__(self, s: Settings, ref: ArtplugContender) -> None:
        c = ref.c
        self.s = s
        self.device = c.device
        self.model = _same_model(s, ref).to(self.device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
        )
        self.model_state = ref.model_state
        self.optim_state = copy.deepcopy(self.optimizer.state_dict())
        # The same device-resident tensors the engine's loader draws from.
        self.x, self.y = c.train_loader.x, c.train_loader.y
        self.batches_per_epoch = len(c.train_loader)

    def reset(self) -> None:
        """Back to the initial weights and an empty optimizer state."""
        reset_weights(self.model, self.optimizer, self.model_state, self.optim_state, self.s.seed)

    def run_epoch(self, epoch: int) -> None:
        """One epoch of the hand-written loop."""
        s = self.s
        handwritten_train(
            self.model,
            self.optimizer,
            self.x,
            self.y,
            epochs=1,
            batch_size=s.batch_size,
            batches_per_epoch=self.batches_per_epoch,
            eps=s.eps,
            step_size=s.step_size,
            steps=s.steps,
        )


def _same_model(s: Settings, ref: ArtplugContender) -> nn.Module:
    """A fresh ``build_model`` of the same architecture, loaded with artplug's initial weights."""
    data = ref.c.data
    channels, height, _ = data.input_shape
    model = build_model(
        s.model,
        in_channels=channels,
        num_classes=data.num_classes,
        image_size=height,
        mean=data.mean,
        std=data.std,
    )
    model.load_state_dict(ref.model_state)
    return model


# ------------------------------------------------------------------------------------------
# Contender 3: ART's AdversarialTrainerMadryPGD


class ARTContender:
    """``AdversarialTrainerMadryPGD`` with its inner PGD batch set to the training batch size."""

    name = "ART"

    def __init__(self, s: Settings, ref: ArtplugContender) -> None:
        from art.defences.trainer import AdversarialTrainerMadryPGD
        from art.estimators.classification import PyTorchClassifier

        c = ref.c
        self.s = s
        self.device = c.device
        self.model = _same_model(s, ref)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
        )
        self.model_state = ref.model_state
        self.optim_state = copy.deepcopy(self.optimizer.state_dict())
        self.classifier = PyTorchClassifier(
            model=self.model,
            loss=nn.CrossEntropyLoss(),
            optimizer=self.optimizer,
            input_shape=c.data.input_shape,
            nb_classes=c.data.num_classes,
            clip_values=(0.0, 1.0),
            device_type="gpu" if self.device.type == "cuda" else "cpu",
        )
        self.trainer = AdversarialTrainerMadryPGD(
            self.classifier,
            nb_epochs=s.epochs,
            batch_size=s.batch_size,
            eps=s.eps,
            eps_step=s.step_size,
            max_iter=s.steps,
            num_random_init=1,
        )
        # The inner PGD would otherwise cut each training batch into attack batches of 32.
        self.trainer.attack.set_params(batch_size=s.batch_size, verbose=False)
        # ART never drops a last partial batch; giving it exactly batches_per_epoch * B
        # examples makes it do the engine's number of batches and examples per epoch.
        x, y = c.data.train
        keep = min(len(x), len(c.train_loader) * s.batch_size)
        # .cpu(): the synthetic dataset is generated on the training device.
        self.x_np = x[:keep].cpu().numpy()
        self.y_np = y[:keep].cpu().numpy()

    def reset(self) -> None:
        """Back to the initial weights and an empty optimizer state."""
        reset_weights(self.model, self.optimizer, self.model_state, self.optim_state, self.s.seed)

    def run_epoch(self, epoch: int) -> None:
        """``trainer.fit`` for one epoch on the numpy training split, progress bars silenced."""
        # ART's epoch bar ignores verbose=False; writing it to a sink costs next to nothing.
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            self.trainer.fit(self.x_np, self.y_np, nb_epochs=1, batch_size=self.s.batch_size)


ART_NOT_ALIGNED = (
    "ART: every attack step also computes parameter gradients (loss.backward, not autograd.grad)",
    "ART: PGD.generate adds 2 eval forward passes per batch (clean + adversarial success rate)",
    "ART: numpy round trips per batch (generate and fit take numpy), data copied to the device "
    "per batch, and classifier.fit reshuffles each batch through a DataLoader",
    "ART: random start drawn in numpy on the host; model.eval()/train() flipped on every "
    "attack step rather than once per batch (same modes, more calls)",
    "ART: cannot drop a partial batch, so it gets the first batches/epoch x B training "
    "examples; the other two drop a different random remainder each epoch (same counts)",
    "artplug's CUDA defaults (bf16 autocast, channels_last) are off here: the others have neither",
)


# ------------------------------------------------------------------------------------------
# Timing


Contender = ArtplugContender | HandWrittenContender | ARTContender


def timed_runs(contenders: list[Contender], epochs: int, device: torch.device) -> list[list[float]]:
    """One run of ``epochs`` epochs per contender from the common start; epoch seconds of each.

    The runs are interleaved epoch by epoch (A1 B1 C1 A2 B2 C2 ...): a burst of load from
    another process then lands on all three at a scale of ~1 s instead of on one whole run.
    """
    for contender in contenders:
        contender.reset()
    seconds: list[list[float]] = [[] for _ in contenders]
    for epoch in range(epochs):
        for index, contender in enumerate(contenders):
            # Epoch ``epoch`` of ``contender``, continuing from its current state.
            seconds[index].append(timed(device, contender.run_epoch, epoch)[0])
    return seconds


def paired_ratio(epochs: list[list[float]], reference: list[list[float]]) -> float:
    """Median over all timed epochs of ``epoch time / the reference's adjacent epoch time``.

    Neighbouring epochs share the machine's state of the moment, so this ratio shrugs off slow
    drifts and most bursts; it is a cross-check of the ratio of medians, not a replacement.
    """
    return statistics.median(
        mine / ref
        for run, ref_run in zip(epochs, reference, strict=True)
        for mine, ref in zip(run, ref_run, strict=True)
    )


def profile_artplug(contender: ArtplugContender) -> None:
    """cProfile one artplug epoch and print where the Python time goes."""
    contender.reset()
    profiler = cProfile.Profile()
    profiler.enable()
    contender.run_epoch(0)
    synchronize(contender.c.device)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime")
    stats.print_stats(25)
    print("\ncProfile of one artplug epoch (sorted by own time):")
    print(out.getvalue())


def _fmt_row(cells: list[str], widths: list[int]) -> str:
    """One table row: the name left-aligned, the numbers right-aligned."""
    return "  ".join(
        cell.rjust(w) if i else cell.ljust(w)
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; 0 whatever the ratios, 2 for an unusable setup."""
    s, want_profile = parse_args(argv)
    # ART warns about its own internals (e.g. deprecated torch calls); not our measurement.
    warnings.filterwarnings("ignore", module=r"art(\.|$)")

    try:
        artplug_c = ArtplugContender(s)
    except ArtplugError as exc:  # e.g. --device cuda without CUDA, a dataset not on disk
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = artplug_c.c.device
    contenders: list[Contender] = [
        artplug_c,
        HandWrittenContender(s, artplug_c),
        ARTContender(s, artplug_c),
    ]
    batches = len(artplug_c.c.train_loader)
    examples_per_epoch = batches * s.batch_size
    n_train = len(artplug_c.c.data.train[0])

    print("artplug overhead benchmark: PGD adversarial training, same work three ways")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"  python {platform.python_version()}  torch {torch.__version__}  "
        f"device {device} ({device_name})  cpus {os.cpu_count()}  "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"  model {s.model}  dataset {s.dataset} ({n_train} train)  batch {s.batch_size} x "
        f"{batches} batches/epoch  epochs {s.epochs}  repeats {s.repeats}"
    )
    print(
        f"  PGD linf eps {s.eps:g}  step {s.step_size:g}  steps {s.steps}  random start  "
        f"attack in eval mode, update in train mode"
    )
    print(
        f"  SGD lr {s.lr:g} momentum {s.momentum:g} weight_decay {s.weight_decay:g}  "
        f"constant LR  artplug log_every {artplug_c.c.recipe.run.log_every}"
    )
    print(f"  load average before warm-up: {load_average()}")

    # Warm-up: one untimed epoch each (torch lazy init, ART's first-call costs, allocator).
    timed_runs(contenders, 1, device)

    # epoch_times[name][run][epoch]; a run's time is the sum of its epochs.
    epoch_times: dict[str, list[list[float]]] = {c.name: [] for c in contenders}
    for _ in range(s.repeats):
        for contender, seconds in zip(
            contenders, timed_runs(contenders, s.epochs, device), strict=True
        ):
            epoch_times[contender.name].append(seconds)
    times = {name: [sum(run) for run in runs] for name, runs in epoch_times.items()}

    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians[HandWrittenContender.name]
    x_test, y_test = artplug_c.c.data.test
    headers = [
        "contender",
        "median s",
        "s/epoch",
        "examples/s",
        "vs hand",
        "min s",
        "runs (s)",
        "test acc",
    ]
    rows = []
    for contender in contenders:
        median = medians[contender.name]
        rows.append(
            [
                contender.name,
                f"{median:.3f}",
                f"{median / s.epochs:.3f}",
                f"{examples_per_epoch * s.epochs / median:.0f}",
                f"{median / reference:.3f}",
                f"{min(times[contender.name]):.3f}",
                " ".join(f"{t:.2f}" for t in times[contender.name]),
                f"{100 * clean_accuracy(contender.model, x_test, y_test, device):.1f}%",
            ]
        )
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    print()
    print(_fmt_row(headers, widths))
    for row in rows:
        print(_fmt_row(row, widths))
    print(f"load average after the runs: {load_average()}")
    noisy = noisy_contenders(times)
    if noisy:
        print(
            f"NOTE: runs of {', '.join(noisy)} differ by more than {NOISY_SPREAD:g}x: another "
            "process is probably using the CPU; rerun on an idle machine or with more --repeats"
        )
    print("\nnot aligned (ART's extra work is part of what ART costs):")
    for note in ART_NOT_ALIGNED:
        print(f"  - {note}")

    artplug_ratio = medians[ArtplugContender.name] / reference
    art_ratio = medians[ARTContender.name] / reference
    print()
    if artplug_ratio > TARGET_RATIO:
        print(f"WARNING: above target: artplug/hand-written {artplug_ratio:.3f} > {TARGET_RATIO}")
    hand_epochs = epoch_times[HandWrittenContender.name]
    pairs = s.repeats * s.epochs
    print(
        f"cross-check, median of {pairs} adjacent-epoch ratios: artplug/hand-written "
        f"{paired_ratio(epoch_times[ArtplugContender.name], hand_epochs):.3f}  "
        f"ART/hand-written {paired_ratio(epoch_times[ARTContender.name], hand_epochs):.3f}"
    )
    print(
        f"artplug/hand-written = {artplug_ratio:.2f} (target <= {TARGET_RATIO})  "
        f"ART/hand-written = {art_ratio:.2f}"
    )
    if want_profile:
        profile_artplug(artplug_c)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
