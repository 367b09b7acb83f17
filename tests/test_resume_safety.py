"""Resuming never destroys results; run folders are distinct and never left empty."""

from __future__ import annotations

import json
import threading
from datetime import datetime
from pathlib import Path

import pytest
from clitools import run_main, write_recipe

from artplug import checkpoint as ckpt
from artplug import engine
from artplug.engine import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, build, make_run_dir
from artplug.errors import ArtplugError
from artplug.recipe import resolve
from artplug.testing import digits_recipe
from artplug.tracking import NullTracker
from artplug.workflows import train_and_evaluate

STEPS_PER_EPOCH = 19  # digits at batch 64


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def one_error(err: str) -> str:
    (line,) = [x for x in err.splitlines() if x.startswith("Error:")]
    return line


@pytest.fixture
def finished_run(tmp_path, run_tmp, capsys):
    """A finished two-epoch run, validated every epoch (so it has a best checkpoint)."""
    recipe = write_recipe(
        tmp_path / "r.toml",
        run={"name": "done", "epochs": 2, "log_every": 5},
        eval={
            "every_epochs": 1,
            "attacks": ["clean"],
            "final_attacks": ["clean"],
            "n_examples": 32,
            "test_examples": 32,
            "sanity": False,
            "select": "best",
        },
    )
    code, _, err = run_main(["run", str(recipe), "-q", "--no-track"], capsys)
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def test_resuming_a_finished_run_or_an_older_checkpoint_is_refused(finished_run, capsys):
    before = snapshot(finished_run)
    code, _, err = run_main(["resume", str(finished_run), "-q", "--no-track"], capsys)
    assert code == 2
    line = one_error(err)
    assert "finished run" in line and "--fork" in line
    code, _, err = run_main(
        ["resume", str(finished_run / BEST_CHECKPOINT_NAME), "-q", "--no-track"], capsys
    )
    assert code == 2 and "--fork" in one_error(err)
    assert snapshot(finished_run) == before


def test_an_older_checkpoint_of_an_unfinished_run_is_refused(finished_run, capsys):
    # Unfinish the run: as if it had been interrupted after its last checkpoint.
    (finished_run / "eval.json").unlink()
    best = ckpt.load(finished_run / BEST_CHECKPOINT_NAME)
    last = ckpt.load(finished_run / CHECKPOINT_NAME)
    older = finished_run / "checkpoint-copy.pt"
    ckpt.save_atomic({**last, "step": STEPS_PER_EPOCH, "epoch": 1}, older)
    before = snapshot(finished_run)
    code, _, err = run_main(["resume", str(older), "-q", "--no-track"], capsys)
    assert code == 2
    line = one_error(err)
    assert f"(step {STEPS_PER_EPOCH}) is not the latest checkpoint" in line
    assert f"is at step {last['step']}" in line and "--fork" in line
    assert snapshot(finished_run) == before
    if best["step"] != last["step"]:
        code, _, err = run_main(
            ["resume", str(finished_run / BEST_CHECKPOINT_NAME), "-q", "--no-track"], capsys
        )
        assert code == 2 and "not the latest" in one_error(err)


