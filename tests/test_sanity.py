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
    RESTARTED,
    CheckResult,
    attack_accuracy,
    check_ce_vs_cw,
    check_fgsm_vs_pgd,
    check_train_vs_eval,
    gate_lines,
    gate_metrics,
    gate_report,
    gate_summary,
    gate_tags,
    has_dropout,
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


class GradientOnTheGrid(nn.Module):
    """Rounds pixels to the data's grid (digits: 16 levels) and lets a gradient through only
    on the grid itself.

    FGSM takes its one step from the clean input, which lies on the grid, so it sees the real
    gradient; PGD starts at a random point off the grid and every iterate stays off it, so its
    gradient is zero and it stalls: the iterative attack is weaker than the single step.
    """

    def __init__(self, model: nn.Module, levels: int = 16) -> None:
        super().__init__()
        self.model = model
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        grid = torch.round(x * self.levels) / self.levels
        on_grid = ((x - grid).abs() < 1e-6).to(x.dtype)
        # Value: the grid point; gradient: 1 on the grid, 0 elsewhere.
        return self.model(grid + (x - x.detach()) * on_grid)


class Saturated(nn.Module):
    """Logits multiplied by a huge scale, like a cosine head with a very large ``s``.

    The softmax saturates to exactly one-hot in float32, so the cross-entropy's gradient is
    exactly zero on every confidently classified input; the CW margin's is not.
    """

    def __init__(self, model: nn.Module, scale: float = 1e4) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) * self.scale


