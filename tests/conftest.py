"""Shared fixtures come from artplug.testing, the same helpers third-party plugins use."""

import pytest

pytest_plugins = ["artplug.testing"]


def pytest_configure(config: pytest.Config) -> None:
    """Markers of this suite beyond pyproject's (--strict-markers rejects unknown ones)."""
    config.addinivalue_line(
        "markers",
        "mlflow_server: starts a real `mlflow server` (tests/test_mlflow_server.py); in the "
        "default run, select it alone with -m mlflow_server",
    )


@pytest.fixture(autouse=True)
def _mlflow_store_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep every MLflow store a test creates out of the working tree."""
    store = tmp_path_factory.getbasetemp() / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