def test_fork_starts_a_linked_run_and_leaves_the_original_alone(
    finished_run, tmp_path, capsys, monkeypatch
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = snapshot(finished_run)
    source = finished_run / BEST_CHECKPOINT_NAME
    code, _, err = run_main(
        ["resume", str(source), "--fork", "-q", "--set", "tracking.backend='mlflow'"], capsys
    )
    assert code == 0, err
    assert snapshot(finished_run) == before
    (fork_dir,) = [d for d in (tmp_path / "runs").iterdir() if d != finished_run]
    link = json.loads((fork_dir / "forked_from.json").read_text())
    assert link["checkpoint"] == str(source.resolve()) and link["run_id"] is None
    assert (fork_dir / "eval.json").is_file() and (fork_dir / CHECKPOINT_NAME).is_file()

    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("artplug").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["artplug.forked_from_checkpoint"] == str(source.resolve())
    assert run.data.tags["artplug.forked_from"] == ""  # the original was not tracked


def test_a_max_steps_run_can_be_continued_and_its_evaluation_is_kept(tmp_path, run_tmp, capsys):
    recipe = write_recipe(tmp_path / "r.toml", run={"name": "smoke", "epochs": 2, "log_every": 5})
    code, _, err = run_main(
        ["run", str(recipe), "-q", "--no-track", "--max-steps", str(STEPS_PER_EPOCH)], capsys
    )
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    smoke = (run_dir / "eval.json").read_bytes()
    assert json.loads(smoke)["training_complete"] is False
    code, _, err = run_main(["resume", str(run_dir), "-q", "--no-track"], capsys)
    assert code == 0, err
    assert (run_dir / f"eval.step-{STEPS_PER_EPOCH}.json").read_bytes() == smoke
    assert json.loads((run_dir / "eval.json").read_text())["training_complete"] is True


class RecordingTracker(NullTracker):
    """A tracker that remembers what it was sent (run id fixed, as a resumed MLflow run)."""

    def __init__(self) -> None:
        self.run_id = "run-1"
        self.logged: list[tuple[int, str]] = []

    def log_metrics(self, metrics, step):
        self.logged += [(step, key) for key in metrics]


def test_resume_logs_each_step_once(plugin_set, tmp_path):
    recipe = resolve(
        digits_recipe(run={"name": "t", "epochs": 2, "log_every": 5}), plugin_set.registries
    )
    run_dir = tmp_path / "run"
    first = RecordingTracker()
    train_and_evaluate(build(recipe), first, run_dir=run_dir, max_steps=STEPS_PER_EPOCH)
    payload = ckpt.load(run_dir / CHECKPOINT_NAME, purpose="resume")
    # A process killed in epoch 2 had logged two windows after the checkpoint, and a line
    # cut in half by the kill.
    with (run_dir / "metrics.jsonl").open("a") as handle:
        for step in (20, 25):
            handle.write(json.dumps({"step": step, "train/loss": 9.0, "train/lr": 0.05}) + "\n")
        handle.write('{"step": 30, "train/lo')
    second = RecordingTracker()
    second.logged = [(20, "train/loss"), (20, "train/lr"), (25, "train/loss"), (25, "train/lr")]
    train_and_evaluate(build(recipe), second, run_dir=run_dir, resume_from=payload)
    assert len(second.logged) == len(set(second.logged))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pairs = [(r["step"], k) for r in lines for k in r if k != "step"]
    assert len(pairs) == len(set(pairs))
    assert all(r.get("train/loss") != 9.0 for r in lines)  # the replay's values replaced them


def test_runs_started_in_the_same_second_get_distinct_folders(plugin_set, tmp_path, monkeypatch):
    recipe = resolve(
        digits_recipe(run={"name": "same", "out_dir": str(tmp_path / "runs")}),
        plugin_set.registries,
    )

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(engine, "datetime", FrozenClock)
    barrier = threading.Barrier(8)
    made: list[Path] = []
    errors: list[BaseException] = []

    def start():
        barrier.wait()
        try:
            made.append(make_run_dir(recipe))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)
    assert sorted(p.name for p in made)[0] == "same-20300102-030405"


def test_a_run_that_fails_before_training_leaves_no_run_folder(tmp_path, run_tmp, capsys):
    recipe = write_recipe(
        tmp_path / "r.toml",
        data={"dataset": "cifar10", "root": str(tmp_path / "no-data"), "batch_size": 64},
    )
    code, _, err = run_main(["run", str(recipe), "-q", "--no-track"], capsys)
    assert code == 2 and one_error(err)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_failure_after_the_folder_was_made_removes_it(tmp_path, run_tmp, capsys, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ArtplugError("cannot start MLflow tracking at 'http://nowhere': refused")

    monkeypatch.setattr(engine, "start_tracking", unreachable)
    recipe = write_recipe(tmp_path / "r.toml")
    code, _, err = run_main(["run", str(recipe), "-q", "--no-track"], capsys)
    assert code == 2 and "cannot start MLflow tracking" in one_error(err)
    assert not list((tmp_path / "runs").iterdir())
