"""Checkpoint policy: best by robust validation accuracy, early stopping, which one is used."""

from __future__ import annotations

import json

import pytest
import torch

from artplug import checkpoint as ckpt
from artplug.engine import build
from artplug.errors import RecipeError
from artplug.recipe import resolve
from artplug.selection import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_NAME,
    GOOD_CHECKPOINT_NAME,
    CheckpointPolicy,
)
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate


class RecordingTracker:
    """A Tracker that remembers what it was given."""

    run_id = "run-1"

    def __init__(self):
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.artifacts: list[tuple[str, str | None]] = []

    def start(self):
        pass

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path).rsplit("/", 1)[-1], artifact_path))

    def end(self, status="FINISHED"):
        pass

    def describe(self):
        return "recording"


def scripted_validation(monkeypatch, pgd, clean=None, overfit=None):
    """Validation returns the next scripted accuracies; the overfit check its own script."""
    import artplug.evaluate

    val = iter(zip(pgd, clean or [0.9] * len(pgd), strict=True))
    checks = iter(overfit or [])

    def fake(model, x, y, threat, attacks, **kwargs):
        if tuple(attacks) == ("fgsm", "pgd-20"):
            fgsm, robust = next(checks)
            return {"fgsm": fgsm, "pgd-20": robust}
        robust, clean_acc = next(val)
        return {"clean": clean_acc, "pgd-20": robust}

    monkeypatch.setattr(artplug.evaluate, "evaluate", fake)


def components(plugin_set, epochs, **evaluation):
    raw = digits_recipe(run={"name": "policy", "epochs": epochs, "log_every": 100})
    raw["perturbation"] = {"use": "none"}
    raw["eval"] = {
        "every_epochs": 1,
        "attacks": ["clean", "pgd-20"],
        "final_attacks": ["clean"],
        "test_examples": 16,
        "sanity": False,
        **evaluation,
    }
    return build(resolve(raw, plugin_set.registries))


def report(run_dir):
    return json.loads((run_dir / "eval.json").read_text())


def assert_model_is(c, payload):
    for name, tensor in c.model.state_dict().items():
        assert torch.equal(tensor, payload["model"][name]), name


# -- the policy on its own ------------------------------------------------------------------


def test_policy_scores_the_first_robust_entry_and_breaks_ties_on_clean():
    policy = CheckpointPolicy(["clean", "pgd-20", "fgsm"], patience=2)
    assert policy.key == "pgd-20"
    assert policy.update({"clean": 0.8, "pgd-20": 0.4, "fgsm": 0.9}, 1)
    assert not policy.update({"clean": 0.7, "pgd-20": 0.4, "fgsm": 0.9}, 2)  # tie, worse clean
    assert policy.update({"clean": 0.85, "pgd-20": 0.4, "fgsm": 0.1}, 3)  # tie, better clean
    assert not policy.update({"clean": 0.85, "pgd-20": 0.4, "fgsm": 0.9}, 4)  # equal: earliest
    assert policy.best_epoch == 3 and policy.stale == 1 and not policy.exhausted
    assert not policy.update({"clean": 0.99, "pgd-20": 0.3}, 5)
    assert policy.exhausted
    assert policy.describe() == "val pgd-20 40.0% (clean 85.0%)"

    again = CheckpointPolicy(["clean", "pgd-20"], patience=2)
    again.load_state_dict(policy.state_dict())
    assert (again.best_epoch, again.best_score, again.stale) == (3, (0.4, 0.85), 2)
    other = CheckpointPolicy(["clean", "fgsm"])
    other.load_state_dict(policy.state_dict())  # scored on another attack: start afresh
    assert other.best_epoch is None


def test_policy_without_a_robust_entry_uses_clean():
    policy = CheckpointPolicy(["clean"])
    assert policy.key == "clean" and policy.patience == 0
    policy.update({"clean": 0.5}, 1)
    for epoch in range(2, 10):
        policy.update({"clean": 0.4}, epoch)
    assert not policy.exhausted  # patience 0: never stops
    assert policy.describe() == "val clean 50.0%"


# -- in fit --------------------------------------------------------------------------------


def test_best_checkpoint_is_kept_and_used(plugin_set, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, pgd=[0.30, 0.50, 0.40])
    c = components(plugin_set, 3)
    tracker = RecordingTracker()
    result = train_and_evaluate(c, tracker, run_dir=tmp_path / "r")
    best = ckpt.load(tmp_path / "r" / BEST_CHECKPOINT_NAME)
    last = ckpt.load(tmp_path / "r" / CHECKPOINT_NAME)
    assert best["epoch"] == 2 and last["epoch"] == 3
    assert_model_is(c, best)  # the final evaluation ran on the best weights
    assert result.used_checkpoint == BEST_CHECKPOINT_NAME and result.used_epoch == 2
    assert result.checkpoint == tmp_path / "r" / CHECKPOINT_NAME  # resume still continues last
    data = report(tmp_path / "r")
    assert data["checkpoint"] == BEST_CHECKPOINT_NAME and data["checkpoint_epoch"] == 2
    assert "val pgd-20 50.0%" in data["checkpoint_reason"]
    assert data["best_checkpoint"] == {
        "file": BEST_CHECKPOINT_NAME,
        "epoch": 2,
        "metric": "pgd-20",
        "val_accuracy": 0.5,
        "val_clean_accuracy": 0.9,
    }
    assert tracker.tags["artplug.checkpoint.used"] == BEST_CHECKPOINT_NAME
    assert tracker.tags["artplug.checkpoint.epoch"] == "2"
    assert (BEST_CHECKPOINT_NAME, "checkpoints") in tracker.artifacts
    assert (CHECKPOINT_NAME, "checkpoints") in tracker.artifacts
    assert [h["val/pgd-20_acc"] for h in result.history] == [0.30, 0.50, 0.40]


