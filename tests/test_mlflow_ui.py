"""The MLflow UI on an artplug store, photographed with headless Chromium.

One tiny tracked run, then ``mlflow server`` on a free 127.0.0.1 port, then Chromium's
``--screenshot`` (and ``--dump-dom``, in the same call) of the links artplug prints: the
experiment's runs table and the run's page. Skipped where Chromium is not installed
(``apt-get install chromium``). ``docs/img/make_screenshots.py`` makes the pictures of
docs/tracking.md the same way, with the assistant panel closed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from clitools import free_port

import artplug
from artplug.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    PLUGINS_TAG,
    VIEW_TAG,
    ui_links,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1400, 900

pytestmark = [
    pytest.mark.mlflow_server,
    pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)"),
]


def _load_screenshot_script() -> ModuleType:
    """docs/img/make_screenshots.py, which draws the docs' pictures of the same pages."""
    path = ROOT / "docs" / "img" / "make_screenshots.py"
    spec = importlib.util.spec_from_file_location("make_screenshots", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


screenshots = _load_screenshot_script()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A SQLite store holding one tiny tracked run: (uri, experiment id, run id)."""
    import mlflow

    folder = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = artplug.train(
        ROOT / "recipes" / "quickstart.toml",
        overrides={
            "run.out_dir": str(folder / "runs"),
            "eval.test_examples": 30,
            "eval.final_attacks": ["clean", "fgsm", "pgd-20"],
            "eval.sanity": False,
            "tracking.log_model": False,
            "tracking.experiment": "ui-test",
        },
        max_steps=3,
        threads=1,
        quiet=True,
        tracking_uri=uri,
    )
    assert result.run_id is not None
    experiment_id = mlflow.MlflowClient(uri).get_run(result.run_id).info.experiment_id
    return uri, str(experiment_id), result.run_id


@pytest.fixture(scope="module")
def server(store: tuple[str, str, str]) -> Iterator[str]:
    """``mlflow server`` over the store on a free port; its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store[0]),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: its workers stop with it
    )
    try:
        screenshots.wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120.0)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _shoot(url: str, png: Path) -> str:
    """Chromium's screenshot of ``url`` into ``png``; the page's DOM, as rendered."""
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            *(CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"),
            *(f"--screenshot={png}", "--dump-dom", f"--window-size={WIDTH},{HEIGHT}"),
            *("--virtual-time-budget=15000", url),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and raw (filtered) scanlines of an 8-bit RGB/RGBA PNG, stdlib only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        if kind == b"IDAT":
            chunks.append(data[at + 8 : at + 8 + length])
        at += 12 + length
    return width, height, zlib.decompress(b"".join(chunks))


def _assert_not_blank(path: Path) -> None:
    width, height, raw = _png_pixels(path)
    assert (width, height) == (WIDTH, HEIGHT)
    # A blank (one-colour) page compresses to almost nothing and its scanlines repeat; a
    # rendered page has text: many distinct scanlines.
    stride = len(raw) // height
    lines = {raw[i * stride + 1 : (i + 1) * stride] for i in range(height)}
    assert len(lines) > 100, f"{path} looks blank ({len(lines)} distinct rows)"


def test_the_store_is_arranged_for_the_ui(store: tuple[str, str, str]) -> None:
    import mlflow

    uri, experiment_id, run_id = store
    client = mlflow.MlflowClient(uri)
    tags = client.get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    view = json.loads(tags[VIEW_TAG])
    assert view["selectedColumns"][:5] == [
        "metrics.`test/clean_acc`",
        "metrics.`test/worst_acc`",
        "tags.`artplug.sanity`",
        "tags.`artplug.techniques`",
        "attributes.`Description`",
    ]
    run = client.get_run(run_id)
    assert run.data.tags[NOTE_TAG].startswith("pgd + cross-entropy · digits (small-cnn)")
    assert "test, 30 examples: clean" in run.data.tags[NOTE_TAG]
    # One tag for all plugins, not one per plugin.
    assert not any(key.startswith("artplug.plugin.") for key in run.data.tags)
    assert "pgd_at==" in run.data.tags[PLUGINS_TAG]
    assert {"test/clean_acc", "test/fgsm_acc", "test/pgd-20_acc", "test/worst_acc"} <= set(
        run.data.metrics
    )


def test_the_runs_table_and_the_run_page_render(
    store: tuple[str, str, str], server: str, tmp_path: Path
) -> None:
    _, experiment_id, run_id = store
    run_link, table = ui_links(server, experiment_id, run_id)

    dom = _shoot(table, tmp_path / "runs.png")
    _assert_not_blank(tmp_path / "runs.png")
    # The "Model training" runs table, with artplug's columns (not the GenAI overview).
    assert "test/clean_acc" in dom and "test/worst_acc" in dom
    assert "Runs" in dom and "quickstart-pgd-at-digits" in dom

    dom = _shoot(run_link, tmp_path / "run.png")
    _assert_not_blank(tmp_path / "run.png")
    assert "test, 30 examples: clean" in dom  # the description, with the results
    assert "artplug.techniques" in dom
