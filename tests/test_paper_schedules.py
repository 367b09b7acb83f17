"""Learning-rate schedules of the CIFAR-10 recipes, checked against the reference codes.

For every CIFAR-10 recipe (``recipes/*.toml``, not the digits twins) the recipe is loaded with
artplug's loader, its schedules are built, and the learning rate is evaluated at the first
step of every epoch. The epochs (counted from 1, as the reference codes count them) at which
that rate differs from the previous epoch's are printed and compared with a table that names,
for each recipe, the reference code the schedule follows (repository, file, function) and the
epochs at which that code changes the rate. Epoch starts are where a step schedule's decay
becomes visible; the exact step is checked by the per-step comparison against the reference
rule for the step-decay recipes and against ``torch.optim.lr_scheduler.CyclicLR`` for the
one-cycle ones. The ``cyclic-lr`` momentum (the scheduler's default cycling between 0.9 and
0.8) is checked against the same scheduler. See docs/techniques/ for the schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from artplug_plugins.schedules import CyclicLR

import artplug
import artplug.engine
import artplug.recipe
from artplug.recipe import ResolvedRecipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
CIFAR_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.toml") if p.name != "quickstart.toml")
# 50,000 CIFAR-10 training images at batch 128 (the reference codes keep the last partial batch).
STEPS_PER_EPOCH = math.ceil(50_000 / 128)

# The engine applies a "momentum" knob once artplug.recipe lists it among the global knobs.
MOMENTUM_KNOB = "momentum" in artplug.recipe.GLOBAL_KNOBS


# ------------------------------------------------------------------------- reference rules
# Each rule gives the reference code's learning rate for the step that runs in 0-based epoch
# ``epoch`` at batch ``i`` (0-based) of ``n``, for a run of ``epochs`` epochs; written from the
# code named in its docstring.


def trades_rule(lr: float) -> Callable[[int, int, int, int], float]:
    """yaodongyu/TRADES train_trades_cifar10.py adjust_learning_rate (also ShawnXYang/AT_HE
    CIFAR-10/train_adv_cifar10.py adjust_learning_rate): called with the 1-based epoch before
    it runs; ×0.1 when epoch >= 75, ×0.01 when >= 90, ×0.001 when >= 100."""

    def rule(epoch: int, i: int, n: int, epochs: int) -> float:
        one_based = epoch + 1
        factor = 1.0
        for boundary in (75, 90, 100):
            if one_based >= boundary:
                factor *= 0.1
        return lr * factor

    return rule


def bag_of_tricks_rule(lr: float) -> Callable[[int, int, int, int], float]:
    """P2333/Bag-of-Tricks-for-AT train_cifar.py main, lr_schedule 'piecewise' with lrdecay
    'base': t = epoch + (i + 1) / n (0-based epoch); lr_max for t < 100, /10 for t < 105,
    /100 after."""

    def rule(epoch: int, i: int, n: int, epochs: int) -> float:
        t = epoch + (i + 1) / n
        if t < 100:
            return lr
        return lr / 10 if t < 105 else lr / 100

    return rule


def free_rule(lr: float) -> Callable[[int, int, int, int], float]:
    """ashafahi/free_adv_train config.py + free_train.py: piecewise-constant rate over the
    global step counting replays, ×0.1 after 40k and after 60k of 80k steps, i.e. at 1/2 and
    3/4 of training (tf.train.piecewise_constant: the new value from the step after the
    boundary). Replays of one minibatch share artplug's step, so the fraction is per batch."""

    def rule(epoch: int, i: int, n: int, epochs: int) -> float:
        fraction = (epoch * n + i) / (epochs * n)
        factor = 1.0
        for boundary in (0.5, 0.75):
            if fraction >= boundary:
                factor *= 0.1
        return lr * factor

    return rule


