"""Robust accuracy as a function of the attack radius: the points, their metrics and a PNG plot.

A robust model loses accuracy gradually as eps grows and reaches (about) zero at a large eps;
a curve that stays flat, or rises, is a sign of gradient masking. ``[eval] eps_curve`` lists the
radii; each point is the accuracy under one attack-table entry (``pgd-20`` by default) at that
radius, on the same examples, with the recipe's norm.

Metrics: one per radius, ``curve/<attack>_acc/eps_<eps>`` (``eps`` written with ``%g``, e.g.
``curve/pgd-20_acc/eps_0.0313725``), so runs can be compared radius by radius in MLflow's run
table; the picture is the artifact ``eps_curve.png``.

matplotlib is imported only when :func:`plot_curve` draws, through the figure helpers of
:mod:`artplug.plots` (its Agg canvas directly, no pyplot), so no GUI backend and no global
figure state are involved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from artplug.kinds import Threat
from artplug.plots import new_figure, save_figure

DEFAULT_ATTACK = "pgd-20"
PLOT_NAME = "eps_curve.png"

Point = tuple[float, float]


def curve_metric_key(attack: str, eps: float) -> str:
    """The metric name of the point at ``eps``."""
    return f"curve/{attack}_acc/eps_{eps:g}"


def robust_accuracy_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    eps_values: Sequence[float],
    *,
    attack: str = DEFAULT_ATTACK,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
    on_point: Callable[[float], None] | None = None,
) -> list[Point]:
    """``[(eps, accuracy), ...]`` under ``attack`` for each radius, sorted by eps (no repeats).

    ``threat`` gives the norm; its own eps is not used. ``on_point(eps)`` is called before each
    radius is attacked.
    """
    from artplug.evaluate import evaluate

    points: list[Point] = []
    for eps in sorted({float(e) for e in eps_values}):
        if on_point is not None:
            on_point(eps)
        accuracy = evaluate(
            model,
            x,
            y,
            Threat(threat.norm, eps),
            [attack],
            batch_size=batch_size,
            seed=seed,
            device=device,
        )[attack]
        points.append((eps, accuracy))
    return points


def curve_metrics(points: Sequence[Point], attack: str = DEFAULT_ATTACK) -> dict[str, float]:
    """One metric per point (see the module docstring)."""
    return {curve_metric_key(attack, eps): accuracy for eps, accuracy in points}


def plot_curve(
    points: Sequence[Point],
    path: str | Path,
    *,
    title: str,
    attack: str = DEFAULT_ATTACK,
    mark_eps: float | None = None,
) -> Path:
    """Draw accuracy (%) against eps as a PNG at ``path``; ``mark_eps`` gets a dashed line."""
    figure = new_figure(5.0, 3.5, dpi=120)
    axes = figure.add_subplot()
    xs = [eps for eps, _ in points]
    ys = [100.0 * accuracy for _, accuracy in points]
    axes.plot(xs, ys, marker="o", label=f"{attack} accuracy")
    if mark_eps is not None:
        axes.axvline(mark_eps, linestyle="--", color="grey", label=f"threat eps = {mark_eps:.4g}")
    axes.set_xlabel("eps")
    axes.set_ylabel("robust accuracy (%)")
    axes.set_ylim(-2.0, 102.0)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
