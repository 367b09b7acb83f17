"""Loading a checkpoint never runs code, and a malformed one gives one Error line (exit 2).

The crafted checkpoints here carry a pickle whose ``__reduce__`` calls ``exec`` or
``os.system`` to create a marker file: the attack ``torch.load(..., weights_only=False)`` falls
for. Each test checks that artplug refuses the file *and* that the marker was never written.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clitools import call

from artplug import checkpoint as ckpt
from artplug.engine import CHECKPOINT_NAME, build, restore
from artplug.errors import CheckpointError
from artplug.recipe import resolve
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate

FIX = "pass a checkpoint-*.pt file written by artplug"


def one_error(code: int, out: str, err: str) -> str:
    """The single ``Error:`` line of a refused command (exit 2, no traceback); returns it."""
    # MLflow draws a progress bar (carriage returns) while it downloads a run's artifacts.
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and not line.startswith(("Warning:", "Downloading artifacts:"))
    ]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in out + err
    return lines[0]


class RunsCode:
    """Unpickles as ``func(*args)``: what a crafted checkpoint uses to run code on load."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def write_malicious(path: Path, marker: Path, via: str = "exec") -> Path:
    """A checkpoint-shaped file whose unpickling creates ``marker``."""
    if via == "exec":
        bomb = RunsCode(exec, f"open({str(marker)!r}, 'w').write('code ran')")
    else:
        bomb = RunsCode(os.system, f"touch '{marker}'")
    payload = {
        "format_version": 1,
        "recipe": {"run": {"name": "innocent"}, "note": bomb},
        "model": {"weight": torch.zeros(1)},
        "epoch": 1,
        "step": 1,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def trained(plugin_set, tmp_path_factory) -> Path:
    """The run folder of a one-epoch digits run (format-2 checkpoint-last.pt)."""
    root = tmp_path_factory.mktemp("safety")
    recipe = resolve(
        digits_recipe(run={"name": "safe", "epochs": 2, "log_every": 100}), plugin_set.registries
    )
    # 19 steps: one epoch of digits at batch 64, then the run stops after its checkpoint.
    train_and_evaluate(build(recipe), run_dir=root / "run", max_steps=19)
    return root / "run"


def raw_payload(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)


def format_1(payload: dict[str, Any], path: Path) -> Path:
    """``payload`` written as artplug format 1 did: RNG states as Python and NumPy objects."""
    old = dict(payload, format_version=1)
    old["rng"] = dict(payload["rng"], python=random.getstate(), numpy=np.random.get_state())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(old, path)
    return path


# ------------------------------------------------------------------------------------------
# Crafted files run no code


def test_the_crafted_file_really_runs_code_when_unpickled(tmp_path):
    # Guards the tests below: the bomb works against a plain (unsafe) torch.load.
    marker = tmp_path / "MARKER"
    evil = write_malicious(tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("via", ["exec", "os.system"])
def test_eval_file_refuses_a_crafted_checkpoint(tmp_path, via):
    marker = tmp_path / "MARKER"
    evil = write_malicious(tmp_path / "evil.pt", marker, via)
    line = one_error(*call(["eval", str(evil), "--no-track", "-q"]))
    assert line.startswith(f"Error: {evil}: refused to load: the file needs pickle code execution")
    assert line.endswith("rerun with --allow-unsafe-pickle")
    assert not marker.exists()


def test_eval_run_folder_refuses_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "MARKER"
    write_malicious(tmp_path / "run" / "checkpoint-best.pt", marker)
    line = one_error(*call(["eval", str(tmp_path / "run"), "--no-track", "-q"]))
    assert "refused to load" in line
    assert not marker.exists()


def test_resume_refuses_a_crafted_checkpoint(tmp_path):
    marker = tmp_path / "MARKER"
    evil = write_malicious(tmp_path / "run" / CHECKPOINT_NAME, marker)
    for target in (evil, evil.parent):  # the file, and the run folder that holds it
        line = one_error(*call(["resume", str(target), "--no-track", "-q"]))
        assert line.startswith(f"Error: {evil}: refused to load: ")
        assert "--allow-unsafe-pickle" in line
    assert not marker.exists()


def test_eval_mlflow_run_id_refuses_a_crafted_checkpoint(tmp_path, run_tmp):
    import mlflow

    # run_tmp: the working directory is tmp_path, where the store keeps its artifacts.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("shared", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(experiment).info.run_id
    marker = tmp_path / "MARKER"
    evil = write_malicious(tmp_path / "upload" / CHECKPOINT_NAME, marker)
    client.log_artifact(run_id, str(evil), artifact_path="checkpoints")
    client.set_terminated(run_id)

    line = one_error(*call(["eval", run_id, "--tracking-uri", uri, "-q"]))
    assert line.startswith(f"Error: MLflow run {run_id} ({CHECKPOINT_NAME}): refused to load: ")
    assert line.endswith("rerun with --allow-unsafe-pickle")
    assert not marker.exists()


def test_load_refuses_without_running_code_even_for_api_callers(tmp_path):
    marker = tmp_path / "MARKER"
    evil = write_malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        ckpt.load(evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        ckpt.load(evil, purpose="resume")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# Format 2 round-trips; format 1 needs the opt-in


def test_a_new_checkpoint_is_plain_data_and_round_trips(trained, plugin_set):
    # weights_only=True succeeds: nothing in the file needs code to be rebuilt.
    payload = raw_payload(trained)
    assert payload["format_version"] == ckpt.FORMAT_VERSION == 2
    loaded = ckpt.load(trained / CHECKPOINT_NAME, purpose="resume")
    assert loaded["epoch"] == 1 and loaded["step"] == 19
    assert isinstance(loaded["rng"]["python"]["state"], list)
    assert isinstance(loaded["rng"]["numpy"]["key"], list)

    fresh = build(resolve(loaded["recipe"], plugin_set.registries))
    assert restore(fresh, loaded, "ckpt") == (1, 19)
    for name, tensor in fresh.model.state_dict().items():
        assert torch.equal(tensor, loaded["model"][name]), name


def test_rng_states_are_restored_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Cached Gaussians are part of the state too: leave one pending in Python and NumPy.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    python, numpy_state = random.getstate(), np.random.get_state()
    assert python[2] is not None and numpy_state[3] == 1
    ckpt.save_atomic({"rng": ckpt.rng_states()}, tmp_path / "rng.pt")
    expected = (
        [random.random() for _ in range(5)] + [random.gauss(0.0, 1.0)],
        np.random.standard_normal(5),
        torch.rand(5),
    )

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    states = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    ckpt.restore_rng_states(states)
    assert random.getstate() == python
    restored = np.random.get_state()
    assert restored[0] == numpy_state[0] and np.array_equal(restored[1], numpy_state[1])
    assert restored[2:] == numpy_state[2:]
    got = (
        [random.random() for _ in range(5)] + [random.gauss(0.0, 1.0)],
        np.random.standard_normal(5),
        torch.rand(5),
    )
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_resume_after_a_stop_is_bit_identical(plugin_set, tmp_path):
    # PGD's random start draws from torch's global generator: a wrong restore shows up.
    raw = digits_recipe(run={"name": "bits", "epochs": 2, "log_every": 100})
    recipe = resolve(raw, plugin_set.registries)
    straight = build(recipe)
    train_and_evaluate(straight, run_dir=tmp_path / "a")

    train_and_evaluate(build(recipe), run_dir=tmp_path / "b", max_steps=19)
    # A fresh process would start from other generator states: scramble them all.
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)
    payload = ckpt.load(tmp_path / "b" / CHECKPOINT_NAME, purpose="resume")
    resumed = build(recipe)
    train_and_evaluate(resumed, run_dir=tmp_path / "b", resume_from=payload)

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_format_1_checkpoint_needs_the_opt_in(trained, tmp_path):
    old = format_1(raw_payload(trained), tmp_path / "old" / CHECKPOINT_NAME)
    line = one_error(*call(["eval", str(old), "--no-track", "-q"]))
    assert f"{old}: refused to load: the file needs pickle code execution (it imports " in line
    assert "numpy" in line and "--allow-unsafe-pickle" in line
    line = one_error(*call(["resume", str(old), "--no-track", "-q"]))
    assert "refused to load" in line

    payload = ckpt.load(old, purpose="resume", allow_unsafe_pickle=True)
    assert payload["format_version"] == 1 and isinstance(payload["rng"]["numpy"], tuple)
    code, _, err = call(
        ["eval", str(old), "--allow-unsafe-pickle", "--no-track", "--out", str(tmp_path / "e")]
    )
    assert code == 0, err
    assert (tmp_path / "e" / "eval.json").is_file()


def test_resume_with_the_opt_in_migrates_a_format_1_run(trained, tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(trained, run_dir)
    format_1(raw_payload(trained), run_dir / CHECKPOINT_NAME)
    code, _, err = call(["resume", str(run_dir), "--allow-unsafe-pickle", "--no-track", "-q"])
    assert code == 0, err
    # The resumed run writes format 2: from now on the safe loader reads it.
    payload = raw_payload(run_dir)
    assert payload["format_version"] == 2 and payload["epoch"] == 2


def test_an_old_torch_without_a_safe_loader_is_refused(trained, monkeypatch):
    # torch < 2.6: weights_only=True could still run code (CVE-2025-32434).
    monkeypatch.setattr(ckpt, "SAFE_LOADER", False)
    with pytest.raises(CheckpointError, match=r"install torch>=2\.6, or rerun with --allow-unsafe"):
        ckpt.load(trained / CHECKPOINT_NAME)
    assert ckpt.load(trained / CHECKPOINT_NAME, allow_unsafe_pickle=True)["epoch"] == 1


def test_save_refuses_data_that_only_pickle_code_could_rebuild(tmp_path):
    target = tmp_path / "x.pt"
    with pytest.raises(TypeError, match=r"payload\.perturbation\.delta is a numpy\.ndarray"):
        ckpt.save_atomic({"perturbation": {"delta": np.zeros(3)}}, target)
    assert not target.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------
# Malformed checkpoints: one Error line, exit 2, no traceback


def _drop(key: str):
    return lambda p: {k: v for k, v in p.items() if k != key}


def _set(key: str, value: Any):
    return lambda p: {**p, key: value}


EVAL_CASES = {
    "recipe-not-a-table": (_set("recipe", "pgd.toml"), "'recipe' is a str, expected a table"),
    "format-version-a-string": (_set("format_version", "2"), "'format_version' is '2'"),
    "no-format-version": (_drop("format_version"), "no 'format_version'"),
    "newer-format": (_set("format_version", 99), "written by a newer artplug (format 99"),
    "no-recipe": (_drop("recipe"), "no 'recipe' entry"),
    "model-a-list": (_set("model", [1, 2]), "'model' is a list, expected a dict of tensors"),
    "model-not-tensors": (_set("model", {"w": "zeros"}), "'model' entry 'w' is a str"),
    "step-a-string": (_set("step", "19"), "'step' is '19', expected an int >= 0"),
    "not-a-dict": (lambda p: [p], "not an artplug checkpoint (it holds a list, not a dict)"),
}

RESUME_CASES = {
    **EVAL_CASES,
    "no-epoch": (_drop("epoch"), "no 'epoch' entry (resume needs it)"),
    "step-a-float": (_set("step", 19.0), "'step' is 19.0, expected an int >= 0"),
    "epoch-negative": (_set("epoch", -1), "'epoch' is -1"),
    "no-optimizer": (_drop("optimizer"), "no 'optimizer' entry"),
    "optimizer-a-list": (_set("optimizer", []), "'optimizer' is a list without 'state'"),
    "no-rng": (_drop("rng"), "no 'rng' entry"),
    "rng-no-numpy": (
        lambda p: {**p, "rng": {k: v for k, v in p["rng"].items() if k != "numpy"}},
        "'rng' has no 'numpy' state",
    ),
    "rng-python-short": (
        lambda p: {**p, "rng": {**p["rng"], "python": {**p["rng"]["python"], "state": [1, 2]}}},
        "'rng' has a malformed 'python' state",
    ),
    "scaler-a-string": (_set("scaler", "on"), "'scaler' is a str, expected a dict or None"),
}


def _broken(trained: Path, tmp_path: Path, change: Any) -> Path:
    path = tmp_path / "broken" / CHECKPOINT_NAME
    path.parent.mkdir(parents=True)
    # torch.save directly: save_atomic would stamp the current format over the broken one.
    torch.save(change(raw_payload(trained)), path)
    return path


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_of_a_malformed_checkpoint_is_one_error_line(trained, tmp_path, case):
    change, needle = EVAL_CASES[case]
    path = _broken(trained, tmp_path, change)
    line = one_error(*call(["eval", str(path), "--no-track", "-q"]))
    assert line.startswith(f"Error: {path}: ") and needle in line, line
    assert FIX in line or "upgrade artplug" in line


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_of_a_malformed_checkpoint_is_one_error_line(trained, tmp_path, case):
    change, needle = RESUME_CASES[case]
    path = _broken(trained, tmp_path, change)
    line = one_error(*call(["resume", str(path), "--no-track", "-q"]))
    assert line.startswith(f"Error: {path}: ") and needle in line, line
    assert FIX in line or "upgrade artplug" in line


def test_junk_and_missing_files_are_one_error_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for command in ("eval", "resume"):
        line = one_error(*call([command, str(junk), "--no-track", "-q"]))
        assert "not a readable checkpoint" in line and FIX in line
        line = one_error(*call([command, str(tmp_path / "none.pt"), "--no-track", "-q"]))
        assert "checkpoint not found" in line or "no such checkpoint" in line
