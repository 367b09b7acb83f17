"""Per-run plots: metric records to series, the two figures, and the files a run leaves."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

import artplug
from artplug import plots
from artplug.engine import build
from artplug.plugins import load_plugins
from artplug.recipe import resolve
from artplug.testing import digits_recipe
from artplug.tracking import NullTracker
from artplug.workflows import train_and_evaluate


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# Two epochs of 4 steps, logged every 2 steps; the run was resumed after epoch 1 and re-did
# step 6 (the first record at step 6 is replaced by the second).
RECORDS = [
    {"step": 2, "train/loss": 2.0, "train/adv_acc": 0.1, "train/lr": 0.1, "knob/lr_scale": 1.0},
    {"step": 4, "train/loss": 1.6, "train/adv_acc": 0.3, "train/lr": 0.1, "knob/lr_scale": 1.0},
    {"step": 4, "epoch": 1, "epoch/train_loss": 1.8, "epoch/train_adv_acc": 0.2},
    {"step": 4, "val/clean_acc": 0.5, "val/pgd-20_acc": 0.25},
    {"step": 6, "train/loss": 9.0, "train/adv_acc": 0.0, "train/lr": 0.05, "knob/lr_scale": 0.5},
    {"step": 6, "train/loss": 1.2, "train/adv_acc": 0.4, "train/lr": 0.05, "knob/lr_scale": 0.5},
    {"step": 8, "train/loss": 1.0, "train/adv_acc": 0.6, "train/lr": 0.01, "knob/lr_scale": 0.1},
    {"step": 8, "epoch": 2, "epoch/train_loss": 1.1, "epoch/train_adv_acc": 0.5},
    {"step": 8, "val/clean_acc": 0.75, "val/pgd-20_acc": 0.5},
    {"step": 8, "test/clean_acc": 0.7},
]


def lines_by_label(axes) -> dict[str, tuple[list[float], list[float]]]:
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in axes.get_lines()
    }


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "train/loss": 2.5}\n'
        "[1, 2]\n"
        '{"no_step": 1}\n'
        '{"step": 2, "train/loss": 2.0, "note": "text"}\n'
        '{"step": 3, "train/lo'
    )
    assert plots.read_metrics(path) == [
        {"step": 1.0, "train/loss": 2.5},
        {"step": 2.0, "train/loss": 2.0},
    ]


def test_series_keep_the_latest_values_of_a_repeated_step():
    series = plots.collect_series(RECORDS, lambda key: key == "train/loss")
    assert series == {"train/loss": [(2.0, 2.0), (4.0, 1.6), (6.0, 1.2), (8.0, 1.0)]}
    resumed = plots.collect_series(
        [
            {"step": 1, "a": 1.0},
            {"step": 2, "a": 2.0},
            {"step": 3, "a": 3.0},
            {"step": 2, "a": 5.0},
        ],
        lambda key: True,
    )
    assert resumed == {"a": [(1.0, 1.0), (2.0, 5.0)]}
    (point,) = plots.collect_series([{"step": 1, "a": math.inf}], lambda key: True)["a"]
    assert math.isnan(point[1])
    assert plots.steps_per_epoch(RECORDS) == 4.0
    assert plots.steps_per_epoch(RECORDS[:2]) is None


def test_training_curves_figure_draws_the_records_in_epochs_and_percent():
    figure = plots.training_curves_figure(RECORDS, title="t")
    assert figure is not None
    loss, accuracy = figure.axes
    drawn = lines_by_label(loss)
    assert drawn["train loss (window)"] == ([0.5, 1.0, 1.5, 2.0], [2.0, 1.6, 1.2, 1.0])
    assert drawn["train loss (epoch)"] == ([1.0, 2.0], [1.8, 1.1])
    assert len(drawn) == 2  # one loss term: no per-term lines
    assert loss.get_xlabel() == "epoch"
    drawn = lines_by_label(accuracy)
    assert drawn["train acc on training input (window)"][1] == pytest.approx([10, 30, 40, 60])
    assert drawn["train acc (epoch)"][1] == pytest.approx([20, 50])
    assert drawn["val clean"] == ([1.0, 2.0], pytest.approx([50, 75]))
    assert drawn["val pgd-20"] == ([1.0, 2.0], pytest.approx([25, 50]))


def test_loss_terms_get_their_own_lines_and_steps_are_the_axis_before_an_epoch_ends():
    records = [
        {"step": 1, "train/loss": 3.0, "train/loss.ce": 2.0, "train/loss.kl": 1.0},
        {"step": 2, "train/loss": 2.0, "train/loss.ce": 1.5, "train/loss.kl": 0.5},
    ]
    figure = plots.training_curves_figure(records, title="t")
    assert figure is not None
    drawn = lines_by_label(figure.axes[0])
    assert drawn["ce"] == ([1.0, 2.0], [2.0, 1.5]) and drawn["kl"] == ([1.0, 2.0], [1.0, 0.5])
    assert figure.axes[0].get_xlabel() == "optimizer step"
    assert plots.training_curves_figure([{"step": 1, "val/clean_acc": 0.5}], title="t") is None


def test_schedules_figure_has_one_panel_per_knob():
    records = [
        {"step": 2, "train/lr": 0.1, "knob/lr_scale": 1.0, "knob/threat.eps_scale": 0.0},
        {"step": 4, "train/lr": 0.05, "knob/lr_scale": 0.5, "knob/threat.eps_scale": 0.5},
    ]
    figure = plots.schedules_figure(records, title="t")
    assert figure is not None
    panels = [lines_by_label(axes) for axes in figure.axes]
    assert panels == [
        {"learning rate": ([2.0, 4.0], [0.1, 0.05])},
        {"lr_scale": ([2.0, 4.0], [1.0, 0.5])},
        {"threat.eps_scale": ([2.0, 4.0], [0.0, 0.5])},
    ]
    assert plots.schedules_figure([{"step": 1, "train/loss": 1.0}], title="t") is None


def test_plot_run_folder_writes_both_pngs(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    drawn = plots.plot_run_folder(tmp_path, "demo")
    assert drawn == [
        tmp_path / "plots" / plots.TRAINING_CURVES,
        tmp_path / "plots" / plots.SCHEDULES,
    ]
    width, height = png_size(drawn[0])
    assert (width, height) == (1100, 374)  # 10 x 3.4 inches at 110 dpi
    assert png_size(drawn[1])[0] == 660


class RecordingTracker(NullTracker):
    """A tracker that 'tracks' (has a run id) and records the artifacts it is given."""

    run_id = "recording"

    def __init__(self) -> None:
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path), artifact_path))


def plot_recipe(**extra):
    raw = digits_recipe(
        run={"name": "plotted", "epochs": 2, "log_every": 1},
        data={"dataset": "digits", "batch_size": 256},
        perturbation={"use": "pgd", "steps": 1},
        schedule=[
            {"use": "cosine-lr"},
            {"use": "linear-eps-warmup", "warmup_epochs": 1.0, "start_scale": 0.0},
        ],
        **extra,
    )
    raw["eval"] |= {"every_epochs": 1, "select": "last"}
    return raw


def test_fit_draws_and_logs_the_plots_with_the_knobs_of_every_logged_step(plugin_set, tmp_path):
    c = build(resolve(plot_recipe(), plugin_set.registries))
    per_epoch = len(c.train_loader)
    tracker = RecordingTracker()
    run_dir = tmp_path / "run"
    train_and_evaluate(c, tracker, run_dir=run_dir)
    assert (run_dir / "plots", "plots") in tracker.artifacts
    assert png_size(run_dir / "plots" / plots.TRAINING_CURVES)[0] > 0
    assert png_size(run_dir / "plots" / plots.SCHEDULES)[0] > 0

    records = plots.read_metrics(run_dir / "metrics.jsonl")
    figure = plots.schedules_figure(records, title="t")
    assert figure is not None
    lr, lr_scale, eps_scale = (lines_by_label(axes) for axes in figure.axes)
    xs, ys = eps_scale["threat.eps_scale"]
    # log_every = 1: one record per step; the record after global step t holds the knobs of
    # the step with progress.step = t - 1, and the warm-up reaches 1 after one epoch.
    steps = list(range(1, 2 * per_epoch + 1))
    assert xs == pytest.approx([t / per_epoch for t in steps])
    assert ys == pytest.approx([min(1.0, (t - 1) / per_epoch) for t in steps])
    assert lr_scale["lr_scale"][1][0] == pytest.approx(1.0)  # cosine at progress 0
    assert lr["learning rate"][1] == pytest.approx([0.05 * s for s in lr_scale["lr_scale"][1]])
    curves = plots.training_curves_figure(records, title="t")
    assert curves is not None
    assert lines_by_label(curves.axes[1])["val clean"][0] == [1.0]  # select = last: epoch 1 only


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FailingLoss:
    """Cross-entropy that raises on its third call, like a bug in the middle of training."""

    name = "fails-on-third-call"
    Params = _Params
    needs = frozenset({"adv"})

    def __init__(self, params):
        self.params = params
        self.calls = 0

    def __call__(self, out, state):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return F.cross_entropy(out.logits_adv, out.y)


class FailingPlugin:
    @staticmethod
    @artplug.hookimpl
    def register_loss_terms(register):
        register(FailingLoss)


def test_a_failed_run_still_leaves_its_plots(tmp_path):
    registries = load_plugins(disabled=(), extra=[("failing", FailingPlugin())]).registries
    raw = digits_recipe(
        run={"name": "crash", "epochs": 1, "log_every": 1},
        perturbation={"use": "none"},
        loss=[{"use": "fails-on-third-call"}],
    )
    tracker = RecordingTracker()
    with pytest.raises(RuntimeError, match="boom"):
        train_and_evaluate(build(resolve(raw, registries)), tracker, run_dir=tmp_path / "run")
    records = plots.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1.0, 2.0]
    assert (tmp_path / "run" / "plots" / plots.TRAINING_CURVES).is_file()
    assert (tmp_path / "run" / "plots", "plots") in tracker.artifacts
