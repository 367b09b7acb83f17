"""Against a real tracking server: `mlflow server` on 127.0.0.1 (SQLite backend, local artifact
folder) started by the test, a digits run logged to it over HTTP, and everything read back
through the MLflow client: params, metrics, artifacts, the logged model, `artplug compare`."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import free_port, run_main

from artplug.recipe import dumps_toml
from artplug.testing import digits_recipe

MLFLOW = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 180.0  # it starts in ~20 s on 2 busy CPU cores (the SQLite tables: ~10 s)
EXPERIMENT = "server-test"

# In the default run (about 45 s on 2 CPU cores); `pytest -m mlflow_server` runs it alone.
pytestmark = pytest.mark.mlflow_server


def wait_healthy(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen[bytes]) -> None:
    """End the server and the workers it started (its own process group), politely first."""
    if server.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=15)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh `mlflow server` for this module; killed at the end whatever happens."""
    if not MLFLOW.is_file():
        pytest.skip(f"no mlflow executable next to the Python interpreter ({MLFLOW})")
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    log = root / "server.log"
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
    with log.open("wb") as sink:
        # A session of its own, so that stop() reaches the uvicorn worker too.
        server = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=root,
            # The background job runner (a dozen huey worker processes, for MLflow's GenAI jobs)
            # doubles the start-up time and is not needed to track runs.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, log)
        yield url
    finally:
        stop(server)


def test_digits_run_over_http(server_url, plugin_set, run_tmp, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)  # instead of conftest's SQLite file
    recipe = run_tmp / "server.toml"
    raw = digits_recipe(
        run={"name": "over-http", "epochs": 1, "seed": 0, "log_every": 2},
        eval={
            "every_epochs": 1,
            "attacks": ["clean"],
            "final_attacks": ["clean", "fgsm"],
            "n_examples": 32,
            "test_examples": 32,
            "sanity": False,
        },
        tracking={"backend": "mlflow", "experiment": EXPERIMENT},
    )
    recipe.write_text(dumps_toml(raw))
    code, out, err = run_main(["run", str(recipe), "-q", "--max-steps", "4"], capsys)
    assert code == 0, err
    assert f"{server_url}/#/experiments/" in out  # the run's link in the MLflow UI

    client = MlflowClient(server_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "over-http"
    # Params: the flattened resolved recipe.
    params = run.data.params
    assert params["optim.lr"] == "0.05" and params["perturbation.use"] == "pgd"
    assert params["data.dataset"] == "digits" and params["threat.eps"] == "0.1"
    # Metrics: the final evaluation, time, the validation history.
    metrics = run.data.metrics
    assert 0.0 <= metrics["test/clean_acc"] <= 1.0 and 0.0 <= metrics["test/fgsm_acc"] <= 1.0
    assert metrics["time/wall_s"] > 0
    assert [m.value for m in client.get_metric_history(run_id, "epoch")] == [1.0]
    assert len(client.get_metric_history(run_id, "val/clean_acc")) == 1
    assert run.data.tags["artplug.techniques"] == "pgd + cross-entropy"
    # Artifacts: served by the server from its artifact folder.
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"recipe.resolved.toml", "eval.json", "metrics.jsonl", "checkpoints"} <= names
    checkpoints = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert "checkpoints/checkpoint-last.pt" in checkpoints
    downloaded = Path(client.download_artifacts(run_id, "recipe.resolved.toml", str(run_tmp)))
    (run_dir,) = (run_tmp / "runs").iterdir()
    local = (run_dir / "recipe.resolved.toml").read_text()
    assert tomllib.loads(downloaded.read_text()) == tomllib.loads(local)

    # The logged model: a working classifier with an input signature.
    import mlflow
    import mlflow.pytorch
    import torch

    from artplug import checkpoint as ckpt
    from artplug.engine import build, load_weights
    from artplug.recipe import resolve

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)  # runs:/ resolves through it
    model_uri = f"runs:/{run_id}/model"
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature is not None and info.signature.inputs is not None
    loaded = mlflow.pytorch.load_model(model_uri)
    payload = ckpt.load(run_dir / "checkpoint-last.pt")
    components = build(resolve(payload["recipe"], plugin_set.registries))
    load_weights(components, payload, "checkpoint-last.pt")
    x = components.data.test[0][:16].cpu()
    reference = components.model.cpu().eval()
    with torch.no_grad():
        logits = loaded(x)
        assert logits.shape == (16, 10)
        torch.testing.assert_close(logits, reference(x))

    # artplug compare reads the same numbers back from the server.
    code, out, err = run_main(
        ["compare", EXPERIMENT, "--format", "csv", "--no-chart", "--tracking-uri", server_url],
        capsys,
    )
    assert code == 0, err
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["run_id"] == run_id and row["name"] == "over-http"
    assert float(row["clean_acc"]) == metrics["test/clean_acc"]
    assert float(row["fgsm_acc"]) == metrics["test/fgsm_acc"]
    assert row["dataset"] == "digits" and row["threat"] == "linf 0.1"
