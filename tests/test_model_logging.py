"""The trained model in MLflow: PyTorch flavour, signature, load_model gives the same classifier."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from torch import nn

from artplug.display import Display
from artplug.engine import build, start_tracking
from artplug.recipe import resolve
from artplug.testing import digits_recipe
from artplug.tracking import MlflowTracker, NullTracker
from artplug.workflows import log_trained_model, train_and_evaluate

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking._tracking_service import utils as tracking_utils  # noqa: E402


@pytest.fixture
def store() -> str:
    """The session's SQLite store (tests/conftest.py points MLFLOW_TRACKING_URI at it).

    Sharing it saves creating a database per test (MLflow's schema migrations take seconds);
    every test reads back only the runs it created.
    """
    return os.environ["MLFLOW_TRACKING_URI"]


def tracker_for(uri: str, tmp_path_factory: pytest.TempPathFactory) -> MlflowTracker:
    artifacts = tmp_path_factory.getbasetemp() / "model-logging-artifacts"
    return MlflowTracker("model-logging", "run", uri, artifact_location=str(artifacts))


def tracked_recipe(**tracking):
    raw = digits_recipe(run={"name": "logged", "epochs": 1, "log_every": 1})
    raw["tracking"] = {"backend": "mlflow", "experiment": "model-logging", **tracking}
    return raw


def test_fit_logs_a_loadable_model_with_a_signature(plugin_set, store, tmp_path, tmp_path_factory):
    c = build(resolve(tracked_recipe(), plugin_set.registries))
    tracker = tracker_for(store, tmp_path_factory)
    start_tracking(c, tracker, {})
    train_and_evaluate(c, tracker, run_dir=tmp_path / "run", max_steps=2)
    tracker.end()
    run_id = tracker.run_id
    uri = f"runs:/{run_id}/model"
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["mlflow_model"] == uri

    loaded = mlflow.pytorch.load_model(uri)
    assert not loaded.training
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    x = c.data.test[0][:16]
    with torch.no_grad():
        expected = c.model.eval()(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # Through pyfunc the signature is enforced: a float32 NCHW numpy batch in, logits out.
    predicted = mlflow.pyfunc.load_model(uri).predict(x.numpy())
    torch.testing.assert_close(torch.as_tensor(predicted), expected)
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 1, 8, 8)}}
    ]
    assert signature.outputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 10)}}
    ]

    client = mlflow.MlflowClient(store)
    run = client.get_run(run_id)
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "model" and logged.source_run_id == run_id
    assert logged.experiment_id == run.info.experiment_id
    # The other artifacts and metrics of issue 6 land in the same run.
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/training_curves.png", "plots/schedules.png"}
    assert run.data.metrics["cost/total_forward_per_example"] == 3.0  # pgd-2 + CE
    assert run.data.metrics["cost/attack_steps"] == 2.0
    assert run.data.params["tracking.log_model"] == "true"


def test_log_model_false_logs_no_model(plugin_set, store, tmp_path, tmp_path_factory):
    c = build(resolve(tracked_recipe(log_model=False), plugin_set.registries))
    tracker = tracker_for(store, tmp_path_factory)
    start_tracking(c, tracker, {})
    train_and_evaluate(c, tracker, run_dir=tmp_path / "run", max_steps=1)
    tracker.end()
    run = mlflow.MlflowClient(store).get_run(tracker.run_id)
    assert not run.outputs.model_outputs
    assert "mlflow_model" not in json.loads((tmp_path / "run" / "eval.json").read_text())


def test_a_model_changed_by_transforms_round_trips(plugin_set, store, tmp_path, tmp_path_factory):
    raw = digits_recipe(
        transform=[{"use": "hypersphere", "s": 10.0}],
        loss=[{"use": "he-margin", "m": 0.2}],
    )
    c = build(resolve(raw, plugin_set.registries))
    tracker = tracker_for(store, tmp_path_factory)
    tracker.start()
    c.model.train()
    uri = log_trained_model(c, tracker, Display(enabled=False))
    tracker.end()
    assert c.model.training  # the logged copy is put in eval mode, not the run's model
    # MLflow's global tracking URI was borrowed for the call and given back untouched.
    assert os.environ["MLFLOW_TRACKING_URI"] == store
    assert tracking_utils._tracking_uri is None
    assert uri == f"runs:/{tracker.run_id}/model"
    loaded = mlflow.pytorch.load_model(uri)
    # Pickled by reference: the plugin's classes come back from the installed artplug_plugins.
    assert type(loaded.fc).__module__ == "artplug_plugins.hypersphere"
    assert loaded.artplug_logit_scale == 10.0
    x = c.data.test[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), c.model.eval()(x), rtol=0, atol=0)


class Unpicklable(nn.Module):
    """A classifier holding a lock: neither pickle nor cloudpickle can serialize it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_a_model_that_cannot_be_logged_is_reported_and_tracking_goes_on(
    store, tmp_path_factory, capsys
):
    tracker = tracker_for(store, tmp_path_factory)
    tracker.start()
    assert tracker.log_model(Unpicklable().eval(), torch.rand(2, 1, 8, 8)) is None
    assert "the trained model was not logged to MLflow" in capsys.readouterr().err
    tracker.log_metrics({"after": 1.0}, step=1)
    tracker.end()
    run = mlflow.MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["after"] == 1.0


def test_null_tracker_logs_no_model():
    assert NullTracker().log_model(nn.Linear(2, 2), torch.zeros(1, 2)) is None
