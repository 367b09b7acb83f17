"""Datasets (digits, torchvision errors and conversion) and the device-resident BatchLoader.

mnist-5k has its own file, tests/test_mnist.py."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from artplug.data import DATASETS, BatchLoader, DatasetSplits, crop_flip, load_dataset
from artplug.errors import DataError


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_dataset("digits")


def _rows(x: torch.Tensor, y: torch.Tensor) -> Counter[bytes]:
    """Multiset of (image, label) examples, as bytes."""
    return Counter(
        xi.numpy().tobytes() + int(yi).to_bytes(2, "little") for xi, yi in zip(x, y, strict=True)
    )


# ------------------------------------------------------------------------------------ digits


def test_datasets_constant() -> None:
    assert DATASETS == ("digits", "mnist-5k", "cifar10", "cifar100", "svhn", "synthetic")


def test_digits_shapes_types_and_range(digits: DatasetSplits) -> None:
    assert digits.name == "digits"
    assert digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    for x, y in (digits.train, digits.val, digits.test):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and y.shape == (x.shape[0],)
        assert x.device.type == "cpu"
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert digits.train[0].max() == 1.0  # scaled by 16, not by 255
    sizes = [len(s[1]) for s in (digits.train, digits.val, digits.test)]
    assert sum(sizes) == 1797
    assert sizes[1] == round(0.1 * 1797) and sizes[2] == round(0.2 * 1797)


def test_digits_splits_partition_the_dataset(digits: DatasetSplits) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = _rows(
        torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1),
        torch.from_numpy(bunch.target),
    )
    parts = [_rows(*s) for s in (digits.train, digits.val, digits.test)]
    # Same multiset as the full dataset and sizes summing to 1797: every example is in
    # exactly one split (this also holds if the dataset contains duplicate images).
    assert parts[0] + parts[1] + parts[2] == full


def test_digits_splits_are_stratified(digits: DatasetSplits) -> None:
    overall = torch.bincount(torch.cat([digits.train[1], digits.val[1], digits.test[1]]))
    for fraction, (_, y) in ((0.7, digits.train), (0.1, digits.val), (0.2, digits.test)):
        counts = torch.bincount(y, minlength=10)
        assert (counts > 0).all()
        # Stratified: each class within a couple of examples of its proportional share.
        assert ((counts - fraction * overall).abs() <= 2).all()


def test_digits_is_fixed_and_ignores_seed(digits: DatasetSplits) -> None:
    other = load_dataset("digits", seed=123, root="/nonexistent", download=True)
    for a, b in zip(
        (digits.train, digits.val, digits.test), (other.train, other.val, other.test), strict=True
    ):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert other.mean == digits.mean and other.std == digits.std


def test_digits_statistics_come_from_train(digits: DatasetSplits) -> None:
    x = digits.train[0].double()
    assert digits.mean == pytest.approx((x.mean().item(),))
    assert digits.std == pytest.approx((x.std(unbiased=False).item(),))


def test_digits_val_size_override() -> None:
    data = load_dataset("digits", val_size=0)
    assert len(data.val[1]) == 0 and len(data.train[1]) + len(data.test[1]) == 1797
    with pytest.raises(DataError, match="val_size"):
        load_dataset("digits", val_size=5000)


# ------------------------------------------------------------------------------- torchvision


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(DataError, match="digits, mnist-5k, cifar10, cifar100, svhn") as info:
        load_dataset("imagenet")
    assert "did you mean" not in str(info.value)


def test_plain_mnist_points_to_mnist_5k() -> None:
    # Full MNIST is not built in; the name most people will try gets a pointer to the sample.
    with pytest.raises(DataError, match="did you mean 'mnist-5k'"):
        load_dataset("mnist")


@pytest.mark.parametrize(
    ("name", "looked_for"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_torchvision_dataset(tmp_path: Path, name: str, looked_for: str) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert name in message
    assert str(tmp_path) in message
    assert str(tmp_path / looked_for) in message
    assert "download" in message


def test_default_root_honours_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARTPLUG_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError, match=str(tmp_path / "data")):
        load_dataset("cifar10")


class _FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10 (uint8 NHWC images, list of labels)."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        n = 200 if train else 50
        rng = np.random.default_rng(1 if train else 2)
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]


def test_torchvision_conversion_and_seeded_val(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    data = load_dataset("cifar10", root="/unused", val_size=50, seed=1)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert len(data.train[1]) == 150 and len(data.val[1]) == 50 and len(data.test[1]) == 50
    assert (torch.bincount(data.val[1], minlength=10) == 5).all()  # stratified
    # Train and val together are exactly the training set, converted to NCHW in [0, 1].
    source = _FakeCIFAR10("", train=True)
    expected = torch.from_numpy(source.data).permute(0, 3, 1, 2).float() / 255
    assert _rows(*data.train) + _rows(*data.val) == _rows(expected, torch.tensor(source.targets))
    assert data.train[0].is_contiguous() and data.train[0].dtype == torch.float32
    # The val choice is a function of the seed.
    same = load_dataset("cifar10", root="/unused", val_size=50, seed=1)
    other = load_dataset("cifar10", root="/unused", val_size=50, seed=2)
    assert torch.equal(same.val[0], data.val[0])
    assert not torch.equal(other.val[0], data.val[0])
    assert data.mean == (0.4914, 0.4822, 0.4465)


# ------------------------------------------------------------------------------- BatchLoader


def _indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel holds the example index, and labels equal to the index."""
    y = torch.arange(n)
    x = y.float().view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, y