class TrainModeFlip(nn.Module):
    """Predicts the wrong class in train mode only (a model robust in one mode only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        return logits.roll(1, dims=1) if self.training else logits


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


TABLE = {"clean": 0.9, "fgsm": 0.6, "pgd-20": 0.5, "pgd-50": 0.5, "pgd-20-cw": 0.5}


def scripted(monkeypatch, table, *, big=0.0, train=0.5, evalmode=0.5, black=0.5, clean=0.9):
    """Replace every measurement of the gate by fixed numbers, to test the thresholds."""

    def fake_table(model, x, y, threat, attacks, **kwargs):
        if threat.eps > THREAT.eps:
            return {"pgd-20": big}
        return {name: table[name] for name in attacks}

    def fake_mode(model, x, y, threat, *, train_mode, **kwargs):
        return train if train_mode else evalmode

    monkeypatch.setattr(sanity, "attack_accuracy", fake_table)
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
        ({"table": {"fgsm": 0.44}}, {"fgsm_vs_pgd"}),  # one step beats PGD (0.5) by 6 points
        ({"table": {"fgsm": 0.45}}, set()),  # exactly at the tolerance
        ({"table": {"fgsm": 0.43, "pgd-50": 0.49}}, {"fgsm_vs_pgd"}),  # against the lower PGD
        ({"table": {"fgsm": 0.44, "pgd-50": 0.49}}, set()),
        ({"table": {"pgd-20-cw": 0.44}}, {"ce_vs_cw"}),  # the margin loss wins by 6 points
        ({"table": {"pgd-20-cw": 0.45}}, set()),
        ({"train": 0.61}, {"train_vs_eval_mode"}),  # 2 x tolerance: BatchNorm noise
        ({"train": 0.4}, set()),
        ({"clean": 0.9 - 2 / 50}, {"art_clean_matches_engine"}),  # two examples apart
        ({"clean": 0.9 - 1 / 50}, set()),  # one example apart is fine
    ],
)
def test_thresholds(monkeypatch, measured, failing):
    table = {**TABLE, **measured.pop("table", {})}
    scripted(monkeypatch, table, **measured)
    x, y = torch.rand(50, 1, 8, 8), torch.zeros(50, dtype=torch.long)
    results = run_sanity_gate(nn.Flatten(), x, y, THREAT, tolerance=0.05)
    assert [r.name for r in results] == list(CHECKS)
    assert {r.name for r in results if r.passed is False} == failing
    assert all(r.passed is not None for r in results)
    assert gate_summary(results) == (
        "passed"
        if not failing
        else f"FAILED: {', '.join(name for name in CHECKS if name in failing)}"
    )


@pytest.mark.parametrize(
    ("train", "status"),
    [(0.61, "warn"), (0.6, "pass")],  # 2 x tolerance, as without dropout
)
def test_train_vs_eval_mode_is_a_warning_for_a_model_with_dropout(monkeypatch, train, status):
    scripted(monkeypatch, TABLE, train=train)
    x, y = torch.rand(50, 1, 8, 8), torch.zeros(50, dtype=torch.long)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.1))
    results = {r.name: r for r in run_sanity_gate(model, x, y, THREAT, tolerance=0.05)}
    mode = results["train_vs_eval_mode"]
    assert mode.status == status and mode.warning
    assert "dropout" in mode.detail
    assert gate_summary(list(results.values())) == "passed"  # a warning never fails the gate
    assert gate_metrics(list(results.values()))["sanity/passed"] == 1.0
    assert gate_tags(list(results.values()))["sanity.train_vs_eval_mode"] == status


def test_the_checks_are_pure_functions_of_accuracies():
    assert check_fgsm_vs_pgd(fgsm=0.20, pgd=0.40, tolerance=0.05).passed is False
    assert check_fgsm_vs_pgd(fgsm=0.35, pgd=0.40, tolerance=0.05).passed is True
    assert check_fgsm_vs_pgd(fgsm=0.60, pgd=0.40, tolerance=0.05).value == pytest.approx(-0.2)
    assert check_ce_vs_cw(ce=0.70, cw=0.10, tolerance=0.05).passed is False
    assert check_ce_vs_cw(ce=0.45, cw=0.40, tolerance=0.05).passed is True
    assert check_ce_vs_cw(ce=0.40, cw=0.45, tolerance=0.05).passed is True  # CW may be weaker
    plain = check_train_vs_eval(0.9, 0.5, 0.05)
    assert plain.status == "fail" and not plain.warning
    dropout = check_train_vs_eval(0.9, 0.5, 0.05, dropout=True)
    assert dropout.status == "warn" and dropout.passed is False
    assert check_train_vs_eval(0.5, 0.45, 0.05, dropout=True).status == "pass"


def test_dropout_is_detected():
    assert has_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    assert has_dropout(nn.Sequential(nn.Sequential(nn.Dropout2d(0.1))))
    assert has_dropout(nn.Sequential(nn.AlphaDropout(0.1)))

    class GuidedDropout(nn.Module):  # a plugin's own dropout (AALP), found by its name
        pass

    assert has_dropout(nn.Sequential(GuidedDropout()))
    assert not has_dropout(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def test_warnings_are_reported_but_do_not_fail_the_gate():
    results = [
        CheckResult("train_vs_eval_mode", False, 0.3, "dropout", warning=True),
        CheckResult("large_eps", True, 0.0, "fine"),
    ]
    assert gate_summary(results) == "passed"
    report = gate_report(results, 50, 0.05)
    assert report["passed"] is True and report["warnings"] == ["train_vs_eval_mode"]
    assert report["checks"][0]["status"] == "warn"
    lines = gate_lines(results)
    assert lines[0] == "Sanity gate: passed"
    assert lines[1].lstrip().startswith("WARN  train_vs_eval_mode")
    assert lines[-1].startswith("NOTE: sanity check(s) train_vs_eval_mode")


def test_compared_pgd_attacks_get_seeded_restarts(monkeypatch):
    import artplug.evaluate as ev

    calls = []

    # Example i survives the start of seed s unless i == s: the worst case over seeds 0 and 1
    # breaks examples 0 and 1; fgsm and clean have no random start and run once.
    def fake_detailed(model, x, y, threat, attacks, *, seed, **kwargs):
        calls.append((tuple(attacks), seed))
        masks = {}
        for name in attacks:
            mask = torch.ones(len(x), dtype=torch.bool)
            if name in RESTARTED:
                mask[seed] = False
            masks[name] = mask
        return {}, masks

    monkeypatch.setattr(ev, "evaluate_detailed", fake_detailed)
    x, y = torch.rand(10, 1, 8, 8), torch.zeros(10, dtype=torch.long)
    names = ["clean", "fgsm", "pgd-20", "pgd-50", "pgd-20-cw"]
    acc = attack_accuracy(nn.Flatten(), x, y, THREAT, names, restarts=2, seed=0)
    assert calls == [(tuple(names), 0), (("pgd-20", "pgd-50", "pgd-20-cw"), 1)]
    assert acc == {"clean": 1.0, "fgsm": 1.0, "pgd-20": 0.8, "pgd-50": 0.8, "pgd-20-cw": 0.8}
    calls.clear()
    assert attack_accuracy(nn.Flatten(), x, y, THREAT, ["pgd-20"], restarts=1, seed=3) == {
        "pgd-20": 0.9
    }
    assert calls == [(("pgd-20",), 3)]
    with pytest.raises(ValueError, match="restarts"):
        run_sanity_gate(nn.Flatten(), x, y, THREAT, restarts=0)


def test_gate_catches_a_pgd_weaker_than_fgsm(trained):
    model, x, y = trained
    results = gate(GradientOnTheGrid(model), x, y)
    fgsm = results["fgsm_vs_pgd"]
    assert fgsm.passed is False, fgsm.detail
    assert fgsm.value is not None and fgsm.value > 0.05
    assert results["art_clean_matches_engine"].passed


def test_gate_catches_a_saturated_softmax(trained):
    model, x, y = trained
    results = gate(Saturated(model), x, y)
    cw = results["ce_vs_cw"]
    assert cw.passed is False, cw.detail
    assert cw.value is not None and cw.value > 0.05
    assert results["art_clean_matches_engine"].passed


def test_gate_mode_check_fails_without_dropout_and_warns_with_it(trained):
    model, x, y = trained
    x, y = x[:40], y[:40]
    flip = TrainModeFlip(model)
    results = gate(flip, x, y, restarts=1)
    assert results["train_vs_eval_mode"].status == "fail"
    assert "train_vs_eval_mode" in gate_summary(list(results.values()))
    with_dropout = nn.Sequential(flip, nn.Dropout(0.1))
    results = gate(with_dropout, x, y, restarts=1)
    assert results["train_vs_eval_mode"].status == "warn"
    assert gate_summary(list(results.values())) == "passed"


def test_square_is_skipped_when_the_table_lacks_it(monkeypatch):
    import artplug.evaluate as ev

    scripted(monkeypatch, TABLE)
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
