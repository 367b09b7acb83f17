"""The catastrophic-overfitting watch: the 'artplug' and 'fast-at' rules on fixed numbers."""

from __future__ import annotations

import json

import pytest
import torch

from artplug import checkpoint as ckpt
from artplug import sanity
from artplug.engine import _subset, build
from artplug.errors import ArtplugError
from artplug.recipe import resolve
from artplug.selection import OverfitWatch
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate


def watch(plugin_set, rule, **evaluation):
    raw = digits_recipe(run={"name": "watch", "epochs": 1, "seed": 0, "log_every": 100})
    raw["eval"] = {**raw["eval"], "overfit_check": "log", "overfit_rule": rule, **evaluation}
    return OverfitWatch(build(resolve(raw, plugin_set.registries)))


def replay(w, sequence):
    """Feed ``w`` one scripted measurement per epoch; the epochs that raised an event."""
    measurements = iter(sequence)
    w._measure = lambda: dict(next(measurements))
    events = []
    for epoch, _ in enumerate(sequence, start=1):
        metrics, event = w.check(epoch)
        assert (event is not None) == ("overfit/detected" in metrics)
        if event is not None:
            events.append(epoch)
    return events


# ------------------------------------------------------------------------------------------
# The decisions as pure functions


def test_artplug_rule_needs_a_pgd_collapse_with_fgsm_holding():
    collapse = OverfitWatch.artplug_collapse
    before = {"fgsm": 0.50, "pgd-20": 0.50}
    assert not collapse(None, before, 0.2)  # the first epoch has nothing to compare with
    assert collapse(before, {"fgsm": 0.80, "pgd-20": 0.05}, 0.2)
    assert collapse(before, {"fgsm": 0.50, "pgd-20": 0.29}, 0.2)  # FGSM equal counts as held
    assert not collapse(before, {"fgsm": 0.49, "pgd-20": 0.05}, 0.2)  # FGSM fell too
    assert not collapse(before, {"fgsm": 0.90, "pgd-20": 0.31}, 0.2)  # dropped 0.19 only


def test_fast_at_rule_is_wong_et_al_s_comparison():
    collapse = OverfitWatch.fast_at_collapse
    # train_fgsm.py: ``if robust_acc - prev_robust_acc < -0.2: break``, prev starting at 0.
    assert not collapse(0.0, 0.05, 0.2)
    assert collapse(0.45, 0.20, 0.2)
    assert not collapse(0.45, 0.26, 0.2)
    assert not collapse(0.45, 0.90, 0.2)
    assert collapse(0.6, 0.3, 0.25) and not collapse(0.6, 0.36, 0.25)


@pytest.mark.parametrize(
    ("sequence", "events"),
    [
        # (fgsm, pgd-20) per epoch.
        ([(0.45, 0.35), (0.50, 0.40), (0.80, 0.05), (0.85, 0.02)], [3, 4]),
        ([(0.45, 0.35), (0.50, 0.30), (0.55, 0.42)], []),  # a 0.05 dip is no collapse
        ([(0.50, 0.50), (0.30, 0.10)], []),  # both fell: a bad epoch, not the FGSM-only fit
        # A collapsed epoch never becomes the reference: epoch 3 is compared with epoch 1.
        ([(0.50, 0.50), (0.60, 0.10), (0.60, 0.35)], [2]),
    ],
)
def test_artplug_rule_on_sequences(plugin_set, sequence, events):
    w = watch(plugin_set, "artplug")
    assert len(w.x) == 256  # eval.overfit_examples
    scripted = [{"fgsm": fgsm, "pgd-20": pgd} for fgsm, pgd in sequence]
    assert replay(w, scripted) == events


@pytest.mark.parametrize(
    ("sequence", "events"),
    [
        ([0.30, 0.45, 0.20, 0.50], [3]),  # 0.45 -> 0.20; 0.50 is compared with 0.45 again
        ([0.05, 0.30, 0.15, 0.40], []),  # dips of 0.15 do not count
        ([0.90, 0.50, 0.60, 0.75], [2, 3]),  # compared with 0.90 until it recovers
        ([0.10], []),  # the first epoch is compared with 0
    ],
)
def test_fast_at_rule_on_sequences(plugin_set, sequence, events):
    w = watch(plugin_set, "fast-at")
    scripted = [{OverfitWatch.FAST_AT_KEY: acc} for acc in sequence]
    assert replay(w, scripted) == events


