"""``[run] threads`` / ``--threads N`` and the busy-machine hint (issue 10, item 9)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from artplug import cli, engine
from artplug.engine import build
from artplug.errors import ArtplugError
from artplug.recipe import dumps_toml, resolve
from artplug.testing import digits_recipe


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """torch.set_num_threads is process-wide: give the other tests their thread count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class _Stop(ArtplugError):
    """Raised by the stand-in for engine.fit: the test needs the run only up to training."""


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace engine.fit with a recorder of torch's thread count when training would start."""
    record: dict[str, Any] = {}

    def fit(*args: Any, **kwargs: Any) -> None:
        record["threads"] = torch.get_num_threads()
        raise _Stop("stopped by the test before training")

    monkeypatch.setattr(engine, "fit", fit)
    return record


def _load(monkeypatch: pytest.MonkeyPatch, load: float, cores: int = 2) -> None:
    monkeypatch.delenv("ARTPLUG_NO_BUSY_HINT", raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(cli.os, "cpu_count", lambda: cores)


def artplug_run(tmp_path: Path, *args: str, run: dict[str, Any] | None = None) -> tuple[int, str]:
    """``artplug run`` of a small digits recipe, in-process: (exit code, stderr)."""
    recipe = tmp_path / "recipe.toml"
    table = {"name": "threads", "epochs": 1, "out_dir": str(tmp_path / "runs"), **(run or {})}
    recipe.write_text(dumps_toml(digits_recipe(run=table)))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            cli.main(["run", str(recipe), "--no-track", "-q", *args])
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue()
    return 0, err.getvalue()


def test_run_threads_sets_torch_threads_during_the_run(tmp_path, seen, monkeypatch):
    _load(monkeypatch, 0.0)
    torch.set_num_threads(2)
    code, err = artplug_run(tmp_path, run={"threads": 1})
    assert code == 2 and "stopped by the test" in err
    assert seen["threads"] == 1


def test_threads_option_overrides_the_recipe(tmp_path, seen, monkeypatch):
    _load(monkeypatch, 0.0)
    torch.set_num_threads(2)
    code, _ = artplug_run(tmp_path, "--threads", "1", run={"threads": 2})
    assert code == 2 and seen["threads"] == 1


def test_no_threads_keeps_torch_default(plugin_set):
    torch.set_num_threads(2)
    recipe = resolve(digits_recipe(), plugin_set.registries)
    assert recipe.run.threads == 0
    build(recipe)
    assert torch.get_num_threads() == 2
    build(resolve(digits_recipe(run={"threads": 1}), plugin_set.registries))
    assert torch.get_num_threads() == 1


def test_busy_machine_prints_a_hint(tmp_path, seen, monkeypatch):
    _load(monkeypatch, 3.1, cores=2)
    torch.set_num_threads(2)
    code, err = artplug_run(tmp_path)
    assert code == 2
    hints = [line for line in err.splitlines() if line.startswith("hint:")]
    assert hints == [
        "hint: the machine is busy (load 3.1 on 2 cores); torch uses 2 threads per process; "
        "if other jobs are running, try --threads 1"
    ]


@pytest.mark.parametrize(
    ("load", "args"),
    [(1.5, ()), (3.1, ("--threads", "1"))],
    ids=["load below the core count", "already one thread"],
)
def test_no_hint_when_not_busy_or_single_threaded(tmp_path, seen, monkeypatch, load, args):
    _load(monkeypatch, load, cores=2)
    torch.set_num_threads(2)
    code, err = artplug_run(tmp_path, *args)
    assert code == 2 and "stopped by the test" in err
    assert "hint:" not in err


def test_threads_option_is_validated_like_the_recipe(tmp_path, monkeypatch):
    _load(monkeypatch, 0.0)
    code, err = artplug_run(tmp_path, "--threads", "100000")
    assert code == 2
    assert "run.threads: Input should be less than or equal to 1024" in err
    code, err = artplug_run(tmp_path, "--threads", "0")
    assert code == 2 and err.startswith("Error: Invalid value for '--threads'")
