"""The sanity gate: passes on an honest model, fails on a gradient-masked one; the eps curve."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from artplug import sanity
from artplug.curves import curve_metrics, plot_curve, robust_accuracy_curve
from artplug.engine import _subset, build, train_epoch
from artplug.kinds import Threat
from artplug.recipe import resolve
from artplug.sanity import (
    CHECKS,
    CheckResult,
    gate_lines,
    gate_metrics,
    gate_report,
    gate_tags,
    large_eps,
    random_search_accuracy,
    run_sanity_gate,
)
from artplug.testing import digits_recipe

THREAT = Threat("linf", 0.1)


class Quantize(nn.Module):
    """Rounds pixels to a few grey levels in front of a model: zero gradient almost everywhere.

    The classic gradient-masking "defence": white-box attacks see no gradient and stall, while
    the model is no more robust than the one behind it.
    """

    def __init__(self, model: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.model = model
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return self.model(torch.round(x * self.levels) / self.levels)


@pytest.fixture(scope="module")
def trained(plugin_set):
    """A small CNN adversarially trained on digits for 3 epochs, and 60 test examples."""
    raw = digits_recipe(
        run={"name": "honest", "epochs": 3, "seed": 0, "log_every": 100},
        perturbation={"use": "pgd", "steps": 3},
    )
    c = build(resolve(raw, plugin_set.registries))
    step = 0
    for epoch in range(3):
        step = train_epoch(c, epoch, step)
    c.model.eval()
    x, y = _subset(*c.data.test, 60, 0)
    return c.model, x, y


def gate(model, x, y, **kwargs):
    return {r.name: r for r in run_sanity_gate(model, x, y, THREAT, seed=0, **kwargs)}


def test_gate_passes_on_an_honest_model(trained):
    model, x, y = trained
    results = gate(model, x, y)
    assert list(results) == list(CHECKS)
    failures = {name: r.detail for name, r in results.items() if r.passed is False}
    assert not failures
    assert all(r.status == "pass" for r in results.values())  # nothing skipped either
    assert results["large_eps"].value == pytest.approx(0.0, abs=0.05)


def test_gate_fails_on_a_gradient_masked_model(trained):
    model, x, y = trained
    results = gate(Quantize(model), x, y)
    failed = {name for name, r in results.items() if r.passed is False}
    # PGD sees zero gradients: it stalls at the large radius, and random search beats it.
    assert {"large_eps", "black_box_vs_white_box"} <= failed
    assert results["art_clean_matches_engine"].passed
    lines = gate_lines(list(results.values()))
    assert lines[0].startswith("Sanity gate: FAILED: ")
    assert lines[-1].startswith("WARNING: sanity gate FAILED")


def test_gate_leaves_the_model_as_it_was(trained):
    model, x, y = trained
    model.train()
    model.zero_grad(set_to_none=True)
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        gate(model, x[:40], y[:40])
        assert model.training and not frozen.requires_grad
        assert all(p.grad is None for p in model.parameters())
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key  # BatchNorm statistics included
    finally:
        frozen.requires_grad_(True)
        model.eval()


def test_square_from_the_attack_table_can_be_the_black_box(trained, monkeypatch):
    import artplug.evaluate as ev

    # The table's entry runs 5000 queries; 150 are enough to beat a stalled PGD.
    fast = replace(ev.ATTACK_ENTRIES["square"], run=ev.square_runner(150))
    monkeypatch.setitem(ev.ATTACK_ENTRIES, "square", fast)
    model, x, y = trained
    result = gate(Quantize(model), x[:60], y[:60], black_box="square")["black_box_vs_white_box"]
    assert result.passed is False and result.detail.startswith("black-box square ")


def scripted(monkeypatch, table, *, big=0.0, train=0.5, evalmode=0.5, black=0.5, clean=0.9):
    """Replace every measurement of the gate by fixed numbers, to test the thresholds."""
    import artplug.evaluate as ev

    def fake_evaluate(model, x, y, threat, attacks, **kwargs):
        if threat.eps > THREAT.eps:
            return {"pgd-20": big}
        return {name: table[name] for name in attacks}

    def fake_mode(model, x, y, threat, *, train_mode, **kwargs):
        return train if train_mode else evalmode

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    monkeypatch.setattr(sanity, "mode_pgd_accuracy", fake_mode)
    monkeypatch.setattr(sanity, "random_search_accuracy", lambda *a, **k: black)
    monkeypatch.setattr(sanity, "clean_accuracy", lambda *a, **k: clean)


@pytest.mark.parametrize(
    ("measured", "failing"),
    [
        ({}, set()),
        ({"black": 0.44}, {"black_box_vs_white_box"}),  # beats PGD (0.5) by 6 points
        ({"black": 0.46}, set()),  # within the tolerance
        ({"black": 0.5, "table": {"pgd-20": 0.55, "pgd-50": 0.55}}, set()),  # exactly at it
        ({"big": 0.06}, {"large_eps"}),
        ({"table": {"pgd-50": 0.53}}, {"more_iterations"}),  # slack is tolerance / 2
        ({"table": {"pgd-50": 0.52}}, set()),
        ({"train": 0.61}, {"train_vs_eval_mode"}),  # 2 x tolerance: BatchNorm noise
        ({"train": 0.4}, set()),
        ({"clean": 0.9 - 2 / 50}, {"art_clean_matches_engine"}),  # two examples apart
        ({"clean": 0.9 - 1 / 50}, set()),  # one example apart is fine
    ],
)
def test_thresholds(monkeypatch, measured, failing):
    table = {"clean": 0.9, "pgd-20": 0.5, "pgd-50": 0.5, **measured.pop("table", {})}
    scripted(monkeypatch, table, **measured)
    x, y = torch.rand(50, 1, 8, 8), torch.zeros(50, dtype=torch.long)
    results = run_sanity_gate(nn.Flatten(), x, y, THREAT, tolerance=0.05)
    assert {r.name for r in results if r.passed is False} == failing
    assert all(r.passed is not None for r in results)


def test_square_is_skipped_when_the_table_lacks_it(monkeypatch):
    import artplug.evaluate as ev

    scripted(monkeypatch, {"clean": 0.9, "pgd-20": 0.5, "pgd-50": 0.5})
    monkeypatch.setattr(ev, "ATTACKS", {k: v for k, v in ev.ATTACKS.items() if k != "square"})
    x, y = torch.rand(10, 1, 8, 8), torch.zeros(10, dtype=torch.long)
    (black, *_) = run_sanity_gate(nn.Flatten(), x, y, THREAT, black_box="square")
    assert black.status == "skip" and black.value is None
    assert black.detail == "square not in the attack table"


def test_what_gets_logged():
    results = [
        CheckResult("large_eps", False, 0.3, "too high"),
        CheckResult("more_iterations", True, -0.01, "fine"),
        CheckResult("black_box_vs_white_box", None, None, "skipped"),
    ]
    assert gate_metrics(results) == {
        "sanity/large_eps": 0.3,
        "sanity/more_iterations": -0.01,
        "sanity/passed": 0.0,
    }
    assert gate_tags(results) == {
        "sanity.large_eps": "fail",
        "sanity.more_iterations": "pass",
        "sanity.black_box_vs_white_box": "skip",
        "artplug.sanity": "FAILED: large_eps",
    }
    report = gate_report(results, 50, 0.05)
    assert report["passed"] is False and report["summary"] == "FAILED: large_eps"
    assert [c["status"] for c in report["checks"]] == ["fail", "pass", "skip"]
    assert gate_tags(results[1:])["artplug.sanity"] == "passed"


def test_large_eps_reaches_the_grey_image():
    assert large_eps(Threat("linf", 8 / 255), (3, 32, 32)) == 0.5
    assert large_eps(Threat("l2", 0.5), (1, 8, 8)) == pytest.approx(4.0)  # 0.5 * sqrt(64)
    assert large_eps(Threat("linf", 0.7), (1, 8, 8)) == 0.7


def test_random_search_l2_and_eps_zero(trained):
    model, x, y = trained
    x, y = x[:40], y[:40]
    clean = sanity.clean_accuracy(model, x, y)
    assert random_search_accuracy(model, x, y, Threat("l2", 0.0)) == clean
    l2 = random_search_accuracy(model, x, y, Threat("l2", 2.0), queries=100)
    assert 0.0 <= l2 < clean
    again = random_search_accuracy(model, x, y, Threat("l2", 2.0), queries=100)
    assert again == l2  # seeded


def test_eps_curve_points_and_plot(trained, tmp_path):
    model, x, y = trained
    points = robust_accuracy_curve(model, x[:60], y[:60], THREAT, [0.5, 0.0, 0.1, 0.1])
    assert [eps for eps, _ in points] == [0.0, 0.1, 0.5]
    accuracies = [acc for _, acc in points]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[0] == sanity.clean_accuracy(model, x[:60], y[:60])
    assert curve_metrics(points) == {
        "curve/pgd-20_acc/eps_0": accuracies[0],
        "curve/pgd-20_acc/eps_0.1": accuracies[1],
        "curve/pgd-20_acc/eps_0.5": accuracies[2],
    }
    path = plot_curve(points, tmp_path / "plots" / "eps_curve.png", title="t", mark_eps=0.1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
def test_gate_runs_on_cuda(trained):
    import copy

    model, x, y = trained
    cuda = torch.device("cuda")
    results = run_sanity_gate(copy.deepcopy(model).to(cuda), x, y, THREAT, device=cuda)
    assert [r.name for r in results if r.passed is False] == []
