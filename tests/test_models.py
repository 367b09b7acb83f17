"""Architectures: shapes, normalization inside the model, and the conventions plugins rely on."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from artplug.models import (
    ARCHITECTURES,
    ImageClassifier,
    Normalize,
    build_model,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)

# (arch, build_model kwargs, input shape): small sizes keep the suite fast.
CASES = [
    pytest.param(
        "small-cnn",
        {"in_channels": 1, "num_classes": 10, "mean": (0.3,), "std": (0.4,)},
        (1, 8, 8),
        id="small-cnn-digits",
    ),
    pytest.param(
        "small-cnn",
        {
            "in_channels": 3,
            "num_classes": 7,
            "mean": CIFAR_MEAN,
            "std": CIFAR_STD,
        },
        (3, 32, 32),
        id="small-cnn-32",
    ),
    pytest.param(
        "preact-resnet18",
        {
            "in_channels": 3,
            "num_classes": 10,
            "mean": CIFAR_MEAN,
            "std": CIFAR_STD,
        },
        (3, 32, 32),
        id="preact-resnet18",
    ),
    pytest.param(
        "wide-resnet",
        {
            "in_channels": 3,
            "num_classes": 100,
            "mean": CIFAR_MEAN,
            "std": CIFAR_STD,
            "depth": 10,
            "width": 1,
        },
        (3, 32, 32),
        id="wrn-10-1",
    ),
]


def _inputs(shape: tuple[int, int, int], n: int = 4) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))


def _build(arch: str, kwargs: dict[str, Any]) -> ImageClassifier:
    torch.manual_seed(0)
    return build_model(arch, **kwargs).eval()


def _replace_relus(model: nn.Module) -> int:
    """Replace every nn.ReLU child by nn.Identity in place; return how many were replaced."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
                count += 1
    return count


def test_architectures_constant_lists_every_arch() -> None:
    assert ARCHITECTURES == ("small-cnn", "preact-resnet18", "wide-resnet", "mnist-cnn")


@pytest.mark.parametrize(("arch", "kwargs", "shape"), CASES)
def test_output_and_feature_shapes(
    arch: str, kwargs: dict[str, Any], shape: tuple[int, int, int]
) -> None:
    model = _build(arch, kwargs)
    x = _inputs(shape)
    out = model(x)
    assert out.shape == (4, kwargs["num_classes"])
    assert isinstance(model.fc, nn.Linear)
    feats = model.features(x)
    assert feats.shape == (4, model.fc.in_features)
    # forward is exactly fc(features(x)): heads can be swapped by replacing fc.
    torch.testing.assert_close(model.fc(feats), out)
    # Penultimate features are post-activation (the HE transform relies on this).
    assert (feats >= 0).all()


@pytest.mark.parametrize(("arch", "kwargs", "shape"), CASES)
def test_structure_conventions(
    arch: str, kwargs: dict[str, Any], shape: tuple[int, int, int]
) -> None:
    model = _build(arch, kwargs)
    assert isinstance(model, ImageClassifier)
    assert not isinstance(model, nn.Sequential)
    first_name, first = next(iter(model.named_children()))
    assert first_name == "normalize"
    assert isinstance(first, Normalize)
    assert list(model.named_children())[-1][0] == "fc"
    # Statistics travel with checkpoints.
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


@pytest.mark.parametrize(("arch", "kwargs", "shape"), CASES)
def test_normalization_is_inside_the_model(
    arch: str, kwargs: dict[str, Any], shape: tuple[int, int, int]
) -> None:
    model = _build(arch, kwargs)
    x = _inputs(shape)
    out = model(x)
    mean = torch.tensor(kwargs["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(kwargs["std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x - mean) / std)
    body = copy.deepcopy(model)
    body.normalize = nn.Identity()  # type: ignore[assignment]  # the body without it
    torch.testing.assert_close(body((x - mean) / std), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("arch", "kwargs", "shape"), CASES)