def test_loader_covers_every_example_once_per_epoch() -> None:
    x, y = _indexed(103)
    loader = BatchLoader(x, y, batch_size=10, shuffle=True, seed=3)
    assert len(loader) == 11
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 11
        seen = torch.cat([yb for _, yb in batches])
        assert torch.equal(seen.sort().values, y)
        for xb, yb in batches:
            assert torch.equal(xb[:, 0, 0, 0].long(), yb)  # x and y stay paired


def test_loader_order_is_a_function_of_seed_and_epoch() -> None:
    x, y = _indexed(50)

    def order(seed: int, epoch: int | None = None) -> torch.Tensor:
        loader = BatchLoader(x, y, batch_size=8, shuffle=True, seed=seed)
        if epoch is not None:
            loader.set_epoch(epoch)
        return torch.cat([yb for _, yb in loader])

    assert torch.equal(order(0, 3), order(0, 3))
    assert not torch.equal(order(0, 3), order(0, 4))
    assert not torch.equal(order(0, 3), order(1, 3))
    assert torch.equal(order(0), order(0, 0))
    # Iterating advances the epoch: a second pass is epoch 1, as if set_epoch(1) was called.
    loader = BatchLoader(x, y, batch_size=8, shuffle=True, seed=0)
    list(loader)
    assert torch.equal(torch.cat([yb for _, yb in loader]), order(0, 1))


def test_loader_without_shuffle_keeps_order() -> None:
    x, y = _indexed(25)
    loader = BatchLoader(x, y, batch_size=10, shuffle=False)
    sizes = [len(yb) for _, yb in loader]
    assert sizes == [10, 10, 5]
    assert torch.equal(torch.cat([yb for _, yb in loader]), y)


def test_loader_drop_last() -> None:
    x, y = _indexed(103)
    loader = BatchLoader(x, y, batch_size=10, shuffle=True, drop_last=True)
    assert len(loader) == 10
    assert [len(yb) for _, yb in loader] == [10] * 10
    exact = BatchLoader(*_indexed(100), batch_size=10, shuffle=True, drop_last=True)
    assert len(exact) == 10