def cyclic_rule(lr: float, peak_at: float) -> Callable[[int, int, int, int], float]:
    """torch.optim.lr_scheduler.CyclicLR(base_lr=0, max_lr=lr, step_size_up=peak_at * total,
    step_size_down=(1 - peak_at) * total), stepped after every optimizer step, as in
    locuslab/fast_adversarial CIFAR10/train_fgsm.py main (peak_at 1/2) and
    geonyeong-park/SLAT solver.py Solver._get_optimizer (peak_at 2/5)."""

    def rule(epoch: int, i: int, n: int, epochs: int) -> float:
        return torch_cyclic(lr, peak_at, epochs * n, epoch * n + i)[0]

    return rule


def torch_cyclic(
    max_lr: float,
    peak_at: float,
    total: int,
    k: int,
    base_momentum: float = 0.8,
    max_momentum: float = 0.9,
) -> tuple[float, float]:
    """(lr, momentum) of torch's CyclicLR with its defaults after ``k`` scheduler steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=max_lr, momentum=max_momentum)
    scheduler = torch.optim.lr_scheduler.CyclicLR(
        optimizer,
        base_lr=0.0,
        max_lr=max_lr,
        # Fractional step sizes, as the reference codes pass them (torch's stubs say int).
        step_size_up=peak_at * total,  # type: ignore[arg-type]
        step_size_down=(1 - peak_at) * total,  # type: ignore[arg-type]
        base_momentum=base_momentum,
        max_momentum=max_momentum,
    )
    # CyclicLR computes the values of step k in closed form; jump there instead of looping.
    scheduler.last_epoch = k - 1
    optimizer.step()  # a no-op (no gradient); keeps torch's step-order check quiet
    scheduler.step()
    group = optimizer.param_groups[0]
    return float(group["lr"]), float(group["momentum"])


@dataclass(frozen=True)
class Reference:
    """What a recipe's schedule follows, and the epochs (from 1) where its rate changes."""

    source: str
    epochs: int
    changes: tuple[int, ...]
    rule: Callable[[int, int, int, int], float]


TRADES = "yaodongyu/TRADES train_trades_cifar10.py adjust_learning_rate"
AT_HE = "ShawnXYang/AT_HE CIFAR-10/train_adv_cifar10.py adjust_learning_rate"
BOT = "P2333/Bag-of-Tricks-for-AT train_cifar.py main (piecewise, lrdecay base)"
FREE = "ashafahi/free_adv_train config.py (boundaries 40k/60k of 80k steps)"
FAST = "locuslab/fast_adversarial CIFAR10/train_fgsm.py main (CyclicLR)"
SLAT = "geonyeong-park/SLAT solver.py Solver._get_optimizer (CyclicLR)"
# One-cycle: the rate changes at every epoch start, except where the epoch starts on either
# side of a symmetric peak have equal rates (FastAT: epochs 8 and 9 both start at 14/15).
EVERY_EPOCH_FAST = tuple(e for e in range(2, 16) if e != 9)
EVERY_EPOCH_SLAT = tuple(range(2, 31))

