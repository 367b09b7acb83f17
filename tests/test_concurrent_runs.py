"""Concurrent runs never collide on the tracking store (issue 10, item 8, tracking part).

MLflow creates a new SQLite store's tables on first open; two runs doing that at once used to
fail one of them with "table ... already exists". And looking a run up must never create a
store as a side effect.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from artplug.recipe import dumps_toml
from artplug.testing import digits_recipe


def test_two_runs_started_together_in_a_folder_without_store_both_finish(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    recipe = tmp_path / "tiny.toml"
    raw = digits_recipe(
        run={"name": "together", "epochs": 1, "seed": 0, "log_every": 1, "threads": 1},
        tracking={"backend": "mlflow", "experiment": "concurrent", "log_model": False},
    )
    recipe.write_text(dumps_toml(raw))
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "artplug.cli", "run", str(recipe), "-q", "--max-steps", "2"]
    # MLflow's default store: sqlite:///mlflow.db in the working directory, created by a run.
    runs = [
        subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err.decode()[-3000:]

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("concurrent")
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 2
    assert {run.info.status for run in found} == {"FINISHED"}
    assert len({run.info.run_id for run in found}) == 2


@pytest.mark.parametrize("uri", [None, "sqlite:///elsewhere/mlflow.db"])
def test_eval_of_an_unknown_run_id_creates_no_store(
    uri: str | None, run_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from artplug.cli import main

    run_id = "0123456789abcdef0123456789abcdef"
    args = ["eval", run_id] + (["--tracking-uri", uri] if uri else [])
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert (
        line.startswith("Error:")
        and run_id in line
        and "no such MLflow run at tracking URI" in line
    )
    assert list(run_tmp.rglob("mlflow.db*")) == []
