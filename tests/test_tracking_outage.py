"""A tracking outage costs no training time and loses no record (issue 10, item 6).

The fast tests use a throw-away SQLite store and make the MLflow client fail on purpose; the
last one kills a real `mlflow server` in the middle of a training run, restarts it and checks
that `artplug sync` leaves the server with exactly what the run folder holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import free_port

from artplug.errors import ArtplugError
from artplug.tracking import JOURNAL_NAME, MlflowTracker, read_journal, sync_run

MLFLOW = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 180.0  # about 20 s on 2 busy CPU cores


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/store/mlflow.db"


def make_run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    return run_dir


def log(tracker: MlflowTracker, run_dir: Path, metrics: dict[str, float], step: int) -> None:
    """What the engine does: metrics.jsonl first-hand, then the tracker."""
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as sink:
        sink.write(json.dumps({"step": step, **metrics}) + "\n")
    tracker.log_metrics(metrics, step)


def history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    keys = client.get_run(run_id).data.metrics
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in keys
    }


def local_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        for key, value in record.items():
            found.setdefault(key, []).append((step, float(value)))
    return {key: sorted(values) for key, values in found.items()}


class Outage:
    """Makes every MLflow client call that writes fail, like a dead server; counts the tries."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from mlflow import MlflowClient

        self.calls = 0
        self.monkeypatch = monkeypatch
        for name in ("log_batch", "log_artifact", "log_artifacts", "set_terminated", "get_run"):
            monkeypatch.setattr(MlflowClient, name, self.fail)

    def fail(self, *args: object, **kwargs: object) -> None:
        self.calls += 1
        raise ConnectionError("Connection refused")

    def end(self) -> None:
        self.monkeypatch.undo()


def test_outage_warns_once_skips_calls_and_sync_sends_the_rest_once(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = make_run_dir(tmp_path)
    (run_dir / "eval.json").write_text('{"accuracy": {"clean": 0.5}}')
    tracker = MlflowTracker("outage", "r", store)
    tracker.attach_run_dir(run_dir)
    tracker.start()
    assert tracker.run_id is not None
    tracker.log_params({"optim": {"lr": 0.1}})
    tracker.set_tags({"artplug.techniques": "pgd"})
    log(tracker, run_dir, {"train/loss": 2.0, "epoch": 1.0}, 10)

    outage = Outage(monkeypatch)
    log(tracker, run_dir, {"train/loss": 1.5, "epoch": 2.0}, 20)
    log(tracker, run_dir, {"train/loss": float("nan")}, 25)
    tracker.set_tags({"artplug.checkpoint.used": "checkpoint-last.pt"})
    tracker.log_artifact(run_dir / "eval.json")
    assert outage.calls == 1  # the circuit breaker: one failed call, then none
    tracker.end("FINISHED")  # tries to send what is missing: still down
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert "offline" in line and f"artplug sync {run_dir}" in line
    assert f"artplug sync {run_dir}" in tracker.describe()
    outage.end()

    # The server is back: sync sends exactly what it lacks.
    result = sync_run(run_dir)
    assert result.run_id == tracker.run_id and not result.created
    assert result.metrics == 3 and result.tags == 1 and result.params == 0
    assert result.artifacts == 1 and result.status == "FINISHED"
    from mlflow import MlflowClient

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.1"
    assert run.data.tags["artplug.checkpoint.used"] == "checkpoint-last.pt"
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"eval.json"}
    synced = history(store, tracker.run_id)
    nan = synced["train/loss"].pop()
    assert nan[0] == 25 and nan[1] != nan[1]
    assert synced == {"train/loss": [(10, 2.0), (20, 1.5)], "epoch": [(10, 1.0), (20, 2.0)]}

    # Twice: nothing is sent again, no metric value is duplicated.
    again = sync_run(run_dir)
    assert (again.metrics, again.params, again.tags, again.artifacts) == (0, 0, 0, 0)
    assert again.status is None
    assert len(history(store, tracker.run_id)["train/loss"]) == 3
    assert [r["event"] for r in read_journal(run_dir)][-2:] == ["sync", "sync"]