def test_select_last_still_keeps_the_best(plugin_set, tmp_path, monkeypatch):
    # select = "last" validates only the scheduled epochs before the last one.
    scripted_validation(monkeypatch, pgd=[0.50, 0.40])
    c = components(plugin_set, 3, select="last")
    result = train_and_evaluate(c, run_dir=tmp_path / "r")
    assert_model_is(c, ckpt.load(tmp_path / "r" / CHECKPOINT_NAME))
    assert ckpt.load(tmp_path / "r" / BEST_CHECKPOINT_NAME)["epoch"] == 1
    assert result.used_checkpoint == CHECKPOINT_NAME and result.used_epoch == 3
    assert report(tmp_path / "r")["checkpoint_reason"] == "eval.select = 'last'"


def test_best_without_validation_falls_back_to_last(plugin_set, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, pgd=[])
    c = components(plugin_set, 2, every_epochs=0)
    result = train_and_evaluate(c, run_dir=tmp_path / "r")
    assert result.used_checkpoint == CHECKPOINT_NAME and result.used_epoch == 2
    assert not (tmp_path / "r" / BEST_CHECKPOINT_NAME).exists()
    data = report(tmp_path / "r")
    assert "no validation ran" in data["checkpoint_reason"] and data["best_checkpoint"] is None


def test_early_stopping_on_robust_overfitting(plugin_set, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, pgd=[0.40, 0.50, 0.45, 0.48, 0.60, 0.70])
    c = components(plugin_set, 6, early_stop_patience=2)
    tracker = RecordingTracker()
    result = train_and_evaluate(c, tracker, run_dir=tmp_path / "r")
    assert result.epochs_done == 4  # epochs 3 and 4 did not beat epoch 2
    assert result.used_checkpoint == BEST_CHECKPOINT_NAME and result.used_epoch == 2
    data = report(tmp_path / "r")
    assert data["early_stop"].startswith("early stop after epoch 4")
    assert "did not improve for 2 validations" in data["early_stop"]
    assert tracker.tags["artplug.event.early_stop"] == data["early_stop"]


def test_catastrophic_overfitting_stop_wins_over_best(plugin_set, tmp_path, monkeypatch):
    # Validation says epoch 1 is best; the overfit check collapses at epoch 3 and restores 2.
    scripted_validation(
        monkeypatch,
        pgd=[0.50, 0.40, 0.10],
        overfit=[(0.45, 0.35), (0.50, 0.40), (0.80, 0.05)],
    )
    c = components(plugin_set, 4, overfit_check="stop")
    result = train_and_evaluate(c, run_dir=tmp_path / "r")
    good = ckpt.load(tmp_path / "r" / GOOD_CHECKPOINT_NAME)
    assert result.epochs_done == 3 and good["epoch"] == 2
    assert_model_is(c, good)
    data = report(tmp_path / "r")
    assert data["checkpoint"] == GOOD_CHECKPOINT_NAME and data["checkpoint_epoch"] == 2
    assert "takes precedence over eval.select" in data["checkpoint_reason"]
    assert data["best_checkpoint"]["epoch"] == 1


def test_resume_keeps_the_best_so_far(plugin_set, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, pgd=[0.60, 0.50, 0.55])
    c = components(plugin_set, 3)
    steps = len(c.train_loader)
    train_and_evaluate(
        c, run_dir=tmp_path / "r", max_steps=steps
    )  # stops after epoch 1 (validated: last)
    payload = ckpt.load(tmp_path / "r" / CHECKPOINT_NAME)
    assert payload["selection"]["best_epoch"] == 1
    resumed = components(plugin_set, 3)
    result = train_and_evaluate(resumed, run_dir=tmp_path / "r", resume_from=payload)
    assert result.used_checkpoint == BEST_CHECKPOINT_NAME and result.used_epoch == 1
    assert ckpt.load(tmp_path / "r" / BEST_CHECKPOINT_NAME)["epoch"] == 1


def test_recipe_checks_of_the_new_keys(plugin_set):
    raw = digits_recipe()
    raw["eval"] = {"every_epochs": 0, "early_stop_patience": 3}
    with pytest.raises(RecipeError, match="early_stop_patience needs validation during training"):
        resolve(raw, plugin_set.registries)
    raw["eval"] = {"eps_curve": [0.1, -1.0]}
    with pytest.raises(RecipeError, match=r"eval.eps_curve: .*finite and >= 0, got \[-1.0\]"):
        resolve(raw, plugin_set.registries)
    raw["eval"] = {"eps_curve": [0.3, 0.0, 0.1, 0.3]}
    resolved = resolve(raw, plugin_set.registries)
    assert resolved.eval.eps_curve == [0.0, 0.1, 0.3]
    assert resolved.eval.select == "best" and resolved.eval.sanity is True
