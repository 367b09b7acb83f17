"""How much does evaluating through ART cost over a hand-written PGD-20 loop?

Trains a small digits model for a few epochs of PGD adversarial training through artplug's
engine (components built from a recipe dict by :func:`artplug.recipe.resolve` and
:func:`artplug.engine.build`, epochs run by :func:`artplug.engine.train_epoch`), then times the
robust accuracy of that model on the digits test split two ways:

1. ``artplug``: :func:`artplug.evaluate.evaluate` with the ``pgd-20`` entry of the attack table
   (ART's ``ProjectedGradientDescentPyTorch`` on a ``PyTorchClassifier``), everything included:
   wrapping the model, the clean pass, the attack, ART's own extra passes and the scoring pass;
2. ``hand-written``: a minimal PyTorch loop: the clean pass, then L-inf PGD with 20 steps of
   eps/4 from one uniform random start, ``torch.autograd.grad`` on the input, model in eval
   mode, and a scoring pass.

Both attack only the examples the model classifies correctly (robust accuracy), in the same
batches of ``--batch-size``. The hand-written loop draws its random start from numpy's global
generator seeded like artplug seeds ART (one ``uniform(-eps, eps)`` array per batch, in order),
so both attacks start from the same points and take the same steps: their accuracies should
agree to float round-off. After one untimed warm-up each, ``--repeats`` timed runs per contender
are interleaved (A B, B A, A B, ...) and the ratio is taken from the median times.

Usage::

    python benchmarks/eval_speed.py [--epochs N] [--eps E] [--batch-size B] [--repeats R]
        [--examples N] [--device auto|cpu|cuda] [--seed S] [--threads T]

The exit code is 0 whatever the ratio (this is a measurement, not a test); 2 only when the setup
cannot run at all (``--device cuda`` without CUDA).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _common import NOISY_SPREAD, load_average, noisy_contenders, timed
from torch import Tensor, nn

from artplug import engine
from artplug.errors import ArtplugError
from artplug.evaluate import ATTACK_TABLE_VERSION, ATTACKS, evaluate
from artplug.kinds import Threat
from artplug.plugins import load_plugins
from artplug.recipe import resolve

ENTRY = "pgd-20"
"""The attack-table entry timed here; the hand-written loop mirrors it."""
STEPS = 20
AGREEMENT_POINTS = 0.5
"""Largest accepted difference between the two robust accuracies, in percentage points."""


@dataclass(frozen=True)
class Settings:
    """The command line."""

    epochs: int
    eps: float
    batch_size: int
    repeats: int
    examples: int | None
    device: str
    seed: int
    threads: int


def parse_args(argv: list[str] | None = None) -> Settings:
    """Read the command line into :class:`Settings`."""
    parser = argparse.ArgumentParser(
        description=f"Time artplug's {ENTRY} evaluation against a hand-written PGD-20 loop."
    )
    parser.add_argument("--epochs", type=int, default=4, help="PGD-AT epochs before timing")
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf eps (training and attack)")
    parser.add_argument("--batch-size", type=int, default=256, help="attack batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender")
    parser.add_argument(
        "--examples", type=int, default=None, help="first N test examples (default: all)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op CPU threads (default: torch's choice); 1 steadies timings on a "
        "busy machine, where idle threads spin",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.eps > 0:
        parser.error("--eps must be > 0")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    return Settings(
        epochs=args.epochs,
        eps=args.eps,
        batch_size=args.batch_size,
        repeats=args.repeats,
        examples=args.examples,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
    )


def recipe(s: Settings) -> dict[str, Any]:
    """A small PGD-AT digits recipe (the shape of ``artplug.testing.digits_recipe``)."""
    return {
        "run": {
            "name": "eval-speed-benchmark",
            "epochs": s.epochs,
            "seed": s.seed,
            "device": s.device,
            "amp": "off",
            "channels_last": "off",
        },
        "data": {"dataset": "digits", "batch_size": 64, "augment": "off"},
        "model": {"arch": "small-cnn"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "threat": {"norm": "linf", "eps": s.eps},
        "perturbation": {"use": "pgd", "steps": 5, "step_size": s.eps / 2, "random_start": True},
        "loss": [{"use": "cross-entropy"}],
        "schedule": [],
        "eval": {"every_epochs": 0, "attacks": ["clean"], "final_attacks": ["clean"]},
        "tracking": {"backend": "none"},
    }


def train(s: Settings) -> tuple[nn.Module, Tensor, Tensor, torch.device]:
    """PGD-AT on digits for ``s.epochs`` epochs; the model (eval mode) and the test split."""
    plugins = load_plugins(disabled=())
    c = engine.build(resolve(recipe(s), plugins.registries, source="<eval-speed>"))
    step = 0
    for epoch in range(s.epochs):
        step = engine.train_epoch(c, epoch, step)
    c.model.eval()
    x, y = c.data.test
    if s.examples is not None:
        x, y = x[: s.examples], y[: s.examples]
    return c.model, x, y, c.device


# ------------------------------------------------------------------------------------------
# The two contenders


def artplug_pgd20(
    model: nn.Module, x: Tensor, y: Tensor, s: Settings, device: torch.device
) -> float:
    """Robust accuracy under artplug's ``pgd-20`` entry (through ART)."""
    threat = Threat("linf", s.eps)
    result = evaluate(
        model, x, y, threat, [ENTRY], batch_size=s.batch_size, seed=s.seed, device=device
    )
    return result[ENTRY]


