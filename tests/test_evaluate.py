"""Tests of artplug.evaluate on a tiny CNN trained for a moment on sklearn's digits (1x8x8)."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

import artplug.evaluate as ev
from artplug.errors import ArtplugError
from artplug.evaluate import (
    ATTACK_ENTRIES,
    ATTACK_TABLE_VERSION,
    ATTACKS,
    AUTOATTACK_ART_PARTS,
    AUTOATTACK_MISSING,
    PGD_ONLY_NOTE,
    MarginLoss,
    dlr_targets,
    evaluate,
    evaluate_detailed,
    format_table,
    generate_adversarial,
)
from artplug.kinds import Threat

LINF = Threat("linf", 0.3)
L2 = Threat("l2", 1.0)

TABLE = (
    "clean",
    "fgsm",
    "pgd-20",
    "pgd-50",
    "pgd-20-cw",
    "pgd-50-cw",
    "apgd-ce",
    "apgd-dlr",
    "square",
    "cw-l2",
    "autoattack-art",
    "autoattack",
)
"""The entry names other code relies on, in table order."""
ATTACKED = [name for name in TABLE if name not in ("clean", "autoattack")]
"""Every entry that attacks through ART (``autoattack`` needs an optional package)."""
HAS_AUTOATTACK = any(importlib.util.find_spec(m) for m in ("pyautoattack", "autoattack"))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on models this small, more threads only spin and wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """Conv + BatchNorm + dropout, so eval/train mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(self.drop(h.flatten(1)))


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.int64)
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="module")
def trained(digits: tuple[Tensor, Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
    """State dict of a TinyNet trained for 150 quick steps (about 95% test accuracy)."""
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        idx = torch.randint(0, len(x), (128,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model(trained: dict[str, Tensor]) -> TinyNet:
    net = TinyNet()
    net.load_state_dict(trained)
    return net.eval()


@pytest.fixture
def test_set(digits: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return digits[2], digits[3]


def plain_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_table_is_versioned_and_described() -> None:
    assert ATTACK_TABLE_VERSION == 2
    assert list(ATTACKS) == list(ATTACK_ENTRIES) == list(TABLE)
    assert all(desc and "\n" not in desc for desc in ATTACKS.values())
    assert all(entry.cost and "\n" not in entry.cost for entry in ATTACK_ENTRIES.values())
    assert "pip install 'artplug[autoattack]'" in ATTACKS["autoattack"]
    assert AUTOATTACK_ART_PARTS == ("apgd-ce", "apgd-dlr", "square")
    # Every entry's parameters are documented in the module docstring.
    assert ev.__doc__ is not None
    assert all(f"``{name}``" in ev.__doc__ for name in TABLE)


def test_clean_accuracy_equals_plain_forward(
    model: TinyNet, test_set: tuple[Tensor, Tensor]
) -> None:
    x, y = test_set
    expected = plain_accuracy(model, x, y)
    assert expected > 0.85  # the model learned something, so the attack checks below mean something
    result = evaluate(model, x, y, LINF, ["clean"], batch_size=128)
    assert result == {"clean": pytest.approx(expected, abs=1e-6)}


def test_attacks_lower_accuracy_in_order(model: TinyNet, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    seen: list[str] = []
    result = evaluate(model, x, y, LINF, ["pgd-20", "clean", "fgsm"], on_attack=seen.append)
    assert list(result) == ["pgd-20", "clean", "fgsm"]  # requested order
    assert seen == ["pgd-20", "clean", "fgsm"]
    assert all(0.0 <= acc <= 1.0 for acc in result.values())
    assert result["pgd-20"] <= result["fgsm"] + 0.01
    assert result["fgsm"] <= result["clean"]
    assert result["pgd-20"] < result["clean"] - 0.5  # eps 0.3 on digits breaks a standard model


def test_on_batch_counts_the_model_passes_of_each_entry(
    model: TinyNet, test_set: tuple[Tensor, Tensor]
) -> None:
    x, y = test_set[0][:100], test_set[1][:100]
    current: list[str] = []
    counts: dict[str, list[int]] = {}

    def started(name: str) -> None:
        current.append(name)
        counts[name] = []

    def batch(count: int) -> None:
        counts[current[-1]].append(count)

    evaluate(
        model,
        x,
        y,
        LINF,
        ["clean", "fgsm", "pgd-20"],
        batch_size=50,
        on_attack=started,
        on_batch=batch,
    )
    # 100 examples in batches of 50: the clean pass is two batches; each entry counts from 1.
    assert counts["clean"] == [1, 2]
    for name in ("fgsm", "pgd-20"):
        assert counts[name] == list(range(1, len(counts[name]) + 1)), name
    # Each of PGD's 20 steps runs every batch through the model: far more than FGSM's one step.
    assert len(counts["pgd-20"]) >= 20 * len(counts["fgsm"]) // 2 > 0


@pytest.mark.parametrize("name", ["fgsm", "pgd-20"])
def test_linf_examples_inside_ball_and_box(
    model: TinyNet, test_set: tuple[Tensor, Tensor], name: str
) -> None:
    x, y = test_set
    x_adv = generate_adversarial(model, x, y, LINF, name, batch_size=128)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert float((x_adv - x).abs().max()) <= LINF.eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - x).abs().max()) > LINF.eps / 2  # the attack moved the inputs
    # The returned batch is exactly what evaluate scores.
    acc = evaluate(model, x, y, LINF, [name], batch_size=128)[name]
    assert plain_accuracy(model, x_adv, y) == pytest.approx(acc, abs=1e-6)


@pytest.mark.parametrize("name", ["fgsm", "pgd-20"])
def test_l2_examples_inside_ball_and_box(
    model: TinyNet, test_set: tuple[Tensor, Tensor], name: str
) -> None:
    x, y = test_set
    x_adv = generate_adversarial(model, x, y, L2, name, batch_size=128)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= L2.eps + 1e-5
    assert float(norms.max()) > L2.eps / 2
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    result = evaluate(model, x, y, L2, ["clean", name])
    assert result[name] < result["clean"]


def test_misclassified_examples_are_not_attacked(
    model: TinyNet, test_set: tuple[Tensor, Tensor]
) -> None:
    x, y = test_set
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.any()
    x_adv = generate_adversarial(model, x, y, LINF, "pgd-20")
    assert torch.equal(x_adv[wrong], x[wrong])
    assert torch.equal(generate_adversarial(model, x, y, LINF, "clean"), x)


def test_zero_eps_gives_clean_accuracy(model: TinyNet, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    result = evaluate(model, x, y, Threat("linf", 0.0), ["clean", "fgsm", "pgd-20"])
    assert result["fgsm"] == result["pgd-20"] == result["clean"]


def test_seeded_and_leaves_global_rng_alone(
    model: TinyNet, test_set: tuple[Tensor, Tensor]
) -> None:
    x, y = test_set
    x, y = x[:64], y[:64]
    np.random.seed(123)
    torch.manual_seed(123)
    expected_np, expected_torch = np.random.rand(), torch.rand(1)
    np.random.seed(123)
    torch.manual_seed(123)
    a = generate_adversarial(model, x, y, Threat("linf", 0.1), "pgd-20", seed=7)
    # The evaluation neither consumed nor reseeded the caller's random streams.
    assert np.random.rand() == expected_np
    assert torch.equal(torch.rand(1), expected_torch)
    b = generate_adversarial(model, x, y, Threat("linf", 0.1), "pgd-20", seed=7)
    c = generate_adversarial(model, x, y, Threat("linf", 0.1), "pgd-20", seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the random start depends on the seed


def test_model_state_restored(model: TinyNet, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    model.train()
    model.bn.eval()  # a mixed state (frozen BatchNorm) must come back exactly
    frozen = model.conv.bias
    assert frozen is not None
    frozen.requires_grad_(False)
    for p in model.parameters():
        p.grad = None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, x, y, LINF, ["clean", "fgsm", "pgd-20"])
    assert model.training and model.head.training and model.drop.training
    assert not model.bn.training
    assert all(p.grad is None for p in model.parameters())
    assert not frozen.requires_grad and model.conv.weight.requires_grad
    # Eval mode during the attack: BatchNorm running statistics are untouched.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_existing_gradients_survive(model: TinyNet, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    model.head.weight.grad = None  # a mix of parameters with and without gradients
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    generate_adversarial(model, x[:32], y[:32], LINF, "pgd-20")
    after = [p.grad for p in model.parameters()]
    assert after[-2] is None and before[-2] is None  # head.weight
    for old, new in zip(before, after, strict=True):
        assert (old is None and new is None) or (
            old is not None and new is not None and torch.equal(old, new)
        )


def test_sequential_subclass_forward_is_respected(test_set: tuple[Tensor, Tensor]) -> None:
    """ART alone would run an nn.Sequential child by child and skip an overridden forward."""

    class Inverted(nn.Sequential):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(1.0 - x)

    x, y = test_set
    torch.manual_seed(0)
    net = Inverted(nn.Flatten(), nn.Linear(64, 10))
    expected = plain_accuracy(net, x, y)
    with torch.no_grad():
        skipped = float((nn.Sequential(*net)(x).argmax(1) == y).float().mean())
    assert expected != skipped  # otherwise the test proves nothing
    assert evaluate(net, x, y, LINF, ["clean"])["clean"] == pytest.approx(expected, abs=1e-6)


def test_unknown_attack_lists_known_names(model: TinyNet, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    with pytest.raises(ValueError, match=r"'pgd-2000'.*known: clean, fgsm, pgd-20, pgd-50, "):
        evaluate(model, x, y, LINF, ["clean", "pgd-2000"])
    with pytest.raises(ValueError, match=r"known:.*autoattack-art"):
        generate_adversarial(model, x, y, LINF, "autoattack-standard")


def test_bad_inputs_are_rejected(model: TinyNet, test_set: tuple[Tensor, Tensor]) -> None:
    x, y = test_set
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(model, (x - 0.5) / 0.25, y, LINF, ["clean"])
    with pytest.raises(ValueError, match="class index"):
        evaluate(model, x, y[:-1], LINF, ["clean"])
    with pytest.raises(ValueError, match="eps"):
        evaluate(model, x, y, Threat("linf", -0.1), ["clean"])


def test_format_table() -> None:
    text = format_table({"clean": 0.9512, "pgd-20": 0.4}, title="digits, linf 0.3")
    assert text.splitlines() == [
        "digits, linf 0.3",
        "attack | accuracy",
        "-------+---------",
        "clean  |   95.12%",
        "pgd-20 |   40.00%",
        "strongest single attack: pgd-20 (40.00%)",
        PGD_ONLY_NOTE,
    ]
    assert format_table({}).splitlines() == ["attack | accuracy", "-------+---------"]


def test_import_pulls_in_neither_art_nor_mlflow() -> None:
    code = (
        "import sys, artplug.evaluate\n"
        "bad = [m for m in ('art', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------
# Attack table version 2: every entry, the worst case, the margin loss, the DLR targets


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheaper iteration counts for the multi-attack tests (the shipped ones run elsewhere)."""
    budgets = {
        "apgd-ce": ev.apgd_ce_runner(20),
        "apgd-dlr": ev.apgd_dlr_runner(20, 9),
        "square": ev.square_runner(300),
        "cw-l2": ev.cw_l2_runner(5, 10),
    }
    for name, run in budgets.items():
        monkeypatch.setitem(ATTACK_ENTRIES, name, replace(ATTACK_ENTRIES[name], run=run))


def assert_in_ball_and_box(x_adv: Tensor, x: Tensor, threat: Threat) -> None:
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if threat.norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= threat.eps + 1e-5
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.mark.parametrize("threat", [LINF, Threat("l2", 2.0)], ids=["linf", "l2"])
@pytest.mark.parametrize("name", ATTACKED)
def test_every_entry_as_shipped_breaks_a_standard_model_inside_the_ball(
    model: TinyNet, test_set: tuple[Tensor, Tensor], name: str, threat: Threat
) -> None:
    """The real parameters, on a handful of examples at a sizable eps."""
    x, y = test_set
    x, y = x[:16], y[:16]
    x_adv = generate_adversarial(model, x, y, threat, name, batch_size=64)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert_in_ball_and_box(x_adv, x, threat)
    assert plain_accuracy(model, x_adv, y) < plain_accuracy(model, x, y)


@pytest.mark.parametrize("threat", [Threat("linf", 0.1), Threat("l2", 0.5)], ids=["linf", "l2"])
def test_masks_match_the_returned_examples_at_a_moderate_eps(
    model: TinyNet, test_set: tuple[Tensor, Tensor], threat: Threat, small_budget: None
) -> None:
    """Where some examples survive, the masks say exactly which returned inputs fool the model."""
    x, y = test_set
    x, y = x[:48], y[:48]
    names = ["apgd-dlr", "square", "cw-l2", "autoattack-art"]
    accuracy, robust = evaluate_detailed(model, x, y, threat, names, batch_size=64)
    for name in names:
        x_adv = generate_adversarial(model, x, y, threat, name, batch_size=64)
        assert_in_ball_and_box(x_adv, x, threat)
        with torch.no_grad():
            survived = model(x_adv).argmax(1) == y
        assert torch.equal(survived, robust[name]), name
        assert accuracy[name] == pytest.approx(float(robust[name].float().mean()))
    assert 0.0 < accuracy["autoattack-art"] < plain_accuracy(model, x, y)


def test_evaluate_detailed_masks_and_worst_case(
    model: TinyNet, test_set: tuple[Tensor, Tensor]
) -> None:
    x, y = test_set
    x, y = x[:64], y[:64]
    names = ["fgsm", "clean", "pgd-20-cw"]
    threat = Threat("linf", 0.1)
    accuracy, robust = evaluate_detailed(model, x, y, threat, names, batch_size=32)
    assert list(accuracy) == list(robust) == [*names, "worst"]
    for name, mask in robust.items():
        assert mask.dtype == torch.bool and mask.shape == (64,) and mask.device == x.device
        assert accuracy[name] == pytest.approx(float(mask.float().mean()))
        assert not (mask & ~robust["clean"]).any()  # robust implies clean-correct
    assert torch.equal(robust["worst"], robust["fgsm"] & robust["pgd-20-cw"])
    assert accuracy["worst"] <= min(accuracy.values())
    # evaluate gives the same numbers, without "worst".
    assert evaluate(model, x, y, threat, names, batch_size=32) == {
        name: accuracy[name] for name in names
    }
    assert evaluate_detailed(model, x, y, threat, []) == ({}, {})
    only_clean = evaluate_detailed(model, x, y, threat, ["clean"])[1]
    assert torch.equal(only_clean["worst"], only_clean["clean"])


def test_autoattack_art_is_the_worst_case_of_its_parts(
    model: TinyNet, test_set: tuple[Tensor, Tensor], small_budget: None
) -> None:
    x, y = test_set
    x, y = x[:64], y[:64]
    threat = Threat("linf", 0.1)
    names = [*AUTOATTACK_ART_PARTS, "autoattack-art"]
    accuracy, robust = evaluate_detailed(model, x, y, threat, names, batch_size=64)
    combined = robust["autoattack-art"]
    # Its first stage is exactly apgd-ce on the same inputs; later stages only remove examples.
    assert not (combined & ~robust["apgd-ce"]).any()
    # The later parts run on survivors (other random draws), so against them the worst case
    # holds up to the odd example.
    assert accuracy["autoattack-art"] <= min(accuracy[n] for n in AUTOATTACK_ART_PARTS) + 2 / 64
    assert torch.equal(robust["worst"], combined & robust["apgd-dlr"] & robust["square"])
    # The same number when asked for alone (reusing apgd-ce's run changes nothing).
    alone = evaluate(model, x, y, threat, ["autoattack-art"], batch_size=64)
    assert alone["autoattack-art"] == accuracy["autoattack-art"]


class Saturated(nn.Module):
    """Class 0 by a margin of 0.1 * scale at mean pixel 0.5; class 1 wins once the mean > 0.6.

    At scale 2000 the softmax saturates in float32 (exp(-200) == 0), so the cross-entropy's
    gradient is exactly zero and CE-PGD cannot move; the margin's gradient is not.
    """

    def __init__(self, scale: float = 2000.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        mean = x.flatten(1).mean(dim=1)
        logits = torch.full((x.shape[0], 10), -self.scale, dtype=x.dtype, device=x.device)
        logits[:, 0] = 0.0
        logits[:, 1] = self.scale * (mean - 0.6)
        return logits


def test_pgd_cw_maximises_the_margin_where_cross_entropy_saturates() -> None:
    net = Saturated()
    x = torch.full((8, 1, 8, 8), 0.5)
    y = torch.zeros(8, dtype=torch.int64)
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net(x_req), y), x_req)
    assert not grad.any()  # the premise: CE gives no signal at all
    threat = Threat("linf", 0.2)
    result = evaluate(net, x, y, threat, ["clean", "pgd-20", "pgd-20-cw", "pgd-50-cw"])
    assert result == {"clean": 1.0, "pgd-20": 1.0, "pgd-20-cw": 0.0, "pgd-50-cw": 0.0}


def test_margin_loss_matches_an_independent_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=generator).requires_grad_(True)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    expected = []
    for row, label in zip(logits.tolist(), y.tolist(), strict=True):
        expected.append(max(v for k, v in enumerate(row) if k != label) - row[label])
    loss = MarginLoss(reduction="none")
    assert loss(logits, y).tolist() == pytest.approx(expected)
    one_hot = nn.functional.one_hot(y, 5).float()
    assert torch.equal(loss(logits, one_hot), loss(logits, y))  # ART passes one-hot labels
    assert float(MarginLoss()(logits, y).detach()) == pytest.approx(sum(expected) / 6)
    (grad,) = torch.autograd.grad(MarginLoss(reduction="sum")(logits, y), logits)
    for i, label in enumerate(y.tolist()):
        others = [k for k in range(5) if k != label]
        top = max(others, key=lambda k: float(logits[i, k].detach()))
        expected_row = torch.zeros(5)
        expected_row[label], expected_row[top] = -1.0, 1.0
        assert torch.equal(grad[i], expected_row)


def test_dlr_targets_are_the_most_likely_other_classes() -> None:
    logits = np.array([[5.0, 1.0, 3.0, 4.0], [0.0, 2.0, 2.0, 9.0]])
    assert dlr_targets(logits, np.array([0, 3]), 3).tolist() == [[3, 2, 1], [1, 2, 0]]
    assert dlr_targets(logits, np.array([3, 3]), 1).tolist() == [[0], [1]]


class _Spy:
    """Stands in for ART's APGD ``generate``: records each call and breaks nothing."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, attack: Any, x: np.ndarray, y: Any = None, **kwargs: Any) -> np.ndarray:
        self.calls.append(
            {
                "n": len(x),
                "targets": np.asarray(y).copy(),
                "targeted": attack.targeted,
                "loss_type": attack.loss_type,
                "max_iter": attack.max_iter,
                "eps_step": attack.eps_step,
                "nb_random_init": attack.nb_random_init,
                "batch_size": attack.batch_size,
            }
        )
        return x.copy()


def test_apgd_dlr_tries_the_top_k_other_classes_in_order(
    model: TinyNet, test_set: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    from art.attacks.evasion import AutoProjectedGradientDescent

    spy = _Spy()

    def generate(attack: Any, x: np.ndarray, y: Any = None, **kwargs: Any) -> np.ndarray:
        return spy(attack, x, y, **kwargs)

    monkeypatch.setattr(AutoProjectedGradientDescent, "generate", generate)
    x, y = test_set
    x, y = x[:12], y[:12]
    with torch.no_grad():
        logits = model(x)
    correct = logits.argmax(1) == y
    assert evaluate(model, x, y, LINF, ["apgd-dlr"], batch_size=50) == {
        "apgd-dlr": pytest.approx(float(correct.float().mean()))
    }
    assert len(spy.calls) == 9  # min(9, K - 1) targets, every example surviving each one
    others = logits[correct].masked_fill(nn.functional.one_hot(y[correct], 10).bool(), -1e9)
    expected = others.argsort(dim=1, descending=True)[:, :9].numpy()
    for rank, call in enumerate(spy.calls):
        assert call["n"] == int(correct.sum())
        assert np.array_equal(call["targets"], expected[:, rank])
        assert call["targeted"] and call["loss_type"] == "difference_logits_ratio"
        assert call["max_iter"] == 100 and call["nb_random_init"] == 1
        assert call["eps_step"] == pytest.approx(2 * LINF.eps) and call["batch_size"] == 50

    # With K = 4 classes there are only K - 1 = 3 other classes to target.
    spy.calls.clear()
    torch.manual_seed(0)
    four = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    y4 = four(x).argmax(1).detach()
    assert evaluate(four, x, y4, LINF, ["apgd-dlr"]) == {"apgd-dlr": 1.0}
    assert len(spy.calls) == 3


def test_apgd_dlr_needs_three_classes(test_set: tuple[Tensor, Tensor]) -> None:
    x, _ = test_set
    torch.manual_seed(0)
    two = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    y = two(x[:8]).argmax(1).detach()
    with pytest.raises(ValueError, match="at least 3 classes"):
        evaluate(two, x[:8], y, LINF, ["apgd-dlr"])


def test_square_memo_saves_passes_without_changing_the_result(
    model: TinyNet, test_set: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    from art.estimators.classification import PyTorchClassifier

    x, y = test_set
    x, y = x[:32], y[:32]
    threat = Threat("linf", 0.1)
    rows = 0
    real_predict = PyTorchClassifier.predict

    def counting(self: Any, x: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        nonlocal rows
        rows += len(x)
        return real_predict(self, x, *args, **kwargs)

    monkeypatch.setattr(PyTorchClassifier, "predict", counting)
    results, counts = [], []
    for memo in (True, False):
        run = ev.square_runner(200, memo=memo)
        monkeypatch.setitem(ATTACK_ENTRIES, "square", replace(ATTACK_ENTRIES["square"], run=run))
        rows = 0
        results.append(generate_adversarial(model, x, y, threat, "square", seed=3))
        counts.append(rows)
    assert torch.equal(results[0], results[1])
    assert plain_accuracy(model, results[0], y) < plain_accuracy(model, x, y)
    # ART predicts every example and the survivors twice per iteration; only one is new.
    assert counts[0] < 0.5 * counts[1]


def test_pgd_success_rate_passes_cost_no_forward(
    model: TinyNet, test_set: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ART's PGD predicts clean and adversarial inputs for its log; the memo answers both."""
    from art.estimators.classification import PyTorchClassifier

    x, y = test_set
    x, y = x[:40], y[:40]
    rows = 0
    real_predict = PyTorchClassifier.predict

    def counting(self: Any, x: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        nonlocal rows
        rows += len(x)
        return real_predict(self, x, *args, **kwargs)

    monkeypatch.setattr(PyTorchClassifier, "predict", counting)
    accuracy = evaluate(model, x, y, Threat("linf", 0.1), ["clean", "pgd-20", "pgd-20-cw"])
    attacked = round(accuracy["clean"] * 40)
    # The clean pass, then each attack's adversarial examples once (fewer where the two
    # attacks end on the same inputs); without the memo it would be 40 + 6 * attacked.
    assert 40 + attacked < rows <= 40 + 2 * attacked


def test_logit_memo_answers_repeated_rows_only() -> None:
    memo = ev.LogitMemo(generations=2)
    seen: list[int] = []

    def compute(rows: np.ndarray) -> np.ndarray:
        seen.append(len(rows))
        return rows.reshape(len(rows), -1)[:, :3] * 2.0

    a = np.random.default_rng(0).random((4, 1, 2, 2), dtype=np.float32)
    b = a + 1.0
    np.testing.assert_array_equal(memo.predict(compute, a), compute(a))
    mixed = np.concatenate([b[:2], a[[3, 0]]])
    np.testing.assert_array_equal(memo.predict(compute, mixed), compute(mixed))
    assert seen == [4, 4, 2, 4]  # only b's two rows were new in the second call
    memo.predict(compute, b[2:])  # the first generation falls out of the memo
    memo.predict(compute, a[1:2])  # seen in the first call only
    assert seen[-1] == 1 and memo.rows_predicted == 4 + 2 + 2 + 1
    # Pinned rows (the clean inputs) outlive the rolling generations.
    memo.predict(compute, a, pin=True)  # a[1] is remembered: 3 rows computed
    for _ in range(3):
        memo.predict(compute, b)  # b[2:] is remembered: 2 rows computed, then none
    calls = len(seen)
    np.testing.assert_array_equal(memo.predict(compute, a), compute(a))
    assert len(seen) == calls + 1  # only the check above computed: a came from the pin
    assert memo.rows_predicted == 9 + 3 + 2


def test_l2_square_is_seeded_and_leaves_python_random_alone(
    model: TinyNet, test_set: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ART's L2 Square draws from Python's ``random`` too."""
    run = ev.square_runner(100)
    monkeypatch.setitem(ATTACK_ENTRIES, "square", replace(ATTACK_ENTRIES["square"], run=run))
    x, y = test_set
    x, y = x[:16], y[:16]
    threat = Threat("l2", 0.5)
    random.seed(5)
    expected = random.random()
    random.seed(5)
    a = generate_adversarial(model, x, y, threat, "square", seed=1)
    assert random.random() == expected
    random.seed(99)  # a different caller state changes nothing
    b = generate_adversarial(model, x, y, threat, "square", seed=1)
    assert torch.equal(a, b)


def test_cw_l2_counts_only_examples_inside_the_ball(
    model: TinyNet, test_set: tuple[Tensor, Tensor], small_budget: None
) -> None:
    x, y = test_set
    x, y = x[:32], y[:32]
    tiny = Threat("l2", 0.05)  # far below the minimal perturbation C&W finds on digits
    assert evaluate(model, x, y, tiny, ["clean", "cw-l2"]) == {
        "clean": plain_accuracy(model, x, y),
        "cw-l2": plain_accuracy(model, x, y),
    }
    assert torch.equal(generate_adversarial(model, x, y, tiny, "cw-l2"), x)


def test_missing_autoattack_is_one_clear_line_before_any_work(
    model: TinyNet, test_set: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("pyautoattack", "autoattack"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    x, y = test_set
    started: list[str] = []
    with pytest.raises(ArtplugError) as info:
        evaluate(model, x, y, LINF, ["clean", "pgd-20", "autoattack"], on_attack=started.append)
    assert str(info.value) == AUTOATTACK_MISSING
    assert info.value.one_line() == AUTOATTACK_MISSING and "\n" not in AUTOATTACK_MISSING
    assert started == []  # raised before the first attack started
    with pytest.raises(ArtplugError, match="pyautoattack"):
        generate_adversarial(model, x, y, LINF, "autoattack")


def test_autoattack_also_runs_a_source_install_of_fra31_autoattack(
    model: TinyNet, test_set: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``autoattack`` (fra31/auto-attack from git) has ``bs=``, ``verbose`` and returns x_adv."""
    import types

    calls: dict[str, Any] = {}

    class AutoAttack:
        def __init__(
            self,
            model: nn.Module,
            norm: str = "Linf",
            eps: float = 0.3,
            seed: int | None = None,
            verbose: bool = True,
            attacks_to_run: tuple[str, ...] = (),
            version: str = "standard",
            device: str = "cuda",
        ) -> None:
            calls.update(norm=norm, eps=eps, seed=seed, verbose=verbose, version=version)

        def run_standard_evaluation(self, x: Tensor, y: Tensor, bs: int = 250) -> Tensor:
            calls["bs"] = bs
            return (x + 0.1).clamp(0.0, 1.0)  # a stand-in "attack" inside the ball

    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=AutoAttack))
    x, y = test_set
    x, y = x[:16], y[:16]
    x_adv = generate_adversarial(model, x, y, Threat("l2", 2.0), "autoattack", batch_size=8, seed=4)
    assert calls == {
        "norm": "L2",
        "eps": 2.0,
        "seed": 4,
        "verbose": False,
        "version": "standard",
        "bs": 8,
    }
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    expected = torch.where(wrong[:, None, None, None], x, (x + 0.1).clamp(0.0, 1.0))
    assert torch.equal(x_adv, expected)


@pytest.mark.skipif(not HAS_AUTOATTACK, reason="pyautoattack (artplug[autoattack]) not installed")
def test_standard_autoattack_agrees_with_autoattack_art(
    model: TinyNet, test_set: tuple[Tensor, Tensor]
) -> None:
    x, y = test_set
    x, y = x[:48], y[:48]
    threat = Threat("linf", 0.1)
    accuracy, robust = evaluate_detailed(
        model, x, y, threat, ["clean", "autoattack", "autoattack-art"], batch_size=64
    )
    assert 0.0 < accuracy["autoattack"] < accuracy["clean"]
    assert abs(accuracy["autoattack"] - accuracy["autoattack-art"]) <= 0.05
    x_adv = generate_adversarial(model, x, y, threat, "autoattack", batch_size=64)
    assert_in_ball_and_box(x_adv, x, threat)
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1) == y, robust["autoattack"])
