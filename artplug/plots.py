"""Per-run plots: training curves and knob schedules, drawn from the run's metric records.

The engine appends every metric it logs to the run folder's ``metrics.jsonl`` (one JSON object
per line: ``{"step": ..., "<metric>": value, ...}``). After training it reads that file back and
draws two PNGs into ``<run folder>/plots/``, which are then logged as the MLflow artifacts
``plots/<name>``:

- :data:`TRAINING_CURVES` (``training_curves.png``): the training loss (every logging window,
  plus the epoch averages and, with several loss terms, each term), and the accuracies in %:
  training accuracy on the step's training input (adversarial for adversarial training) and
  the validation accuracies (``val/<attack>_acc``: clean and robust) per validated epoch;
- :data:`SCHEDULES` (``schedules.png``): the learning rate the optimizer used and every knob the
  recipe's schedules set (``knob/<name>``: ``lr_scale``, ``threat.eps_scale``, loss weights...),
  one panel each, as recorded at the logging cadence (``run.log_every``).

The x axis is the epoch (a real number: 1.5 is half-way through the second epoch) once an epoch
has finished, else the optimizer step. Because the plots are a pure function of
``metrics.jsonl``, they can be redrawn for any run folder (also an interrupted one) with
:func:`plot_run_folder`.

matplotlib is imported inside the drawing functions and used through its Agg canvas directly
(no pyplot): no GUI backend, no global figure state, nothing to close.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTS_DIR = "plots"
TRAINING_CURVES = "training_curves.png"
SCHEDULES = "schedules.png"
METRICS_FILE = "metrics.jsonl"

Point = tuple[float, float]
Series = dict[str, list[Point]]

_DPI = 110
_PANEL_WIDTH = 5.0
_PANEL_HEIGHT = 3.4
_SCHEDULE_PANEL_HEIGHT = 1.9


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` file, in file order.

    A line that is not a JSON object with a numeric ``step`` is skipped: the last line of a
    run killed while writing may be cut short, and that must not cost the other records.
    """
    records: list[dict[str, float]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            records.append({k: float(v) for k, v in record.items() if isinstance(v, int | float)})
    return records


def collect_series(records: Iterable[Mapping[str, float]], wanted: Callable[[str], bool]) -> Series:
    """``{metric: [(step, value), ...]}`` for every metric name ``wanted`` accepts.

    Steps only increase along a series: when a record repeats or goes back to an earlier step
    (a resumed run re-trains the steps after its last checkpoint), the later values replace the
    earlier ones from that step on. Non-finite values become NaN, which the plots leave as gaps.
    """
    series: Series = {}
    for record in records:
        step = float(record["step"])
        for key, value in record.items():
            if key == "step" or not wanted(key):
                continue
            points = series.setdefault(key, [])
            while points and points[-1][0] >= step:
                points.pop()
            points.append((step, value if math.isfinite(value) else math.nan))
    return series


def steps_per_epoch(records: Iterable[Mapping[str, float]]) -> float | None:
    """Optimizer steps per epoch, from the first epoch summary (``epoch`` at its last step).

    Every epoch of a run has the same number of steps except a last one cut short by
    ``--max-steps``, so the first finished epoch gives the conversion. ``None`` before any
    epoch has finished.
    """
    for record in records:
        epoch = record.get("epoch")
        if epoch is not None and epoch >= 1 and record["step"] > 0:
            return record["step"] / epoch
    return None


def new_figure(width: float, height: float, *, dpi: int = _DPI) -> Figure:
    """A matplotlib figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot).

    The shared set-up of every artplug plot (this module's and :mod:`artplug.curves`');
    raises ImportError without matplotlib.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _xs(points: Sequence[Point], per_epoch: float | None) -> list[float]:
    return [step / per_epoch if per_epoch else step for step, _ in points]


def _draw(
    axes: Axes,
    points: Sequence[Point],
    per_epoch: float | None,
    *,
    label: str,
    scale: float = 1.0,
    **style: Any,
) -> None:
    axes.plot(_xs(points, per_epoch), [scale * v for _, v in points], label=label, **style)


def _finish(axes: Axes, per_epoch: float | None, ylabel: str) -> None:
    axes.set_xlabel("epoch" if per_epoch else "optimizer step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)


def plot_training_curves(
    records: Sequence[Mapping[str, float]], path: str | Path, *, title: str
) -> Path | None:
    """Draw :func:`training_curves_figure` as a PNG at ``path``; ``None`` (no file) without data."""
    figure = training_curves_figure(records, title=title)
    return None if figure is None else save_figure(figure, path)


def training_curves_figure(records: Sequence[Mapping[str, float]], *, title: str) -> Figure | None:
    """Loss and accuracy curves of a run's metric records; ``None`` without training records.

    Left panel: ``train/loss`` of every logging window (thin) and ``epoch/train_loss`` (dots);
    with two or more loss terms also each ``train/loss.<id>`` (dashed). Right panel, in %:
    ``train/adv_acc`` windows (thin), ``epoch/train_adv_acc`` (dots) and every
    ``val/<attack>_acc`` (dots on a line, one colour per attack).
    """
    series = collect_series(
        records,
        lambda k: (
            k.startswith(("train/loss", "train/adv_acc", "val/"))
            or k in ("epoch/train_loss", "epoch/train_adv_acc")
        ),
    )
    if "train/loss" not in series:
        return None
    per_epoch = steps_per_epoch(records)
    figure = new_figure(2 * _PANEL_WIDTH, _PANEL_HEIGHT)
    loss, accuracy = figure.subplots(1, 2)

    _draw(loss, series["train/loss"], per_epoch, label="train loss (window)", lw=0.8, alpha=0.6)
    if "epoch/train_loss" in series:
        _draw(loss, series["epoch/train_loss"], per_epoch, label="train loss (epoch)", marker="o")
    terms = sorted(k for k in series if k.startswith("train/loss."))
    if len(terms) >= 2:
        for key in terms:
            label = key.removeprefix("train/loss.")
            _draw(loss, series[key], per_epoch, label=label, lw=0.8, linestyle="--")
    loss.set_title("training loss", fontsize=9)
    _finish(loss, per_epoch, "loss")

    if "train/adv_acc" in series:
        _draw(
            accuracy,
            series["train/adv_acc"],
            per_epoch,
            label="train acc on training input (window)",
            scale=100.0,
            lw=0.8,
            alpha=0.6,
        )
    if "epoch/train_adv_acc" in series:
        _draw(
            accuracy,
            series["epoch/train_adv_acc"],
            per_epoch,
            label="train acc (epoch)",
            scale=100.0,
            marker="o",
        )
    for key in sorted(k for k in series if k.startswith("val/")):
        name = key.removeprefix("val/").removesuffix("_acc")
        _draw(accuracy, series[key], per_epoch, label=f"val {name}", scale=100.0, marker="s")
    accuracy.set_ylim(-2.0, 102.0)
    accuracy.set_title("accuracy (training input and validation)", fontsize=9)
    _finish(accuracy, per_epoch, "accuracy (%)")

    figure.suptitle(title, fontsize=10)
    # Fixed margins: tight_layout would measure every label first and double the drawing time.
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.84, wspace=0.2)
    return figure


def plot_schedules(
    records: Sequence[Mapping[str, float]], path: str | Path, *, title: str
) -> Path | None:
    """Draw :func:`schedules_figure` as a PNG at ``path``; ``None`` (no file) without data."""
    figure = schedules_figure(records, title=title)
    return None if figure is None else save_figure(figure, path)


def schedules_figure(records: Sequence[Mapping[str, float]], *, title: str) -> Figure | None:
    """The learning rate and every schedule knob of a run's records; ``None`` without them.

    One panel per quantity (their scales differ): ``train/lr`` first, then each
    ``knob/<name>`` in name order, sharing the x axis.
    """
    series = collect_series(records, lambda k: k == "train/lr" or k.startswith("knob/"))
    if not series:
        return None
    keys = (["train/lr"] if "train/lr" in series else []) + sorted(
        k for k in series if k.startswith("knob/")
    )
    per_epoch = steps_per_epoch(records)
    figure = new_figure(_PANEL_WIDTH + 1.0, 0.6 + _SCHEDULE_PANEL_HEIGHT * len(keys))
    panels = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for axes, key in zip(panels, keys, strict=True):
        label = "learning rate" if key == "train/lr" else key.removeprefix("knob/")
        _draw(axes, series[key], per_epoch, label=label, marker=".", markersize=3, lw=1.0)
        axes.set_ylabel(label, fontsize=8)
        axes.grid(True, alpha=0.3)
    panels[-1].set_xlabel("epoch" if per_epoch else "optimizer step")
    figure.suptitle(title, fontsize=10)
    # Margins fixed in inches, whatever the number of panels.
    height = figure.get_figheight()
    figure.subplots_adjust(
        left=0.16, right=0.97, bottom=0.5 / height, top=1.0 - 0.45 / height, hspace=0.15
    )
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (creating its folder); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out


def plot_run(
    records: Sequence[Mapping[str, float]], folder: str | Path, *, name: str
) -> list[Path]:
    """Draw both plots of a run named ``name`` into ``folder``; the paths of those drawn."""
    out = Path(folder)
    drawn = [
        plot_training_curves(records, out / TRAINING_CURVES, title=f"{name}: training curves"),
        plot_schedules(records, out / SCHEDULES, title=f"{name}: learning rate and knobs"),
    ]
    return [path for path in drawn if path is not None]


def plot_run_folder(run_dir: str | Path, name: str | None = None) -> list[Path]:
    """Redraw the plots of a run folder from its ``metrics.jsonl`` into ``<run_dir>/plots``."""
    folder = Path(run_dir)
    records = read_metrics(folder / METRICS_FILE)
    return plot_run(records, folder / PLOTS_DIR, name=name or folder.name)