# Decay epochs are counted from 1: "75" is the first epoch that runs at the decayed rate.
# FreeAT's second decay falls inside the 20th epoch (3/4 of 26 passes = 19.5 epochs done), so
# the first epoch that starts at the new rate is the 21st.
TABLE: dict[str, Reference] = {
    "trades.toml": Reference(TRADES, 76, (75,), trades_rule(0.1)),
    "spat_like_trades.toml": Reference(TRADES, 76, (75,), trades_rule(0.1)),
    "he_pgd.toml": Reference(AT_HE, 77, (75,), trades_rule(0.1)),
    "he_trades.toml": Reference(AT_HE, 77, (75,), trades_rule(0.1)),
    "he_alp.toml": Reference(AT_HE, 77, (75,), trades_rule(0.1)),
    "alp.toml": Reference(AT_HE, 77, (75,), trades_rule(0.1)),
    "aalp_like.toml": Reference(AT_HE, 77, (75,), trades_rule(0.1)),
    "spat_like_he.toml": Reference(AT_HE, 77, (75,), trades_rule(0.1)),
    "pgd_at.toml": Reference(BOT, 110, (101, 106), bag_of_tricks_rule(0.1)),
    "spat_like_pgd.toml": Reference(BOT, 110, (101, 106), bag_of_tricks_rule(0.1)),
    "sat_backward_only.toml": Reference(BOT, 110, (101, 106), bag_of_tricks_rule(0.1)),
    "sat_gelu.toml": Reference(BOT, 110, (101, 106), bag_of_tricks_rule(0.1)),
    "sat_silu.toml": Reference(BOT, 110, (101, 106), bag_of_tricks_rule(0.1)),
    "sat_smoothrelu.toml": Reference(BOT, 110, (101, 106), bag_of_tricks_rule(0.1)),
    "sat_softplus.toml": Reference(BOT, 110, (101, 106), bag_of_tricks_rule(0.1)),
    "free_at.toml": Reference(FREE, 26, (14, 21), free_rule(0.1)),
    "he_free.toml": Reference(FREE, 26, (14, 21), free_rule(0.1)),
    "fast_at.toml": Reference(FAST, 15, EVERY_EPOCH_FAST, cyclic_rule(0.2, 0.5)),
    "he_fast.toml": Reference(FAST, 15, EVERY_EPOCH_FAST, cyclic_rule(0.2, 0.5)),
    "slat.toml": Reference(SLAT, 30, EVERY_EPOCH_SLAT, cyclic_rule(0.2, 0.4)),
}


def load(path: Path, registries: Any) -> ResolvedRecipe:
    """The recipe; before the engine knows the momentum knob, without momentum cycling."""
    overrides: list[str] = []
    if not MOMENTUM_KNOB and "cyclic-lr" in path.read_text():
        overrides.append("schedule.0.cycle_momentum=false")
    return load_recipe(path, registries, overrides)


def lr_at(recipe: ResolvedRecipe, epoch: int, i: int, n: int) -> float:
    """The rate artplug's schedules give the step at batch ``i`` of 0-based ``epoch``."""
    schedules = [spec.build() for spec in recipe.schedules]
    progress = artplug.Progress(
        epoch=epoch, step=epoch * n + i, steps_per_epoch=n, total_steps=recipe.run.epochs * n
    )
    scale = 1.0
    for schedule in schedules:
        scale *= schedule.values(progress).get("lr_scale", 1.0)
    return recipe.optim.lr * scale


def same(a: float, b: float) -> bool:
    """Equal rates up to round-off."""
    return math.isclose(a, b, rel_tol=1e-9)


def change_epochs(rates: list[float]) -> tuple[int, ...]:
    """Epochs (from 1) whose first-step rate differs from the previous epoch's."""
    return tuple(e + 1 for e in range(1, len(rates)) if not same(rates[e], rates[e - 1]))


def test_the_table_covers_every_cifar_recipe() -> None:
    assert sorted(TABLE) == sorted(p.name for p in CIFAR_RECIPES)


@pytest.mark.parametrize("path", CIFAR_RECIPES, ids=lambda p: p.stem)
def test_lr_changes_where_the_reference_changes_it(path: Path, plugin_set: Any) -> None:
    ref = TABLE[path.name]
    recipe = load(path, plugin_set.registries)
    assert recipe.run.epochs == ref.epochs, ref.source
    n = STEPS_PER_EPOCH
    ours = [lr_at(recipe, e, 0, n) for e in range(ref.epochs)]
    theirs = [ref.rule(e, 0, n, ref.epochs) for e in range(ref.epochs)]
    print(f"{path.name}: lr changes at epochs {change_epochs(ours)} (from 1); {ref.source}")
    assert change_epochs(ours) == ref.changes, ref.source
    assert change_epochs(theirs) == ref.changes, f"the table's rule for {ref.source}"
    for e in range(ref.epochs):
        assert ours[e] == pytest.approx(theirs[e], rel=1e-9, abs=1e-12), (path.name, e + 1)


