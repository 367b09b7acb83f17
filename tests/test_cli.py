"""The command line: one-line errors with exit code 2, validate/list/schema, an end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from clitools import run_main, write_recipe

from artplug.cli import make_cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"


def test_validate_prints_the_resolved_recipe(capsys):
    code, out, _ = run_main(["validate", str(QUICKSTART)], capsys)
    assert code == 0
    assert out.startswith(f"# Resolved from {QUICKSTART}")
    assert '[perturbation]\nuse = "pgd"' in out and 'model_mode = "eval"' in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["validate", "missing.toml"], "Error: missing.toml: file not found"),
        (["validate", str(QUICKSTART), "--set", "optim.lr=oops"], "optim.lr: Input should be"),
        (["list", "widgets"], "Error: no technique named 'widgets'"),
        (["frobnicate"], "Error: No such command 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, needle, capsys):
    code, _, err = run_main(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("Warning:")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_traceback_flag_shows_the_exception(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "artplug", "--traceback", "validate", str(tmp_path / "x.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "Traceback" in done.stderr and "RecipeError" in done.stderr


def test_list_and_schema(plugin_set):
    runner = CliRunner()
    cli = make_cli(plugin_set)
    listing = runner.invoke(cli, ["list"])
    assert listing.exit_code == 0
    assert "Perturbations" in listing.output and "pgd" in listing.output
    assert "cyclic-lr" in listing.output and "[schedules]" in listing.output
    only = runner.invoke(cli, ["list", "schedule"])
    assert "pgd" not in only.output and "cosine-lr" in only.output
    schema = json.loads(runner.invoke(cli, ["schema"]).output)
    assert schema["title"] == "artplug recipe"


def test_run_without_tracking(tmp_path, run_tmp, capsys):
    recipe = write_recipe(tmp_path / "r.toml")
    code, out, err = run_main(["run", str(recipe), "--no-track", "--max-steps", "2"], capsys)
    assert code == 0, err
    assert "Test accuracy" in out and "clean" in out and "tracking is off" in out.lower()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "eval.json").is_file() and (run_dir / "checkpoint-last.pt").is_file()


def test_run_tracks_to_mlflow(tmp_path, run_tmp, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    recipe = write_recipe(
        tmp_path / "r.toml",
        run={"name": "tracked", "epochs": 2, "log_every": 2},
        tracking={"backend": "mlflow", "experiment": "cli-test"},
        eval={
            "attacks": ["clean"],
            "final_attacks": ["clean", "fgsm"],
            "n_examples": 32,
            "test_examples": 32,
        },
    )
    code, out, err = run_main(["run", str(recipe), "--quiet"], capsys)
    assert code == 0, err
    assert "mlflow ui" in out

    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cli-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["optim.lr"] == "0.05"
    assert run.data.params["perturbation.use"] == "pgd"
    assert "test/fgsm_acc" in run.data.metrics and "val/clean_acc" in run.data.metrics
    assert run.data.tags["artplug.techniques"] == "pgd + cross-entropy"
    assert "torch.version" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "epoch/train_loss")
    assert len(history) == 2
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.resolved.toml", "eval.json", "checkpoints"} <= names


def test_resume_continues_the_same_run_folder_and_mlflow_run(
    tmp_path, run_tmp, capsys, monkeypatch
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    recipe = write_recipe(
        tmp_path / "r.toml",
        run={"name": "resumable", "epochs": 2, "log_every": 5},
        tracking={"backend": "mlflow", "experiment": "resume-test"},
    )
    # 19 steps = one epoch of digits at batch 64: the run stops after its first checkpoint.
    code, _, err = run_main(["run", str(recipe), "-q", "--max-steps", "19"], capsys)
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    from artplug import checkpoint as ckpt

    first = ckpt.load(run_dir / "checkpoint-last.pt")
    assert first["epoch"] == 1 and first["tracking_run_id"]

    code, _, err = run_main(["resume", str(run_dir), "-q"], capsys)
    assert code == 0, err
    second = ckpt.load(run_dir / "checkpoint-last.pt")
    assert second["epoch"] == 2 and second["step"] == 38
    assert second["tracking_run_id"] == first["tracking_run_id"]
    assert list((tmp_path / "runs").iterdir()) == [run_dir]

    import mlflow

    run = mlflow.MlflowClient(uri).get_run(first["tracking_run_id"])
    assert run.info.status == "FINISHED"
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "epoch")
    assert sorted(m.value for m in history) == [1.0, 2.0]


def test_resume_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_main(["resume", str(tmp_path / "nothing.pt")], capsys)
    assert code == 2 and err.strip().startswith("Error: ") and "checkpoint not found" in err


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_technique_that_rejects_the_model_is_a_one_line_error(command, tmp_path, capsys):
    """A transform that rejects the model at build time (latent-sites naming a module the model
    does not have) is a user error: one Error line naming its place, exit 2, no training.
    validate finds it too, since it builds the model (on the CPU, without data)."""
    recipe = write_recipe(
        tmp_path / "sites.toml",
        run={"out_dir": str(tmp_path / "runs")},
        perturbation={"use": "slat"},
        transform=[{"use": "latent-sites", "sites": ["layer9"]}],
    )
    args = [command, str(recipe)] + (["--no-track", "-q"] if command == "run" else [])
    code, out, err = run_main(args, capsys)
    lines = [line for line in err.splitlines() if not line.startswith("Warning:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "transform[0] (latent-sites)" in lines[0] and "'layer9'" in lines[0], lines[0]
    assert "Traceback" not in err and not out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