def test_the_run_sends_what_it_missed_when_the_store_is_back_at_its_end(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = make_run_dir(tmp_path)
    tracker = MlflowTracker("outage", "r", store)
    tracker.attach_run_dir(run_dir)
    tracker.start()
    assert tracker.run_id is not None
    outage = Outage(monkeypatch)
    log(tracker, run_dir, {"train/loss": 1.0}, 1)
    tracker.log_params({"a": 1})
    outage.end()
    tracker.end("KILLED")
    err = capsys.readouterr().err
    assert "back online" in err and "1 metric values, 1 params" in err
    run = __import__("mlflow").MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.params["a"] == "1"
    assert "offline" not in tracker.describe()


def test_breaker_tries_again_after_a_while(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = MlflowTracker("outage", "r", store)
    tracker.start()
    outage = Outage(monkeypatch)
    tracker.log_metrics({"x": 1.0}, 1)
    tracker.log_metrics({"x": 2.0}, 2)
    assert outage.calls == 1
    tracker._retry_at = 0.0  # the retry window has passed
    tracker.log_metrics({"x": 3.0}, 3)
    assert outage.calls == 2
    outage.end()
    tracker._retry_at = 0.0
    tracker.log_metrics({"x": 4.0}, 4)  # back online: sent again
    assert tracker.run_id is not None
    assert history(store, tracker.run_id)["x"] == [(4, 4.0)]


def test_sync_creates_the_run_in_a_store_that_never_had_it(tmp_path: Path, store: str) -> None:
    run_dir = make_run_dir(tmp_path)
    tracker = MlflowTracker("made-by-sync", "moved-run", store, tags={"k": "v"})
    tracker.attach_run_dir(run_dir)
    tracker.start()
    tracker.log_params({"lr": 0.1})
    log(tracker, run_dir, {"test/clean_acc": 0.75}, 3)
    tracker.end("FINISHED")
    other = f"sqlite:///{tmp_path}/other/mlflow.db"
    (tmp_path / "other").mkdir()
    result = sync_run(run_dir, tracking_uri=other)
    assert result.created and result.run_id != tracker.run_id
    assert (result.metrics, result.params, result.status) == (1, 1, "FINISHED")
    from mlflow import MlflowClient

    run = MlflowClient(other).get_run(result.run_id)
    assert run.info.run_name == "moved-run" and run.data.tags["k"] == "v"
    assert run.data.metrics == {"test/clean_acc": 0.75} and run.data.params == {"lr": "0.1"}
    again = sync_run(run_dir, tracking_uri=other)
    assert again.run_id == result.run_id and not again.created and again.metrics == 0
    home = sync_run(run_dir)  # the store it was tracked in already has everything
    assert home.run_id == tracker.run_id and (home.metrics, home.params) == (0, 0)


def test_a_run_whose_tracking_never_started_leaves_no_journal(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    tracker = MlflowTracker("never", "r", "foo://nowhere")
    tracker.attach_run_dir(run_dir)
    with pytest.raises(ArtplugError):
        tracker.start()
    tracker.end("FAILED")
    assert list(run_dir.iterdir()) == []


def test_a_run_whose_process_died_becomes_failed(tmp_path: Path, store: str) -> None:
    run_dir = make_run_dir(tmp_path)
    tracker = MlflowTracker("died", "r", store)
    tracker.attach_run_dir(run_dir)
    tracker.start()
    assert tracker.run_id is not None
    # Rewrite the journal as if another process, now gone, had written it.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    records = read_journal(run_dir)
    records[0]["pid"] = int(gone.stdout)
    (run_dir / JOURNAL_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    result = sync_run(run_dir)
    assert result.status == "FAILED" and "without closing" in result.summary()
    from mlflow import MlflowClient

    assert MlflowClient(store).get_run(tracker.run_id).info.status == "FAILED"


def test_sync_refuses_a_run_in_progress(tmp_path: Path, store: str) -> None:
    run_dir = make_run_dir(tmp_path)
    tracker = MlflowTracker("live", "r", store)
    tracker.attach_run_dir(run_dir)
    tracker.start()
    records = read_journal(run_dir)
    records[0]["pid"] = os.getppid()  # alive: the process that started pytest
    (run_dir / JOURNAL_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ArtplugError, match="still in progress"):
        sync_run(run_dir)


def test_sync_of_a_folder_without_journal_is_one_error_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "artplug.cli", "sync", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error:") and JOURNAL_NAME in line


# -- a real server, killed in the middle of a run -------------------------------------------


def start_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    """`mlflow server` on 127.0.0.1:port with its SQLite store and artifacts in ``root``."""
    command = [
        str(MLFLOW),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    log = root / "server.log"
    with log.open("ab") as sink:
        server = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,  # kill() reaches the uvicorn worker too
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return server
        time.sleep(0.5)
    kill(server)
    pytest.fail(f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def kill(server: subprocess.Popen[bytes]) -> None:
    """Kill the server and its workers at once, the way a crash or an OOM kill does."""
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def epoch_lines(metrics: Path) -> list[dict[str, float]]:
    if not metrics.is_file():
        return []
    lines = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if "time/epoch_s" in record:
                lines.append(record)
    return lines


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for server in started:
        kill(server)


@pytest.mark.mlflow_server
def test_server_killed_mid_run_then_synced(
    tmp_path: Path, servers: list[subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    from artplug.cli import main
    from artplug.recipe import dumps_toml
    from artplug.testing import digits_recipe

    if not MLFLOW.is_file():
        pytest.skip(f"no mlflow executable next to the Python interpreter ({MLFLOW})")
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers.append(start_server(root, port))

    # Small batches and frequent logging: many tracking calls per epoch, epochs of ~1 s.
    epochs = 8
    recipe = tmp_path / "outage.toml"
    raw = digits_recipe(
        run={"name": "outage", "epochs": epochs, "seed": 0, "log_every": 5, "threads": 1},
        data={"dataset": "digits", "batch_size": 16},
        perturbation={"use": "pgd", "steps": 3},
        eval={
            "every_epochs": 0,
            "attacks": ["clean"],
            "final_attacks": ["clean"],
            "n_examples": 32,
            "test_examples": 32,
            "sanity": False,
        },
        tracking={"backend": "mlflow", "experiment": "outage", "log_model": False},
    )
    recipe.write_text(dumps_toml(raw))
    work = tmp_path / "work"
    work.mkdir()
    out, err = work / "stdout.txt", work / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        run = subprocess.Popen(
            [sys.executable, "-m", "artplug.cli", "run", str(recipe)],
            cwd=work,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1"},
        )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.poll() is None:
            folders = list((work / "runs").glob("*")) if (work / "runs").is_dir() else []
            if folders and len(epoch_lines(folders[0] / "metrics.jsonl")) >= 2:
                break
            time.sleep(0.05)
        assert run.poll() is None, f"the run ended before the kill:\n{err.read_text()[-3000:]}"
        (run_dir,) = folders
        kill(servers.pop())
        killed_after = len(epoch_lines(run_dir / "metrics.jsonl"))
        assert killed_after < epochs - 1, "the run went too fast to test the outage"
        code = run.wait(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    stderr_text = err.read_text()
    assert code == 0, stderr_text[-3000:]

    # The epochs after the kill took no longer than twice the slowest one before it.
    times = [line["time/epoch_s"] for line in epoch_lines(run_dir / "metrics.jsonl")]
    assert len(times) == epochs
    before, after = times[:killed_after], times[killed_after:]
    assert max(after) <= 2 * max(before), (before, after)
    # One warning line, that says the store is offline and how to send what it missed.
    (warning,) = [line for line in stderr_text.splitlines() if "offline" in line]
    assert "artplug sync " in warning and run_dir.name in warning

    # The server is back (same port, same store): sync sends what it lacks.
    servers.append(start_server(root, port))
    code = 0
    try:
        main(["sync", str(run_dir)])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "status FINISHED" in captured.out

    client = MlflowClient(url)
    (start,) = [r for r in read_journal(run_dir) if r["event"] == "start"]
    run_id = start["run_id"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    assert info.data.params["data.batch_size"] == "16"
    assert history(url, run_id) == local_history(run_dir)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"recipe.resolved.toml", "eval.json", "metrics.jsonl", "checkpoints"} <= names
