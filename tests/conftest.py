"""Shared fixtures come from artplug.testing, the same helpers third-party plugins use."""

import pytest

pytest_plugins = ["artplug.testing"]


@pytest.fixture(autouse=True)
def _mlflow_store_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep every MLflow store a test creates out of the working tree."""
    store = tmp_path_factory.getbasetemp() / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")


@pytest.fixture(autouse=True)
def _no_busy_hint(monkeypatch: pytest.MonkeyPatch):
    """The busy-machine hint depends on the load the suite itself makes; tests that check the
    hint clear this (tests/test_threads.py). Subprocess runs inherit it."""
    monkeypatch.setenv("ARTPLUG_NO_BUSY_HINT", "1")