def test_fast_at_rule_ignores_fgsm(plugin_set):
    # What the artplug rule flags only with FGSM holding, FastAT's flags on PGD alone.
    w = watch(plugin_set, "fast-at")
    assert replay(w, [{OverfitWatch.FAST_AT_KEY: 0.5}, {OverfitWatch.FAST_AT_KEY: 0.1}]) == [2]


def test_the_rule_is_a_recipe_setting(plugin_set):
    raw = digits_recipe()
    assert resolve(raw, plugin_set.registries).eval.overfit_rule == "artplug"  # the default
    raw["eval"] = {**raw["eval"], "overfit_rule": "wong"}
    with pytest.raises(ArtplugError, match="overfit_rule"):
        resolve(raw, plugin_set.registries)


# ------------------------------------------------------------------------------------------
# What the fast-at rule measures


def test_fast_at_rule_attacks_a_fixed_batch_in_train_mode(plugin_set):
    w = watch(plugin_set, "fast-at")
    c = w.c
    batch = c.recipe.data.batch_size
    assert len(w.x) == batch  # one training batch, as FastAT's first batch
    train_x, train_y = c.data.train
    expected_x, expected_y = _subset(train_x, train_y, batch, c.recipe.run.seed + 1)
    assert torch.equal(w.x, expected_x) and torch.equal(w.y, expected_y)

    seen: list[tuple[bool, torch.Tensor]] = []
    # The hook travels with the copy the check attacks (deepcopy keeps the function).
    handle = c.model.register_forward_pre_hook(
        lambda module, args: seen.append((module.training, args[0].detach().clone()))
    )
    c.model.eval()
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    try:
        first, event = w.check(1)
        calls = len(seen)
        second, _ = w.check(2)
    finally:
        handle.remove()
    assert event is None
    assert set(first) == {"overfit/pgd-5-train_acc"}
    assert first == second  # same batch, same seeded start, same weights: same number
    # Every forward: train mode, the whole fixed batch, inside the eps ball around it.
    assert seen and all(training for training, _ in seen)
    eps = c.threat.eps
    for _, inputs in seen:
        assert inputs.shape[0] == batch
        assert (inputs - w.x).abs().max() <= eps + 1e-6
    # 1 forward per step (5 at most; an attack with every example broken stops early) + 1.
    assert 2 <= calls <= sanity.FAST_AT_STEPS + 1 and len(seen) == 2 * calls
    # The real model is untouched: still in eval mode, BatchNorm statistics unchanged.
    assert not c.model.training
    for key, value in c.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fast_at_accuracy_is_measured_in_train_mode():
    class EvalModeOnly(torch.nn.Module):
        """Right in eval mode, wrong in train mode: only a train-mode check sees it fail."""

        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.stack([x.mean((1, 2, 3)), 1 - x.mean((1, 2, 3))], 1) * self.scale
            return logits.roll(1, dims=1) if self.training else logits

    from artplug.kinds import Threat

    x = torch.cat([torch.full((8, 1, 4, 4), 0.9), torch.full((8, 1, 4, 4), 0.1)])
    y = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    model = EvalModeOnly().eval()
    assert sanity.fast_at_pgd_accuracy(model, x, y, Threat("linf", 0.05)) == 0.0
    assert sanity.clean_accuracy(model, x, y) == 1.0
    assert not model.training


# ------------------------------------------------------------------------------------------
# Through fit


def test_fit_stops_on_the_fast_at_rule(plugin_set, tmp_path, monkeypatch):
    scripted = iter([0.30, 0.45, 0.20, 0.50])
    monkeypatch.setattr(sanity, "fast_at_pgd_accuracy", lambda *a, **k: next(scripted))
    raw = digits_recipe(run={"name": "fast-at-stop", "epochs": 4, "log_every": 100})
    raw["perturbation"] = {"use": "none"}
    raw["eval"] = {
        "every_epochs": 0,
        "final_attacks": ["clean"],
        "test_examples": 16,
        "overfit_check": "stop",
        "overfit_rule": "fast-at",
        "sanity": False,
    }
    c = build(resolve(raw, plugin_set.registries))
    result = train_and_evaluate(c, run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["catastrophic_overfitting"].startswith(
        "catastrophic overfitting at epoch 3 (fast-at rule): PGD-5 accuracy"
    )
    assert result.epochs_done == 3 and report["checkpoint"] == "checkpoint-good.pt"
    good = ckpt.load(tmp_path / "run" / "checkpoint-good.pt")
    assert good["epoch"] == 2  # FastAT keeps the weights of the epoch before the drop