def test_activations_are_unshared_relu_modules(
    arch: str, kwargs: dict[str, Any], shape: tuple[int, int, int]
) -> None:
    model = _build(arch, kwargs)
    relus = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.ReLU)]
    assert relus
    assert len({id(m) for m in relus}) == len(relus), "one ReLU instance per use site"
    x = _inputs(shape)
    out = model(x)
    assert _replace_relus(model) == len(relus)
    # If forward used a functional relu somewhere, the swap would leave it non-linear there;
    # with every ReLU gone the network is affine in x, and the output must change.
    assert not torch.allclose(model(x), out)
    # Max pooling is the only other non-linearity; make it linear too and check the whole
    # network became affine, which fails if any hidden functional activation remains.
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size))
    a, b = x[:1], x[1:2]
    torch.testing.assert_close(
        model(0.5 * a + 0.5 * b), 0.5 * model(a) + 0.5 * model(b), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(("arch", "kwargs", "shape"), CASES)
def test_channels_last(arch: str, kwargs: dict[str, Any], shape: tuple[int, int, int]) -> None:
    model = _build(arch, kwargs)
    x = _inputs(shape)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_named_stages() -> None:
    small = build_model("small-cnn", in_channels=1, num_classes=10, mean=(0.3,), std=(0.4,))
    assert {"layer1", "layer2", "layer3"} <= dict(small.named_children()).keys()
    resnet = build_model(
        "preact-resnet18",
        in_channels=3,
        num_classes=10,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
    )
    assert {"conv1", "layer1", "layer2", "layer3", "layer4"} <= dict(resnet.named_children()).keys()
    # ResNet-18: 2 blocks per stage, 4 stages.
    assert [len(getattr(resnet, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    wrn = build_model(
        "wide-resnet",
        in_channels=3,
        num_classes=10,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        depth=16,
        width=2,
    )
    assert {"conv1", "block1", "block2", "block3"} <= dict(wrn.named_children()).keys()
    assert [len(getattr(wrn, f"block{i}")) for i in range(1, 4)] == [2, 2, 2]
    assert wrn.fc.in_features == 64 * 2


def test_wide_resnet_dropout_inside_blocks() -> None:
    kwargs: dict[str, Any] = {"in_channels": 3, "num_classes": 10}
    kwargs["mean"] = CIFAR_MEAN
    with_dropout = build_model(
        "wide-resnet", **kwargs, std=CIFAR_STD, depth=10, width=1, dropout=0.3
    )
    drops = [m for m in with_dropout.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.3 for d in drops)
    without = build_model("wide-resnet", **kwargs, std=CIFAR_STD, depth=10, width=1)
    assert not any(isinstance(m, nn.Dropout) for m in without.modules())


@pytest.mark.parametrize("depth", [8, 12, 27, 4])
def test_wide_resnet_rejects_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 4"):
        build_model(
            "wide-resnet",
            in_channels=3,
            num_classes=10,
            mean=CIFAR_MEAN,
            std=CIFAR_STD,
            depth=depth,
            width=1,
        )


def test_unknown_arch_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="small-cnn, preact-resnet18, wide-resnet"):
        build_model("resnet50", in_channels=3, num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD)


def test_statistics_must_match_channels() -> None:
    with pytest.raises(ValueError, match="one per input channel"):
        build_model("small-cnn", in_channels=3, num_classes=10, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="positive"):
        Normalize((0.5,), (0.0,))


def test_small_cnn_learns_digits_quickly() -> None:
    """The default model reaches >95% clean test accuracy on digits in two CPU epochs."""
    from artplug.data import BatchLoader, load_dataset

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("small-cnn", in_channels=1, num_classes=10, mean=data.mean, std=data.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    loader = BatchLoader(*data.train, batch_size=64, shuffle=True)
    model.train()
    for _ in range(2):
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x_test, y_test = data.test
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.95


@pytest.mark.gpu
@pytest.mark.parametrize(("arch", "kwargs", "shape"), CASES)
def test_cuda_channels_last_bf16(
    arch: str, kwargs: dict[str, Any], shape: tuple[int, int, int]
) -> None:
    model = _build(arch, kwargs)
    x = _inputs(shape)
    expected = model(x)
    model = model.cuda().to(memory_format=torch.channels_last)
    xc = x.cuda().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(xc).cpu(), expected, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(xc)
    assert out.shape == expected.shape and torch.isfinite(out).all()