def test_loader_empty_split_and_bad_arguments() -> None:
    x, y = _indexed(0)
    assert len(BatchLoader(x, y, batch_size=4, shuffle=True)) == 0
    assert list(BatchLoader(x, y, batch_size=4, shuffle=True)) == []
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(*_indexed(4), batch_size=0, shuffle=False)
    with pytest.raises(ValueError, match="differ in length"):
        BatchLoader(torch.zeros(3, 1, 2, 2), torch.zeros(4), batch_size=1, shuffle=False)


def test_loader_never_pins_memory_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: torch.Tensor) -> torch.Tensor:
        raise AssertionError("pin_memory called for a CPU loader")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    loader = BatchLoader(*_indexed(8), batch_size=4, shuffle=True, device="cpu", non_blocking=True)
    assert len(list(loader)) == 2


def _translated(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` moved down by ``dy`` and right by ``dx`` pixels with zero fill (reference)."""
    out = torch.zeros_like(img)
    _, h, w = img.shape
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = img[:, i - dy, j - dx]
    return out


def _match(aug: torch.Tensor, img: torch.Tensor, padding: int) -> list[tuple[int, int, bool]]:
    """All (dy, dx, flipped) such that translating (then maybe mirroring) ``img`` gives ``aug``."""
    shifts = range(-padding, padding + 1)
    found = []
    for dy, dx, flipped in itertools.product(shifts, shifts, (False, True)):
        candidate = _translated(img, dy, dx)
        if flipped:
            candidate = candidate.flip(-1)
        if torch.equal(aug, candidate):
            found.append((dy, dx, flipped))
    return found


def _distinct_images(n: int, c: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in (0, 1] whose pixels are all distinct, across the whole batch."""
    total = n * c * size * size
    x = (torch.arange(total, dtype=torch.float32) + 1) / total
    return x.view(n, c, size, size), torch.arange(n)


@pytest.mark.parametrize("flip", [True, False])
def test_augmentation_is_crop_and_flip(flip: bool) -> None:
    x, y = _distinct_images(48)
    loader = BatchLoader(x, y, batch_size=16, shuffle=True, augment=True, flip=flip, seed=5)
    kinds: set[tuple[int, int, bool]] = set()
    for xb, yb in loader:
        assert xb.shape == (16, 2, 8, 8) and xb.dtype == x.dtype
        assert xb.min() >= 0.0 and xb.max() <= 1.0
        for aug, label in zip(xb, yb, strict=True):
            matches = _match(aug, x[label], padding=4)
            assert len(matches) == 1, "each augmented image is one shift (+ flip) of its source"
            kinds.add(matches[0])
    flipped = {k[2] for k in kinds}
    assert flipped == ({False, True} if flip else {False})
    assert len({k[:2] for k in kinds}) > 10  # many different crops are drawn
    # Same (seed, epoch) -> same augmentation.
    first, second = (
        BatchLoader(x, y, batch_size=16, shuffle=True, augment=True, flip=flip, seed=5)
        for _ in range(2)
    )
    for (a, _), (b, _) in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_crop_flip_explicit_parameters() -> None:
    x, _ = _distinct_images(3, c=1, size=5)
    shifts = torch.tensor([[2, 2], [0, 4], [4, 1]])  # padding 2: offsets in [0, 4]
    flips = torch.tensor([False, False, True])
    out = crop_flip(x, shifts, flips, padding=2)
    torch.testing.assert_close(out[0], x[0])  # centre window: unchanged
    torch.testing.assert_close(out[1], _translated(x[1], 2, -2))
    torch.testing.assert_close(out[2], _translated(x[2], -2, 1).flip(-1))


@pytest.mark.gpu
def test_cuda_loader_matches_cpu() -> None:
    x, y = _distinct_images(40)
    kwargs: dict[str, Any] = {"batch_size": 16, "shuffle": True, "augment": True, "seed": 7}
    cpu = list(BatchLoader(x, y, **kwargs))
    gpu = list(BatchLoader(x, y, device="cuda", non_blocking=True, **kwargs))
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == "cuda"
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
