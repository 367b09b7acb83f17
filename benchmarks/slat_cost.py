"""What does a SLAT training step cost compared with FGSM-RS (FastAT)?

SLAT (Park & Lee 2021) claims the cost of FGSM: one clean forward and ONE backward give the
input gradient and the latent gradients, then one training forward and backward. FGSM with a
random start (Wong et al. 2020) does the same number of passes. This script times the engine's
:func:`artplug.engine.train_step` for both, in one process, on the same initial weights and the
same fixed batch:

- ``slat``: ``[[transform]] latent-sites`` (the architecture's default sites) and
  ``[perturbation] slat``, attack in train mode;
- ``fgsm-rs``: ``[perturbation] fgsm`` with ``random_start = true``, attack in train mode,
  on a model without sites.

Setups: the digits small-cnn (a real digits batch) and a preact-resnet18 on random 3x32x32
inputs (CIFAR-sized, no dataset needed). Devices: the CPU, plus CUDA when torch sees it
(``--device auto``); the engine's device defaults apply (bf16 autocast and channels_last on
CUDA, fp32 on the CPU), the same for both contenders.

After ``--warmup`` untimed steps each, ``--repeats`` runs of ``--steps`` steps per contender are
timed, interleaved A B, B A, ... so that load from other processes is shared; the ratio is
taken from the median run times, and a cross-check gives the median of the ratios of adjacent
runs.

Usage::

    python benchmarks/slat_cost.py [--steps N] [--repeats R] [--warmup W] [--batch-size B]
        [--device auto|cpu|cuda] [--setups digits,preact32] [--threads T]

The exit code is 0 whatever the ratios (a measurement, not a test); 2 when ``--device cuda`` is
asked for without CUDA.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from _common import NOISY_SPREAD, load_average, noisy_contenders, timed
from torch import Tensor

from artplug import engine
from artplug.kinds import Progress
from artplug.models import build_model
from artplug.plugins import load_plugins
from artplug.recipe import resolve

EXPECTED = (1.0, 1.2)
"""The band SLAT / FGSM-RS should fall in: same passes, plus the sites' elementwise work."""
SETUPS = ("digits", "preact32")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
LR = 0.01  # small and constant: the timing must not depend on a schedule or a divergence


@dataclass(frozen=True)
class Settings:
    """What every contender shares."""

    steps: int
    repeats: int
    warmup: int
    batch_size: int
    devices: tuple[str, ...]
    setups: tuple[str, ...]
    eps: float
    seed: int = 0