def handwritten_pgd20(
    model: nn.Module, x: Tensor, y: Tensor, s: Settings, device: torch.device
) -> float:
    """Robust accuracy under a minimal L-inf PGD-20 loop on ``device``-resident tensors."""
    eps, step_size, batch = s.eps, s.eps / 4, s.batch_size
    model.eval()
    with torch.no_grad():
        clean = torch.cat(
            [model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(x), batch)]
        )
    x_ok, y_ok = x[clean], y[clean]
    # The random start from numpy's global generator, as ART draws it (art.utils.random_sphere).
    np.random.seed(s.seed)
    robust = 0
    for i in range(0, len(x_ok), batch):
        xb, yb = x_ok[i : i + batch], y_ok[i : i + batch]
        start = np.random.uniform(-eps, eps, (len(xb), xb[0].numel())).astype(np.float32)
        x_adv = (xb + torch.from_numpy(start).to(xb.device).view_as(xb)).clamp(0.0, 1.0)
        for _ in range(STEPS):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), yb)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, xb - eps), xb + eps).clamp(0.0, 1.0)
        with torch.no_grad():
            robust += int((model(x_adv).argmax(1) == yb).sum())
    return robust / len(x)


def main(argv: list[str] | None = None) -> int:
    """Train, time, print; 0 whatever the numbers, 2 for an unusable setup."""
    s = parse_args(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    # ART warns about its own internals (e.g. deprecated torch calls); not our measurement.
    warnings.filterwarnings("ignore", module=r"art(\.|$)")
    started = time.perf_counter()
    try:
        model, x_cpu, y_cpu, device = train(s)
    except ArtplugError as exc:  # e.g. --device cuda without CUDA
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train_seconds = time.perf_counter() - started
    # The hand-written loop works on device-resident tensors (as a researcher's would);
    # artplug's evaluate takes them wherever they are and hands ART numpy arrays.
    x, y = x_cpu.to(device), y_cpu.to(device)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"artplug evaluation speed: the {ENTRY} entry vs a hand-written PGD-20 loop")
    print(
        f"  python {platform.python_version()}  torch {torch.__version__}  device {device} "
        f"({device_name})  cpus {os.cpu_count()}  torch threads {torch.get_num_threads()}"
    )
    print(f"  attack table v{ATTACK_TABLE_VERSION}: {ENTRY} = {ATTACKS[ENTRY]}")
    print(
        f"  model small-cnn, PGD-AT on digits for {s.epochs} epochs ({train_seconds:.1f} s); "
        f"{len(x)} test examples, batch {s.batch_size}, L-inf eps {s.eps:g}, step {s.eps / 4:g}, "
        f"seed {s.seed}, repeats {s.repeats}"
    )
    print(f"  load average before warm-up: {load_average()}")

    contenders = {"artplug": artplug_pgd20, "hand-written": handwritten_pgd20}
    accuracy: dict[str, float] = {}
    for name, fn in contenders.items():  # warm-up: lazy init, ART import, allocator
        accuracy[name] = timed(device, fn, model, x, y, s, device)[1]
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for _ in range(s.repeats):
        for name in order:
            elapsed, acc = timed(device, contenders[name], model, x, y, s, device)
            seconds[name].append(elapsed)
            if acc != accuracy[name]:
                print(f"NOTE: {name} gave {100 * acc:.2f}% on a repeat (first {accuracy[name]})")
        order.reverse()  # A B, B A, ...: a slow drift of the machine hits both alike

    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = medians["artplug"] / medians["hand-written"]
    print()
    width = max(len(name) for name in contenders)
    print(f"{'contender':<{width}}  median s  examples/s  robust acc  runs (s)")
    for name in contenders:
        runs = " ".join(f"{t:.3f}" for t in seconds[name])
        print(
            f"{name:<{width}}  {medians[name]:8.3f}  {len(x) / medians[name]:10.0f}  "
            f"{100 * accuracy[name]:9.2f}%  {runs}"
        )
    print(f"load average after the runs: {load_average()}")
    noisy = noisy_contenders(seconds)
    if noisy:
        print(
            f"NOTE: runs of {', '.join(noisy)} differ by more than {NOISY_SPREAD:g}x: another "
            "process is probably using the machine; rerun when idle, with more --repeats, or "
            "with --threads 1"
        )
    print()
    print(f"ratio artplug/hand-written (medians): {ratio:.3f}")
    gap = 100 * abs(accuracy["artplug"] - accuracy["hand-written"])
    if gap <= AGREEMENT_POINTS:
        print(
            f"accuracies agree: {100 * accuracy['artplug']:.2f}% vs "
            f"{100 * accuracy['hand-written']:.2f}% (gap {gap:.2f} <= {AGREEMENT_POINTS} points)"
        )
    else:
        print(
            f"accuracies DISAGREE: {100 * accuracy['artplug']:.2f}% vs "
            f"{100 * accuracy['hand-written']:.2f}% (gap {gap:.2f} > {AGREEMENT_POINTS} points). "
            "Both start from the same random points and take the same steps, so the gap comes "
            "from float arithmetic: a gradient component near zero whose sign differs (ART "
            "averages the loss over its batch and runs numpy<->torch copies), or "
            "non-deterministic GPU kernels; each flipped example moves the accuracy by "
            f"{100 / len(x):.2f} points."
        )
    print(
        "artplug's extra work, by design or ART's: the ART classifier wrapper, numpy round "
        "trips of inputs and results, parameter-free loss.backward() instead of autograd.grad, "
        "and hashing inputs for the logit memo that answers the two success-rate predictions "
        "inside ART's PGD.generate (they would otherwise cost two extra forward passes)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
