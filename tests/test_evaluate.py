"""Tests of artplug.evaluate on a tiny CNN trained for a moment on sklearn's digits (1x8x8)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from artplug.evaluate import (
    ATTACK_ENTRIES,
    ATTACK_TABLE_VERSION,
    ATTACKS,
    evaluate,
    format_table,
    generate_adversarial,
)
from artplug.kinds import Threat

LINF = Threat("linf", 0.3)
L2 = Threat("l2", 1.0)


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
    assert ATTACK_TABLE_VERSION >= 1
    assert list(ATTACKS) == list(ATTACK_ENTRIES)
    assert {"clean", "fgsm", "pgd-20", "pgd-50"} <= set(ATTACKS)
    assert all(desc and "\n" not in desc for desc in ATTACKS.values())


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
    with pytest.raises(ValueError, match=r"'pgd-2000'.*known: clean, fgsm, pgd-20, pgd-50"):
        evaluate(model, x, y, LINF, ["clean", "pgd-2000"])
    with pytest.raises(ValueError, match="known:"):
        generate_adversarial(model, x, y, LINF, "autoattack")


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
    ]
    assert format_table({}).splitlines()[0] == "attack | accuracy"


def test_import_pulls_in_neither_art_nor_mlflow() -> None:
    code = (
        "import sys, artplug.evaluate\n"
        "bad = [m for m in ('art', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
