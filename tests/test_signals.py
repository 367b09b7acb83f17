"""SIGTERM is handled like SIGINT: a checkpoint at the step boundary, KILLED, a resume command.

The resume from the mid-epoch checkpoint continues with the next batch of the same seeded
epoch order, so the final weights equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

import artplug
from artplug import checkpoint as ckpt
from artplug.engine import CHECKPOINT_NAME, build
from artplug.interrupt import RunInterrupted, StopRequest, stop_on_signals
from artplug.plugins import load_plugins
from artplug.recipe import dumps_toml, resolve
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate

STEPS_PER_EPOCH = 19  # digits at batch 64
TESTS = Path(__file__).resolve().parent


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sleep_s: float = 0.0


# Set by a test: (the step at which to ask the run to stop, the request to set).
STOP_AT: list[tuple[int, StopRequest]] = []


class SlowCE:
    """Cross-entropy that can take its time (so a signal lands mid-run) or request a stop."""

    name = "slow-ce"
    Params = _Params
    needs = frozenset({"adv"})

    def __init__(self, params: _Params) -> None:
        self.params = params

    def __call__(self, out, state):
        if self.params.sleep_s:
            time.sleep(self.params.sleep_s)
        for at, stop in STOP_AT:
            if state.progress.step == at:
                stop.request(signal.SIGTERM)  # as the handler does between two steps
        return F.cross_entropy(out.logits_adv, out.y)


class SlowPlugin:
    @staticmethod
    @artplug.hookimpl
    def register_loss_terms(register):
        register(SlowCE)


def cli_main_with_slow_plugin(args: list[str]) -> None:
    """``artplug`` with SlowCE registered (the subprocess entry point of the tests below)."""
    import artplug.cli
    import artplug.plugins

    real = artplug.plugins.load_plugins
    artplug.cli.load_plugins = lambda **kw: real(extra=[("slow", SlowPlugin())], **kw)
    artplug.cli.main(args)


@pytest.fixture(scope="module")
def slow_registries():
    return load_plugins(disabled=(), extra=[("slow", SlowPlugin())], strict=True).registries


def slow_raw(sleep_s=0.0, **run):
    return digits_recipe(
        run={"name": "sig", "epochs": 2, "log_every": 3, **run},
        perturbation={"use": "pgd", "steps": 1},
        loss=[{"use": "slow-ce", "sleep_s": sleep_s}],
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ------------------------------------------------------------------------------------------
# The handler


def test_first_signal_sets_the_flag_second_interrupts_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    with stop_on_signals(stop), stop.deferred():
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(RunInterrupted) as caught:
            signal.raise_signal(signal.SIGINT)
    assert caught.value.exit_code == 130 and caught.value.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGTERM) is before
    assert RunInterrupted(signal.SIGTERM).exit_code == 143
    assert isinstance(RunInterrupted(signal.SIGTERM), KeyboardInterrupt)


def test_a_signal_outside_the_training_loop_interrupts_at_once():
    stop = StopRequest()
    with stop_on_signals(stop), pytest.raises(RunInterrupted):
        signal.raise_signal(signal.SIGTERM)


def test_no_handler_is_installed_outside_the_main_thread():
    seen = []

    def worker():
        with stop_on_signals(StopRequest()):
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before]


# ------------------------------------------------------------------------------------------
# A stop in the middle of an epoch, in process


@pytest.mark.parametrize("stop_step", [7, STEPS_PER_EPOCH - 1])
def test_mid_epoch_checkpoint_resumes_bit_identical(slow_registries, tmp_path, stop_step):
    recipe = resolve(slow_raw(), slow_registries)
    reference = train_and_evaluate(build(recipe), run_dir=tmp_path / "ref")

    stop = StopRequest()
    STOP_AT[:] = [(stop_step, stop)]
    try:
        with pytest.raises(RunInterrupted) as caught:
            train_and_evaluate(build(recipe), run_dir=tmp_path / "run", stop=stop)
    finally:
        STOP_AT.clear()
    done = stop_step + 1  # the step during which the request came is finished
    assert caught.value.step == done and caught.value.exit_code == 143
    payload = ckpt.load(tmp_path / "run" / CHECKPOINT_NAME, purpose="resume")
    assert payload["epoch"] == 0 and payload["step"] == done
    assert payload["partial_epoch"]["batch"] == done

    resumed = train_and_evaluate(build(recipe), run_dir=tmp_path / "run", resume_from=payload)
    assert resumed.epochs_done == 2
    assert_same_weights(reference.checkpoint, resumed.checkpoint)
    assert resumed.final == reference.final

    # Every window is logged once, with the values of the uninterrupted run.
    def windows(folder):
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train/loss"]) for r in lines if "train/loss" in r]

    assert windows(tmp_path / "run") == windows(tmp_path / "ref")
    summaries = [
        json.loads(x)
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"epoch"' in x
    ]
    reference_summaries = [h["epoch/train_loss"] for h in reference.history]
    assert [s["epoch/train_loss"] for s in summaries] == reference_summaries


# ------------------------------------------------------------------------------------------
# A real SIGTERM to an `artplug run` process, then `artplug resume`


def _artplug(args, cwd, env):
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_signals; "
    code += "test_signals.cli_main_with_slow_plugin(sys.argv[1:])"
    return [sys.executable, "-c", code, *args]


def test_sigterm_checkpoints_marks_killed_and_resume_is_bit_identical(
    slow_registries, tmp_path, monkeypatch
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    raw = slow_raw(sleep_s=0.05)
    raw["tracking"] = {"backend": "mlflow", "experiment": "sigterm-test"}
    recipe = tmp_path / "r.toml"
    recipe.write_text(dumps_toml(raw))
    process = subprocess.Popen(
        _artplug(["run", str(recipe), "-q"], tmp_path, env),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            logs = list((tmp_path / "runs").glob("*/metrics.jsonl"))
            if logs and len(logs[0].read_text().splitlines()) >= 2:  # 6 steps done
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = run_dir / CHECKPOINT_NAME
    command = f"artplug resume {Path('runs') / run_dir.name / CHECKPOINT_NAME}"
    assert f"to continue this run: {command}" in err
    assert "Traceback" not in err
    payload = ckpt.load(checkpoint, purpose="resume")
    assert 6 <= payload["step"] < 2 * STEPS_PER_EPOCH and "partial_epoch" in payload

    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(payload["tracking_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["artplug.resume_command"] == command

    done = subprocess.run(
        _artplug([*command.split()[1:], "-q"], tmp_path, env),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert client.get_run(payload["tracking_run_id"]).info.status == "FINISHED"
    history = client.get_metric_history(payload["tracking_run_id"], "train/loss")
    assert sorted(m.step for m in history) == sorted({m.step for m in history})

    # The uninterrupted reference, trained in this process with one thread like the others.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = train_and_evaluate(
            build(resolve(slow_raw(), slow_registries)), run_dir=tmp_path / "ref"
        )
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(reference.checkpoint, checkpoint)