@pytest.mark.parametrize("name", ["pgd_at.toml", "trades.toml", "free_at.toml", "slat.toml"])
def test_every_step_matches_the_reference_up_to_one_step(name: str, plugin_set: Any) -> None:
    """Per step: equal except within one step of a decay (Bag of Tricks decays at the last
    batch of the epoch before, FreeAT counts its boundary after the step)."""
    ref = TABLE[name]
    recipe = load(ROOT / "recipes" / name, plugin_set.registries)
    n = STEPS_PER_EPOCH
    steps = ref.epochs * n
    ours = [lr_at(recipe, s // n, s % n, n) for s in range(steps)]
    theirs = [ref.rule(s // n, s % n, n, ref.epochs) for s in range(steps)]
    differ = [s for s in range(steps) if not math.isclose(ours[s], theirs[s], rel_tol=1e-9)]
    assert len(differ) <= len(ref.changes), (name, differ)
    for s in differ:
        # The neighbouring step agrees: the two schedules differ by at most one step.
        assert any(
            0 <= t < steps and math.isclose(ours[s], theirs[t], rel_tol=1e-9)
            for t in (s - 1, s + 1)
        ), (name, s)


# ------------------------------------------------------------------------- cyclic momentum


@pytest.mark.parametrize("peak_at", [0.5, 0.4])
def test_cyclic_lr_and_momentum_follow_torch_cyclic_lr(peak_at: float) -> None:
    schedule = CyclicLR(CyclicLR.Params(peak_at=peak_at))
    assert schedule.knobs() == frozenset({"lr_scale", "momentum"})
    total = 100
    for k in [0, 1, 7, 39, 40, 41, 49, 50, 51, 77, 99]:
        progress = artplug.Progress(epoch=k // 10, step=k, steps_per_epoch=10, total_steps=total)
        values = schedule.values(progress)
        lr, momentum = torch_cyclic(0.2, peak_at, total, k)
        assert 0.2 * values["lr_scale"] == pytest.approx(lr, rel=1e-12, abs=1e-15), k
        assert values["momentum"] == pytest.approx(momentum, rel=1e-12), k


def test_cyclic_momentum_is_max_at_the_ends_and_base_at_the_peak() -> None:
    schedule = CyclicLR(CyclicLR.Params(peak_at=0.4, base_momentum=0.5, max_momentum=0.95))

    def momentum(step: int) -> float:
        progress = artplug.Progress(epoch=0, step=step, steps_per_epoch=10, total_steps=10)
        return schedule.values(progress)["momentum"]

    assert momentum(0) == pytest.approx(0.95)
    assert momentum(4) == pytest.approx(0.5)
    assert momentum(7) == pytest.approx(0.95 - 0.45 * 0.5)
    assert torch_cyclic(0.2, 0.4, 10, 7, 0.5, 0.95)[1] == pytest.approx(momentum(7))


def test_cyclic_momentum_can_be_switched_off() -> None:
    schedule = CyclicLR(CyclicLR.Params(cycle_momentum=False))
    assert schedule.knobs() == frozenset({"lr_scale"})
    progress = artplug.Progress(epoch=0, step=3, steps_per_epoch=10, total_steps=10)
    assert set(schedule.values(progress)) == {"lr_scale"}


def test_cyclic_momentum_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="base_momentum"):
        CyclicLR.Params(base_momentum=0.95, max_momentum=0.9)


@pytest.mark.skipif(
    not MOMENTUM_KNOB, reason="the engine does not apply a 'momentum' knob yet (artplug.recipe)"
)
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_engine_applies_the_momentum_knob(name: str) -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    if name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.Adam([param], lr=0.1, betas=(0.9, 0.999))
    components = SimpleNamespace(
        threat=artplug.Threat("linf", 0.1),
        optimizer=optimizer,
        base_lrs=[0.1],
        perturbation=None,
        losses=[],
    )
    artplug.engine.apply_knobs(components, {"lr_scale": 0.5, "momentum": 0.85})  # type: ignore[arg-type]
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.05)
    if name == "sgd":
        assert group["momentum"] == pytest.approx(0.85)
    else:
        assert group["betas"] == pytest.approx((0.85, 0.999))
