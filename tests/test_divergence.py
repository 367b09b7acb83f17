"""Divergence stops the run (or rolls back); a NaN model is never checkpointed or selected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clitools import run_main
from pydantic import BaseModel, ConfigDict

import artplug
from artplug import checkpoint as ckpt
from artplug.engine import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME, build, model_is_finite
from artplug.errors import DivergenceError, RecipeError
from artplug.plugins import load_plugins
from artplug.recipe import dumps_toml, resolve
from artplug.testing import digits_recipe, tiny_model
from artplug.workflows import train_and_evaluate

# Digits at batch 64: 19 optimizer steps per epoch.
STEPS_PER_EPOCH = 19


class _NanParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    after: int = 0
    once: bool = False


class NanAfter:
    """Cross-entropy that turns NaN from global step ``after`` on (only once with ``once``)."""

    name = "nan-after"
    Params = _NanParams
    needs = frozenset({"adv"})

    def __init__(self, params: _NanParams) -> None:
        self.params = params
        self.fired = 0

    def __call__(self, out, state):
        loss = F.cross_entropy(out.logits_adv, out.y)
        if state.progress.step >= self.params.after and not (self.params.once and self.fired):
            self.fired += 1
            return loss * float("nan")
        return loss


class NanPlugin:
    @staticmethod
    @artplug.hookimpl
    def register_loss_terms(register):
        register(NanAfter)


@pytest.fixture(scope="module")
def nan_registries():
    return load_plugins(disabled=(), extra=[("nan", NanPlugin())], strict=True).registries


def nan_recipe(registries, *, after, once=False, epochs=2, run=None):
    raw = digits_recipe(
        run={"name": "nan", "epochs": epochs, "log_every": 1, **(run or {})},
        perturbation={"use": "pgd", "steps": 1},
        loss=[{"use": "nan-after", "id": "ce", "after": after, "once": once}],
    )
    return resolve(raw, registries)


def finite_weights(path: Path) -> bool:
    model = ckpt.load(path)["model"]
    return all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def test_huge_lr_stops_the_run_failed_with_one_error_line(tmp_path, run_tmp, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    recipe = tmp_path / "r.toml"
    raw = digits_recipe(
        run={"name": "diverging", "epochs": 2, "log_every": 1},
        optim={"lr": 1e6},
        perturbation={"use": "pgd", "steps": 1},
        tracking={"backend": "mlflow", "experiment": "divergence-test"},
    )
    recipe.write_text(dumps_toml(raw))
    code, out, err = run_main(["run", str(recipe), "-q"], capsys)
    assert code == DivergenceError.exit_code == 3, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert "training diverged" in errors[0] and "step" in errors[0]
    assert "cross-entropy" in errors[0] and "last good checkpoint" in errors[0]
    assert "Test accuracy" not in out  # no final evaluation on a diverged model
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "eval.json").exists()
    for name in (BEST_CHECKPOINT_NAME, CHECKPOINT_NAME):
        if (run_dir / name).exists():
            assert finite_weights(run_dir / name), name

    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("divergence-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "training diverged" in run.data.tags["artplug.event.divergence"]


def test_a_loss_term_turning_nan_stops_naming_step_term_and_last_good_checkpoint(
    nan_registries, tmp_path
):
    recipe = nan_recipe(nan_registries, after=STEPS_PER_EPOCH + 5)
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError) as caught:
        train_and_evaluate(build(recipe), run_dir=run_dir)
    error = caught.value
    # The window of step 25 (log_every = 1) is the first with the NaN loss.
    assert error.step == STEPS_PER_EPOCH + 6 and error.terms == ["ce"]
    message = error.one_line()
    assert f"at step {STEPS_PER_EPOCH + 6}" in message and "non-finite loss terms: ce" in message
    assert f"{run_dir / CHECKPOINT_NAME} (epoch 1, step {STEPS_PER_EPOCH})" in message
    assert error.checkpoint == str(run_dir / CHECKPOINT_NAME)
    # The last checkpoint (and the best, validated after epoch 1) hold the last finite model.
    assert ckpt.load(run_dir / CHECKPOINT_NAME)["step"] == STEPS_PER_EPOCH
    assert finite_weights(run_dir / CHECKPOINT_NAME)
    assert finite_weights(run_dir / BEST_CHECKPOINT_NAME)
    assert not (run_dir / "eval.json").exists()


def test_a_nan_before_the_first_checkpoint_names_no_checkpoint(nan_registries, tmp_path):
    recipe = nan_recipe(nan_registries, after=3, epochs=1, run={"log_every": 5})
    with pytest.raises(DivergenceError, match=r"window of steps 1-5") as caught:
        train_and_evaluate(build(recipe), run_dir=tmp_path / "run")
    assert "diverged before the first checkpoint" in caught.value.one_line()
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_rollback_recovers_from_a_transient_nan_with_half_the_lr(nan_registries, tmp_path):
    recipe = nan_recipe(
        nan_registries, after=STEPS_PER_EPOCH + 5, once=True, run={"on_nonfinite": "rollback"}
    )
    c = build(recipe)
    result = train_and_evaluate(c, run_dir=tmp_path / "run")
    assert result.epochs_done == 2 and result.training_complete
    assert result.lr_multiplier == 0.5
    assert result.rollbacks == [
        {
            "step": STEPS_PER_EPOCH + 6,
            "terms": ["ce"],
            "to_step": STEPS_PER_EPOCH,
            "lr_multiplier": 0.5,
        }
    ]
    assert c.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    assert model_is_finite(c.model)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["lr_multiplier"] == 0.5 and len(report["rollbacks"]) == 1
    last = ckpt.load(tmp_path / "run" / CHECKPOINT_NAME)
    assert last["lr_multiplier"] == 0.5 and last["step"] == 2 * STEPS_PER_EPOCH
    # The replayed steps replace the diverged ones in metrics.jsonl: every step once.
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in json.loads(line)
    ]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))


def test_rollback_gives_up_after_max_rollbacks(nan_registries, tmp_path):
    recipe = nan_recipe(
        nan_registries,
        after=2,
        epochs=1,
        run={"on_nonfinite": "rollback", "max_rollbacks": 2},
    )
    with pytest.raises(DivergenceError) as caught:
        train_and_evaluate(build(recipe), run_dir=tmp_path / "run")
    message = caught.value.one_line()
    assert "gave up after 2 rollbacks (learning rate x0.25)" in message
    assert "raise run.max_rollbacks" in message


def test_model_is_finite_sees_nan_parameters_and_buffers():
    model = tiny_model()
    assert model_is_finite(model)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("inf"))
    assert not model_is_finite(model)


def test_recipe_fields_are_validated(plugin_set):
    raw = digits_recipe(run={"name": "x", "on_nonfinite": "ignore"})
    with pytest.raises(RecipeError, match="on_nonfinite"):
        resolve(raw, plugin_set.registries)
    ok = resolve(digits_recipe(), plugin_set.registries)
    assert (ok.run.on_nonfinite, ok.run.max_rollbacks) == ("stop", 3)
