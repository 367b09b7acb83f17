"""Tests of artplug.tracking against a throw-away local sqlite MLflow store (no network)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from artplug.errors import ArtplugError
from artplug.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    flatten,
    provenance_tags,
    sanitize_key,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One sqlite store for the module: creating its tables takes about a second."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db", root / "artifacts"


def make_tracker(store: tuple[str, Path], experiment: str, run: str = "run") -> MlflowTracker:
    uri, artifacts = store
    return MlflowTracker(experiment, run, uri, artifact_location=str(artifacts / experiment))


def test_full_run_is_recorded(store: tuple[str, Path], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    tracker = make_tracker(store, "full", run="pgd-at")
    assert tracker.run_id is None
    tracker.start()
    assert tracker.run_id is not None
    recipe = {
        "run": {"name": "pgd-at", "seed": 0, "resume": None, "amp": True},
        "optim": {"lr": 0.1, "milestones": [100, 150]},
        "loss": [{"use": "ce", "weight": 1.0}, {"use": "trades", "beta": 6.0}],
        "note": "x" * 7000,
        "bad:key": 1,
        "wide": {f"p{i}": i for i in range(150)},  # > 100 params: several log_batch calls
    }
    tracker.log_params(recipe)
    for step in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "eval/pgd-20": 0.1 * step}, step=step)
    tracker.set_tags({"threat": "linf 8/255", "artplug.plugin.x": "1.0"})
    report = tmp_path / "eval.json"
    report.write_text('{"clean": 0.9}')
    tracker.log_artifact(report, artifact_path="eval")
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "curve.txt").write_text("...")
    tracker.log_artifact(folder, artifact_path="plots")
    tracker.end("FINISHED")
    tracker.end("FAILED")  # idempotent: the first status stays

    client = MlflowClient(tracking_uri=store[0])
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "pgd-at"
    params = run.data.params
    assert len(params) == 4 + 2 + 4 + 1 + 1 + 150
    assert params["run.seed"] == "0"
    assert params["run.resume"] == "None"
    assert params["run.amp"] == "true"
    assert params["optim.milestones"] == "[100, 150]"
    assert params["loss.1.beta"] == "6.0"
    assert params["wide.p149"] == "149"
    assert params["bad_key"] == "1"
    assert len(params["note"]) == 6000 and params["note"].endswith("...")
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert run.data.metrics["eval/pgd-20"] == pytest.approx(0.2)
    assert run.data.tags["threat"] == "linf 8/255"
    assert run.data.tags["mlflow.runName"] == "pgd-at"
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id, "eval")}
    assert artifacts == {"eval/eval.json"}
    assert {a.path for a in client.list_artifacts(tracker.run_id, "plots")} == {"plots/curve.txt"}

    line = tracker.describe()
    assert "\n" not in line
    assert tracker.run_id in line and "'full'" in line
    assert f"mlflow ui --backend-store-uri {store[0]}" in line


def test_existing_experiment_is_reused(store: tuple[str, Path]) -> None:
    first, second = make_tracker(store, "shared"), make_tracker(store, "shared")
    first.start()
    second.start()
    assert first.experiment_id == second.experiment_id
    assert first.run_id != second.run_id
    for tracker in (first, second):
        tracker.end()


def test_backend_failure_after_start_warns_once(
    store: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    tracker = make_tracker(store, "flaky")
    tracker.start()
    capsys.readouterr()

    def gone(*args: object, **kwargs: object) -> None:
        raise ConnectionError("server went away")

    monkeypatch.setattr(MlflowClient, "log_batch", gone)
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.log_params({"a": 1})
    tracker.set_tags({"b": "2"})
    tracker.end("FINISHED")
    err = capsys.readouterr().err
    assert err.count("MLflow tracking stopped") == 1
    assert len(err.strip().splitlines()) == 1
    assert "server went away" in err
    assert "stopped early" in tracker.describe()


def test_rejected_value_does_not_stop_tracking(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    tracker = make_tracker(store, "rejected")
    tracker.start()
    tracker.log_params({"lr": 0.1})
    tracker.log_params({"lr": 0.2})  # MLflow params are immutable
    tracker.log_metrics({"train/loss": 0.5}, step=1)
    tracker.end()
    assert "rejected" in capsys.readouterr().err
    assert tracker.run_id is not None
    run = MlflowClient(tracking_uri=store[0]).get_run(tracker.run_id)
    assert run.data.params["lr"] == "0.1"
    assert run.data.metrics["train/loss"] == 0.5
    assert run.info.status == "FINISHED"


def test_unusable_store_is_a_one_line_user_error() -> None:
    with pytest.raises(ArtplugError, match="foo://nowhere") as info:
        MlflowTracker("e", "r", "foo://nowhere").start()
    assert "\n" not in info.value.one_line()
    assert "MLFLOW_TRACKING_URI" in str(info.value)


def test_deleted_experiment_is_a_user_error(store: tuple[str, Path]) -> None:
    from mlflow import MlflowClient

    first = make_tracker(store, "gone")
    first.start()
    first.end()
    assert first.experiment_id is not None
    MlflowClient(tracking_uri=store[0]).delete_experiment(first.experiment_id)
    with pytest.raises(ArtplugError, match=r"'gone'.*is deleted; restore it"):
        make_tracker(store, "gone").start()


def test_unreachable_server_fails_fast() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(ArtplugError, match=f"cannot reach the MLflow tracking server at '{uri}'"):
        MlflowTracker("e", "r", uri).start()


def test_logging_before_start_is_a_bug(store: tuple[str, Path]) -> None:
    tracker = make_tracker(store, "early")
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"a": 1.0}, step=0)
    tracker.end()  # nothing to end: no error
    assert "not started" in tracker.describe()


def test_default_uri_is_mlflows_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = MlflowTracker("env", "r", artifact_location=str(tmp_path / "a"))
    tracker.start()
    tracker.end()
    assert tracker.tracking_uri == uri
    assert (tmp_path / "env.db").exists()


def test_null_tracker_does_nothing(tmp_path: Path) -> None:
    tracker: Tracker = NullTracker()
    tracker.start()
    tracker.log_params({"a": {"b": 1}})
    tracker.log_metrics({"x": 1.0}, step=0)
    tracker.set_tags({"t": "v"})
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.end("FAILED")
    tracker.end()
    assert tracker.run_id is None
    assert "off" in tracker.describe()


def test_mlflow_tracker_satisfies_protocol() -> None:
    tracker: Tracker = MlflowTracker("e", "r", "sqlite:///unused.db")  # mypy checks this line
    assert tracker.run_id is None


def test_flatten() -> None:
    nested = {
        "run": {"name": "x", "seed": 3, "resume": None, "amp": False},
        "optim": {"lr": 0.1, "betas": [0.9, 0.999], "extra": {}},
        "loss": [{"use": "ce"}, {"use": "trades", "beta": 6.0, "ids": ["a", "b"]}],
        "schedule": [],
        "mixed": [{"a": 1}, 2],
        "eps": 8 / 255,
        "path": Path("/data"),
    }
    assert flatten(nested) == {
        "run.name": "x",
        "run.seed": "3",
        "run.resume": "None",
        "run.amp": "false",
        "optim.lr": "0.1",
        "optim.betas": "[0.9, 0.999]",
        "optim.extra": "{}",
        "loss.0.use": "ce",
        "loss.1.use": "trades",
        "loss.1.beta": "6.0",
        "loss.1.ids": '["a", "b"]',
        "schedule": "[]",
        "mixed.0.a": "1",
        "mixed.1": "2",
        "eps": repr(8 / 255),
        "path": "/data",
    }
    assert flatten({"lr": 1}, prefix="optim") == {"optim.lr": "1"}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("train/loss", "train/loss"),
        ("eval/pgd-20 acc.top1", "eval/pgd-20 acc.top1"),
        ("a:b|c", "a_b_c"),
        ("/a//b/", "a/b"),
        ("a/../b", "a/_/b"),
        ("", "_"),
        ("k" * 300, "k" * 250),
    ],
)
def test_sanitize_key(key: str, expected: str) -> None:
    assert sanitize_key(key) == expected


def test_provenance_tags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    from artplug import __version__

    tags = provenance_tags(device="cpu", plugins={"artplug-trades": "0.3.1"})
    assert tags["artplug.version"] == __version__
    # One tag for every plugin (not one per plugin): "name==version, ..." sorted by name.
    assert tags["artplug.plugins"] == "artplug-trades==0.3.1"
    assert not any(key.startswith("artplug.plugin.") for key in tags)
    two = provenance_tags(device="cpu", plugins={"b-plugin": "2.0", "a-plugin": "1.0"})
    assert two["artplug.plugins"] == "a-plugin==1.0, b-plugin==2.0"
    assert tags["torch.version"] == torch.__version__
    assert tags["torch.cuda"] == (torch.version.cuda or "none")
    assert tags["device"] == "cpu"

    monkeypatch.chdir(tmp_path)  # not a git repository
    assert not any(key.startswith("git.") for key in provenance_tags(device="cpu", plugins={}))

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    try:
        subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available")
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True, timeout=30)
    (tmp_path / "mlflow.db").write_text("")  # untracked files do not make a tree dirty
    tags = provenance_tags(device="cpu", plugins={})
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert tags["git.commit"] == tags["mlflow.source.git.commit"] == head.strip()
    assert tags["git.dirty"] == "false"
    (tmp_path / "a.txt").write_text("2")
    assert provenance_tags(device="cpu", plugins={})["git.dirty"] == "true"


def test_import_does_not_pull_in_mlflow() -> None:
    code = "import sys, artplug.tracking\nassert 'mlflow' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
