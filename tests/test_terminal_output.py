"""What a person sees in the terminal: status lines, epoch lines, stops, wall times, -q."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from clitools import call

from artplug import engine, workflows
from artplug.cli_options import load
from artplug.display import Display, clock, duration
from artplug.recipe import dumps_toml
from artplug.testing import digits_recipe

STEPS_PER_EPOCH = 19  # the digits training split in batches of 64


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal, so that Display draws its live line."""

    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: a carriage return goes back to column 0, and
    what is written next overwrites the line from there."""
    lines = []
    for raw in text.split("\n"):
        shown = ""
        for part in raw.split("\r"):
            shown = part + shown[len(part) :]
        lines.append(shown.rstrip())
    return lines


def tiny_recipe(path: Path, epochs: int = 2, **eval_settings: object) -> Path:
    settings = {
        "every_epochs": 0,
        "attacks": ["clean"],
        "final_attacks": ["clean", "fgsm"],
        "test_examples": 32,
        "sanity": False,
        **eval_settings,
    }
    raw = digits_recipe(
        run={"name": "tiny", "epochs": epochs, "seed": 0, "log_every": 1, "out_dir": "runs"},
        eval=settings,
    )
    path.write_text(dumps_toml(raw))
    return path


# ------------------------------------------------------------------------------------------
# The display itself


def test_clock_and_duration():
    assert [clock(s) for s in (0, 7.4, 754, 3723)] == ["0:00", "0:07", "12:34", "1:02:03"]
    assert [duration(s) for s in (7.44, 59.9, 192)] == ["7.4s", "59.9s", "3:12"]


def test_clear_erases_the_live_status_line():
    terminal = FakeTerminal()
    display = Display(terminal)
    display.status("epoch 1/3 step 4/19 loss 2.1")
    display.clear()
    terminal.write("Test accuracy\n")  # what an echo to the same terminal would print
    display.clear()  # nothing to erase now
    assert screen(terminal.getvalue()) == ["Test accuracy", ""]
    # Without it, the next output starts after the status line, on the same line.
    terminal = FakeTerminal()
    Display(terminal).status("epoch 1/3 step 4/19 loss 2.1")
    terminal.write("Test accuracy\n")
    assert screen(terminal.getvalue())[0] == "epoch 1/3 step 4/19 loss 2.1Test accuracy"


def test_quiet_prints_warnings_only_and_disabled_prints_nothing():
    terminal = FakeTerminal()
    quiet = Display(terminal, quiet=True)
    quiet.status("epoch 1/3 step 4/19")
    quiet.line("epoch 1/3  loss 1.2")
    quiet.warn("catastrophic overfitting after epoch 3")
    assert terminal.getvalue() == "WARNING: catastrophic overfitting after epoch 3\n"
    silent = io.StringIO()
    off = Display(silent, enabled=False)
    off.warn("x")
    off.line("y")
    assert silent.getvalue() == ""


def test_off_a_terminal_status_lines_are_plain_and_rate_limited(monkeypatch):
    from artplug import display as module

    now = iter([5000.0, 5010.0])
    monkeypatch.setattr(module.time, "monotonic", lambda: next(now))
    log = io.StringIO()
    display = Display(log, plain_interval_s=60)
    display.status("first")
    display.status("second")  # 10 s later, within the interval: not printed
    display.clear()  # no live line: nothing to erase
    display.line("epoch 1/3")
    assert log.getvalue() == "first\nepoch 1/3\n"


def test_attack_progress_names_the_attack_its_place_and_its_batches(monkeypatch):
    terminal = FakeTerminal()
    progress = engine._AttackProgress(
        Display(terminal), "test", ["clean", "fgsm", "fgsm", "square"], 32, interval_s=0.0
    )
    now = iter([100.0, 142.0])
    monkeypatch.setattr(engine.time, "monotonic", lambda: next(now))
    progress.attack("square")
    assert screen(terminal.getvalue())[-1] == "  evaluating test: 3/3 square on 32 examples"
    progress.batch(120)
    assert screen(terminal.getvalue())[-1] == (
        "  evaluating test: 3/3 square on 32 examples, 120 batches, 0:42"
    )
    # Redrawn at most every interval_s: the next batches within it change nothing.
    monkeypatch.setattr(engine.time, "monotonic", lambda: 5.0)
    slow = engine._AttackProgress(Display(FakeTerminal()), "test", ["fgsm"], 8, interval_s=60)
    slow.attack("fgsm")
    written = slow.display.stream.getvalue()
    slow.batch(1)
    assert slow.display.stream.getvalue() == written


def test_timing_estimates_the_rest_from_this_segments_pace(monkeypatch):
    def stub(step: int, first_step: int, segments: list[float]) -> SimpleNamespace:
        return SimpleNamespace(
            step=step,
            first_step=first_step,
            steps_per_epoch=10,
            c=SimpleNamespace(recipe=SimpleNamespace(run=SimpleNamespace(epochs=6))),
            wall_segments=lambda: segments,
        )

    # 20 steps in 8 s: 40 steps left at 0.4 s each.
    assert engine.Training.timing(stub(20, 0, [8.0])) == "elapsed 0:08  eta 0:16"
    # A resumed run: elapsed counts the earlier segment, the pace is this segment's.
    assert engine.Training.timing(stub(40, 30, [100.0, 5.0])) == "elapsed 1:45  eta 0:10"
    # --max-steps ends it sooner than the epochs.
    assert engine.Training.timing(stub(20, 0, [8.0]), max_steps=25) == "elapsed 0:08  eta 0:02"
    assert engine.Training.timing(stub(20, 20, [1.0])) == "elapsed 0:01"


def test_max_steps_line():
    def result(steps: int, total: int, complete: bool) -> workflows.RunResult:
        epochs_done = -(-steps // (total // 6))  # 6 epochs; a cut epoch counts as done
        return workflows.RunResult(
            Path("runs/x"), {}, [], 1.0, epochs_done, Path("runs/x/checkpoint-last.pt"),
            training_complete=complete, steps=steps, total_steps=total, epochs_total=6,
        )  # fmt: skip

    resume = "artplug resume runs/x/checkpoint-last.pt"
    assert workflows._max_steps_line(result(20, 60, False), 20, resume) == (
        "stopped after 20 of 60 steps (--max-steps): training incomplete; "
        "artplug resume runs/x/checkpoint-last.pt continues it"
    )
    # Cut inside an epoch (10 steps each): that epoch was checkpointed as done; say so.
    assert workflows._max_steps_line(result(25, 60, False), 25, resume) == (
        "stopped after 25 of 60 steps (--max-steps): training incomplete; "
        "artplug resume runs/x/checkpoint-last.pt continues it from epoch 4 (the rest of "
        "epoch 3 is not trained)"
    )
    assert workflows._max_steps_line(result(50, 60, True), 50, resume) == (
        "stopped after 50 of 60 steps (--max-steps), in the last epoch: that epoch is "
        "incomplete; the run counts as finished"
    )
    # Not cut short: no --max-steps, a limit beyond the run, or training ended before it.
    assert workflows._max_steps_line(result(60, 60, True), None, resume) is None
    assert workflows._max_steps_line(result(60, 60, True), 100, resume) is None
    assert workflows._max_steps_line(result(30, 60, True), 40, resume) is None


def test_wall_time_text():
    assert workflows.wall_time_text([7.44]) == "wall time 7.4s"
    assert workflows.wall_time_text([100.0, 92.0]) == "wall time 3:12 in 2 segments (1:40 + 1:32)"


# ------------------------------------------------------------------------------------------
# Runs


def test_final_table_starts_on_a_clean_line(plugin_set, run_tmp, monkeypatch):
    recipe = tiny_recipe(run_tmp / "r.toml", epochs=1)
    resolved = load(plugin_set, str(recipe), ["run.threads=1"])
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)  # where the run's Display draws

    def echo(message: str = "", err: bool = False) -> None:
        terminal.write(message + "\n")  # stdout and stderr share the terminal

    workflows.run_recipe(plugin_set, resolved, no_track=True, quiet=False, max_steps=2, echo=echo)
    shown = screen(terminal.getvalue())
    # The evaluation's status line was live when the table came: it was erased first.
    assert "\r  evaluating test: 2/2 fgsm on 32 examples" in terminal.getvalue()
    title = next(line for line in shown if "Test accuracy" in line)
    assert title.startswith("Test accuracy (linf, eps=0.1;")


def test_max_steps_says_so_and_resume_adds_up_the_wall_time(run_tmp):
    recipe = tiny_recipe(run_tmp / "r.toml")
    code, out, err = call(["run", str(recipe), "--no-track", "--max-steps", "2", "--threads", "1"])
    assert code == 0, err
    (run_dir,) = (run_tmp / "runs").iterdir()
    resume = f"artplug resume {Path('runs') / run_dir.name / 'checkpoint-last.pt'} --no-track"
    total = 2 * STEPS_PER_EPOCH
    assert (
        f"stopped after 2 of {total} steps (--max-steps): training incomplete; {resume} "
        "continues it from epoch 2 (the rest of epoch 1 is not trained)"
    ) in out.splitlines()
    (epoch,) = [line for line in err.splitlines() if line.startswith("epoch 1/2  loss")]
    assert re.search(r"s  elapsed \d+:\d\d  eta \d+:\d\d$", epoch), epoch
    assert re.search(r"^wall time \d+\.\ds; files in ", out, re.MULTILINE), out

    code, out, err = call(["resume", str(run_dir), "--no-track", "--threads", "1"])
    assert code == 0, err
    assert "stopped after" not in out
    report = json.loads((run_dir / "eval.json").read_text())
    first, second = report["wall_segments_s"]
    assert report["wall_time_s"] == pytest.approx(first + second)
    (line,) = [line for line in out.splitlines() if line.startswith("wall time ")]
    assert line == f"{workflows.wall_time_text([first, second])}; files in {run_dir}"
    assert " in 2 segments (" in line
    # The metric time/wall_s holds the same total (the last one: the smoke run logged its own).
    logged = [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    walls = [row["time/wall_s"] for row in logged if "time/wall_s" in row]
    assert walls[-1] == pytest.approx(report["wall_time_s"])


def test_quiet_keeps_warnings_and_drops_progress(run_tmp, monkeypatch):
    from artplug import plots

    def broken(*args: object, **kwargs: object) -> list[Path]:
        raise RuntimeError("no canvas")

    monkeypatch.setattr(plots, "plot_run", broken)
    recipe = tiny_recipe(run_tmp / "r.toml")
    code, out, err = call(["run", str(recipe), "--no-track", "-q", "--max-steps", "2"])
    assert code == 0, err
    assert "WARNING: the run's plots could not be drawn (RuntimeError: no canvas)" in err
    assert "epoch 1/2" not in err and "run folder:" not in err
    # The results and the early stop are not progress: they stay.
    assert "Test accuracy" in out and "stopped after 2 of" in out


def test_eval_progress_goes_to_the_terminal_only(run_tmp):
    recipe = tiny_recipe(run_tmp / "r.toml", epochs=1)
    code, _, err = call(["run", str(recipe), "--no-track", "-q", "--max-steps", "2"])
    assert code == 0, err
    (run_dir,) = (run_tmp / "runs").iterdir()
    args = ["eval", str(run_dir), "--attack", "clean", "--attack", "fgsm", "--no-track"]
    terminal = FakeTerminal()
    code, out, err = call(args, stderr=terminal)
    assert code == 0, err
    assert "\r  evaluating test: 1/2 clean on 32 examples" in err
    assert "\r  evaluating test: 2/2 fgsm on 32 examples" in err
    assert screen(err)[-1] == ""  # erased before the table
    assert out.startswith("Test accuracy (linf, eps=0.1;")  # stdout: the table, clean
    # Off a terminal: plain lines, no live redraws, nothing about batches.
    code, out, err = call(args)
    assert code == 0, err
    assert "\r" not in err and "batches" not in err
    assert out.startswith("Test accuracy (linf, eps=0.1;")