def parse_args(argv: list[str] | None = None) -> Settings:
    """Read the command line into :class:`Settings` (exit 2 for unusable choices)."""
    parser = argparse.ArgumentParser(description="Time SLAT vs FGSM-RS training steps.")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto = the CPU, plus CUDA when available",
    )
    parser.add_argument(
        "--setups", default=",".join(SETUPS), help=f"comma-separated, from {', '.join(SETUPS)}"
    )
    parser.add_argument("--eps", type=float, default=8 / 255, help="L-inf training eps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    setups = tuple(s.strip() for s in args.setups.split(",") if s.strip())
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        parser.error(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        raise SystemExit(2)
    if args.device == "auto":
        devices: tuple[str, ...] = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    else:
        devices = (args.device,)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return Settings(
        steps=args.steps,
        repeats=args.repeats,
        warmup=max(args.warmup, 0),
        batch_size=args.batch_size,
        devices=devices,
        setups=setups,
        eps=args.eps,
    )


def recipe_dict(s: Settings, slat: bool, device: str) -> dict[str, Any]:
    """The raw recipe of one contender (digits data: the preact setup swaps model and batch)."""
    perturbation: dict[str, Any] = (
        {"use": "slat", "model_mode": "train"}
        if slat
        else {"use": "fgsm", "random_start": True, "model_mode": "train"}
    )
    return {
        "run": {"name": "slat-cost", "epochs": 1, "seed": s.seed, "device": device},
        "data": {"dataset": "digits", "batch_size": s.batch_size, "augment": "off"},
        "model": {"arch": "small-cnn"},
        "optim": {"name": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": 5e-4},
        "threat": {"norm": "linf", "eps": s.eps},
        "transform": [{"use": "latent-sites"}] if slat else [],
        "perturbation": perturbation,
        "loss": [{"use": "cross-entropy"}],
        "schedule": [],
        "eval": {"every_epochs": 0, "final_attacks": ["clean"], "sanity": False},
        "tracking": {"backend": "none"},
    }


class Contender:
    """One technique's components and a fixed batch; ``run`` times ``steps`` train steps."""

    def __init__(self, name: str, c: engine.Components, x: Tensor, y: Tensor) -> None:
        self.name = name
        self.c = c
        self.x, self.y = x, y
        self.step = 0

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` consecutive ``engine.train_step`` calls on the fixed batch."""
        return timed(self.c.device, self._train_steps, steps)[0]

    def _train_steps(self, steps: int) -> None:
        for _ in range(steps):
            progress = Progress(epoch=0, step=self.step, steps_per_epoch=10**6, total_steps=10**6)
            engine.train_step(self.c, self.x, self.y, progress)
            self.step += 1

    def forwards_per_step(self) -> int:
        """Model forwards in one (untimed) step: both contenders should do two."""
        calls = []
        handle = self.c.model.register_forward_pre_hook(lambda m, a: calls.append(1))
        try:
            self.run(1)
        finally:
            handle.remove()
        return len(calls)


def build_pair(s: Settings, setup: str, device_name: str) -> tuple[Contender, Contender]:
    """SLAT and FGSM-RS contenders with the same initial weights and the same batch."""
    plugins = load_plugins(disabled=())
    device = torch.device(device_name)
    components = {}
    for slat in (True, False):
        recipe = resolve(recipe_dict(s, slat, device_name), plugins.registries, source="<bench>")
        components[slat] = engine.build(recipe, device=device)
    generator = torch.Generator().manual_seed(s.seed)
    if setup == "digits":
        loader = components[False].train_loader
        x, y = loader.x[: s.batch_size], loader.y[: s.batch_size]
        base = copy.deepcopy(components[False].model)  # no sites: the FGSM-RS model
    else:
        x = torch.rand(s.batch_size, 3, 32, 32, generator=generator).to(device)
        y = torch.randint(0, 10, (s.batch_size,), generator=generator).to(device)
        torch.manual_seed(s.seed)
        base = build_model(
            "preact-resnet18",
            in_channels=3,
            num_classes=10,
            image_size=32,
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
        )
    pair = []
    for slat in (True, False):
        c = components[slat]
        model = copy.deepcopy(base).cpu()
        # Same initial weights for both; the SLAT copy gets the recipe's latent-sites hooks.
        for spec in c.recipe.transforms:
            model = spec.build().apply(model)
        model = model.to(device)
        if c.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        c = replace(c, model=model, optimizer=optimizer, base_lrs=[LR])
        pair.append(Contender("slat" if slat else "fgsm-rs", c, x, y))
    return pair[0], pair[1]


def time_pair(s: Settings, pair: tuple[Contender, Contender]) -> dict[str, list[float]]:
    """Warm up, then ``repeats`` interleaved runs per contender (A B, B A, ...)."""
    for contender in pair:
        if s.warmup:
            contender.run(s.warmup)
    times: dict[str, list[float]] = {contender.name: [] for contender in pair}
    for repeat in range(s.repeats):
        order = pair if repeat % 2 == 0 else pair[::-1]
        for contender in order:
            times[contender.name].append(contender.run(s.steps))
    return times


def main(argv: list[str] | None = None) -> int:
    """Time every setup on every device; print one row each and the SLAT / FGSM-RS ratios."""
    s = parse_args(argv)
    print("SLAT cost benchmark: engine.train_step, SLAT vs FGSM-RS, same weights and batch")
    print(
        f"  python {platform.python_version()}  torch {torch.__version__}  cpus {os.cpu_count()}"
        f"  torch threads {torch.get_num_threads()}  devices {', '.join(s.devices)}"
    )
    print(
        f"  batch {s.batch_size}  steps/run {s.steps}  repeats {s.repeats}  warm-up {s.warmup}"
        f"  linf eps {s.eps:.4g}  SGD lr {LR} constant  attack in train mode"
    )
    print(f"  load average before: {load_average()}")
    headers = ["setup", "device", "amp", "fwd/step", "slat s/step", "fgsm-rs s/step", "ratio"]
    headers += ["paired", "slat runs (s)", "fgsm-rs runs (s)"]
    rows = []
    ratios = []
    noisy: list[str] = []
    for device_name in s.devices:
        for setup in s.setups:
            slat, fgsm = build_pair(s, setup, device_name)
            forwards = f"{slat.forwards_per_step()}/{fgsm.forwards_per_step()}"
            times = time_pair(s, (slat, fgsm))
            med_slat = statistics.median(times["slat"])
            med_fgsm = statistics.median(times["fgsm-rs"])
            ratio = med_slat / med_fgsm
            paired = statistics.median(
                a / b for a, b in zip(times["slat"], times["fgsm-rs"], strict=True)
            )
            ratios.append((setup, device_name, ratio))
            noisy += [f"{name} ({setup}, {device_name})" for name in noisy_contenders(times)]
            amp = str(slat.c.amp_dtype).removeprefix("torch.") if slat.c.amp_dtype else "off"
            rows.append(
                [
                    setup,
                    device_name,
                    amp,
                    forwards,
                    f"{med_slat / s.steps:.4f}",
                    f"{med_fgsm / s.steps:.4f}",
                    f"{ratio:.3f}",
                    f"{paired:.3f}",
                    " ".join(f"{t:.2f}" for t in times["slat"]),
                    " ".join(f"{t:.2f}" for t in times["fgsm-rs"]),
                ]
            )
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    print()
    for row in [headers, *rows]:
        print(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(f"load average after: {load_average()}")
    if noisy:
        print(
            f"NOTE: runs of {', '.join(noisy)} differ by more than {NOISY_SPREAD:g}x: another "
            "process is probably using the CPU; rerun on an idle machine or with more --repeats"
        )
    print()
    low, high = EXPECTED
    for setup, device_name, ratio in ratios:
        verdict = "" if low - 0.05 <= ratio <= high else "  (outside the expected band)"
        print(f"ratio SLAT / FGSM-RS ({setup}, {device_name}): {ratio:.3f}{verdict}")
    print(
        f"expected about {low}-{high}: both do 2 forwards + 2 backwards per step; SLAT adds the "
        "latent sign steps and the domain constraint, FGSM-RS the random start"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
