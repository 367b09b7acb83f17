"""Image classifiers for pixel-space inputs in [0, 1], with normalization inside the model.

Every architecture here follows the same conventions, which model transforms, perturbations and
loss terms rely on:

- the top-level model is an :class:`ImageClassifier` (a plain ``nn.Module``, never an
  ``nn.Sequential``: ART runs a Sequential child by child and would bypass ``forward``);
- its first submodule is ``normalize`` (a :class:`Normalize`), so attacks always work in [0, 1]
  (the RobustBench convention);
- every activation is its own ``nn.ReLU`` module (no functional ReLU), so a transform can swap
  activations by replacing modules;
- ``features(x)`` returns the flattened, pooled, post-activation penultimate features and
  ``forward(x) == fc(features(x))`` with ``fc`` an ``nn.Linear``;
- stages have stable names (``conv1``, ``layer1``... or ``block1``...) that latent-perturbation
  transforms use as sites.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

ARCHITECTURES: tuple[str, ...] = ("small-cnn", "preact-resnet18", "wide-resnet", "mnist-cnn")
"""Names accepted by :func:`build_model`."""


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics stored as buffers.

    Buffers (not parameters) so they move with ``.to(device)``, are saved in checkpoints and are
    never touched by the optimizer.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(
                f"mean and std need one value per channel; got {len(mean)} and {len(std)} values"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {tuple(std)}")
        # Shaped (1, C, 1, 1) to broadcast over NCHW batches in either memory format.
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize a batch ``x`` of shape ``(N, C, H, W)`` in pixel space."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        """Show the statistics in ``print(model)``."""
        mean = ", ".join(f"{v:.4f}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4f}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


class ImageClassifier(nn.Module):
    """Base class of every artplug architecture: ``normalize`` -> body -> ``fc``.

    Subclasses create ``normalize`` first (via this constructor) and an ``nn.Linear`` named
    ``fc`` last, and implement :meth:`features`.
    """

    fc: nn.Linear

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Registered before anything else so it is the first child module.
        self.normalize = Normalize(mean, std)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(N, fc.in_features)`` of a pixel-space batch ``x``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of a pixel-space batch ``x`` in [0, 1]."""
        return self.fc(self.features(x))


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm always follows or precedes it)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


# --------------------------------------------------------------------------------------------
# small-cnn
# --------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """``relu(bn(conv3x3(x)))``: the unit of :class:`SmallCNN`."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.conv = _conv3x3(in_planes, out_planes)
        self.bn = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Apply conv, batch norm and ReLU."""
        return self.relu(self.bn(self.conv(x)))


class SmallCNN(ImageClassifier):
    """A three-layer CNN sized for 8x8 scikit-learn digits (also runs on larger images).

    ``layer1`` (32 ch) -> ``layer2`` (64 ch) -> 2x2 max pool -> ``layer3`` (64 ch) -> adaptive
    average pool to 2x2 -> ``fc``. The 2x2 adaptive pool keeps coarse spatial layout (which
    matters on 8x8 digits, where a global pool would lose it) and makes any input size work.
    """

    def __init__(
        self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__(mean, std)
        self.layer1 = ConvBNReLU(in_channels, 32)
        self.layer2 = ConvBNReLU(32, 64)
        self.downsample = nn.MaxPool2d(2)
        self.layer3 = ConvBNReLU(64, 64)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64 * 2 * 2, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Flattened ``(N, 256)`` features after the last ReLU and the 2x2 pool."""
        out = self.normalize(x)
        out = self.layer2(self.layer1(out))
        out = self.layer3(self.downsample(out))
        return torch.flatten(self.pool(out), 1)


# --------------------------------------------------------------------------------------------
# mnist-cnn
# --------------------------------------------------------------------------------------------


class ConvReLUPool(nn.Module):
    """``maxpool2(relu(conv3x3(x)))``: a stage of :class:`MnistCNN` (no batch norm)."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        # Biased convolutions: no batch norm follows them.
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        """Apply conv, ReLU and 2x2 max pooling."""
        return self.pool(self.relu(self.conv(x)))


class MnistCNN(ImageClassifier):
    """A cheap CNN for 28x28 MNIST, in the layout of Madry et al.'s MNIST model.

    ``layer1`` (3x3 conv, 16 ch, ReLU, 2x2 max pool) -> ``layer2`` (3x3 conv, 32 ch, ReLU,
    2x2 max pool) -> ``hidden`` (fully connected, 256 units, ReLU) -> ``fc``. Madry et al.'s
    model (MadryLab/mnist_challenge ``model.py``) has the same two conv + pool stages and hidden
    layer with 5x5 kernels, 32/64 channels and 1024 units, about 14 M multiply-adds per 28x28
    image; this one needs about 1.4 M, and ``small-cnn`` (which convolves 64 channels at full
    resolution) about 22 M. A 40-step attack costs 41 forward/backward passes per training
    example, so that factor is what lets the MNIST recipes train in minutes on a CPU. The price
    is capacity, which robustness at eps 0.3 needs: expect lower robust accuracy than the
    papers' models reach. No batch norm, as in the papers' MNIST models, so the network is the
    same in train and eval mode.

    The adaptive average pool to 7x7 is the identity on 28x28 inputs and makes any other input
    size work.
    """

    def __init__(
        self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__(mean, std)
        self.layer1 = ConvReLUPool(in_channels, 16)
        self.layer2 = ConvReLUPool(16, 32)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.hidden = nn.Linear(32 * 7 * 7, 256)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(256, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Flattened ``(N, 256)`` features after the hidden layer's ReLU."""
        out = self.layer2(self.layer1(self.normalize(x)))
        out = torch.flatten(self.pool(out), 1)
        return self.relu(self.hidden(out))


# --------------------------------------------------------------------------------------------
# preact-resnet18
# --------------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings in Deep Residual Networks").

    ``bn1 -> relu1 -> conv1 -> bn2 -> relu2 -> conv2`` plus the shortcut. When the shape changes,
    the 1x1 projection shortcut takes the *pre-activated* input, as in the FastAT code.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Residual update of ``x``."""
        pre = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class PreActResNet18(ImageClassifier):
    """Pre-activation ResNet-18 for 32x32 images, as used by FastAT on CIFAR-10.

    ``conv1`` (64 ch) -> ``layer1``..``layer4`` (64/128/256/512 ch, two blocks each, strides
    1/2/2/2) -> ``bn`` -> ``relu`` -> global average ``pool`` -> ``fc``.
    """

    def __init__(
        self, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__(mean, std)
        self.conv1 = _conv3x3(in_channels, 64)
        self.layer1 = self._stage(64, 64, stride=1)
        self.layer2 = self._stage(64, 128, stride=2)
        self.layer3 = self._stage(128, 256, stride=2)
        self.layer4 = self._stage(256, 512, stride=2)
        # Pre-activation blocks end on a conv, so the head needs its own BN + ReLU.
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU()
        # Adaptive (not a fixed 4x4 average) so other input sizes still give (N, 512).
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        """Two blocks; only the first one may downsample."""
        return nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1))

    def features(self, x: Tensor) -> Tensor:
        """Flattened ``(N, 512)`` features after the final BN, ReLU and global pool."""
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.relu(self.bn(out))
        return torch.flatten(self.pool(out), 1)


# --------------------------------------------------------------------------------------------
# wide-resnet
# --------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block as in the Madry / TRADES CIFAR code.

    ``bn1 -> relu1 -> conv1 -> bn2 -> relu2 -> dropout -> conv2`` plus the shortcut; when the
    shape changes, the 1x1 projection shortcut takes the pre-activated input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        # Identity when disabled so the module tree has no no-op Dropout for transforms to find.
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(out_planes, out_planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(
                in_planes, out_planes, kernel_size=1, stride=stride, bias=False
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual update of ``x``."""
        pre = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.relu2(self.bn2(self.conv1(pre)))
        out = self.conv2(self.dropout(out))
        return out + shortcut


class WideResNet(ImageClassifier):
    """WRN-depth-width (Zagoruyko & Komodakis 2016) with pre-activation blocks.

    ``conv1`` (16 ch) -> ``block1``/``block2``/``block3`` (16w/32w/64w ch, ``(depth - 4) / 6``
    blocks each, strides 1/2/2) -> ``bn`` -> ``relu`` -> global average ``pool`` -> ``fc``.
    WRN-34-10 is the TRADES / Madry CIFAR-10 model, WRN-28-10 the common default.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        depth: int,
        width: int,
        dropout: float,
    ) -> None:
        super().__init__(mean, std)
        _check_wrn(depth, width, dropout)
        n = (depth - 4) // 6
        channels = (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = _conv3x3(in_channels, channels[0])
        self.block1 = self._stage(n, channels[0], channels[1], 1, dropout)
        self.block2 = self._stage(n, channels[1], channels[2], 2, dropout)
        self.block3 = self._stage(n, channels[2], channels[3], 2, dropout)
        self.bn = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        self._init_weights()

    @staticmethod
    def _stage(
        n: int, in_planes: int, out_planes: int, stride: int, dropout: float
    ) -> nn.Sequential:
        """``n`` blocks; only the first one changes width or resolution."""
        blocks = [WideBasicBlock(in_planes, out_planes, stride, dropout)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        """The initialization of the reference WRN code (He-normal fan-out convs, zero fc bias)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """Flattened ``(N, 64 * width)`` features after the final BN, ReLU and global pool."""
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn(out))
        return torch.flatten(self.pool(out), 1)


def _check_wrn(depth: int, width: int, dropout: float) -> None:
    """Raise ``ValueError`` for a WRN configuration that cannot be built."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(
            f"wide-resnet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), "
            f"got {depth}"
        )
    if width < 1:
        raise ValueError(f"wide-resnet width must be a positive integer, got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def build_model(
    arch: str,
    *,
    in_channels: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    depth: int = 28,
    width: int = 10,
    dropout: float = 0.0,
) -> ImageClassifier:
    """Build architecture ``arch`` for ``(in_channels, H, W)`` inputs in [0, 1].

    Every architecture pools adaptively, so any image size works.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        in_channels: input channels (1 for digits and MNIST, 3 for CIFAR/SVHN).
        num_classes: size of the output.
        mean, std: per-channel statistics for the ``normalize`` module (``in_channels`` values).
        depth, width, dropout: ``wide-resnet`` only (ignored by the other architectures);
            ``depth`` must be ``6n + 4``; ``dropout`` is applied inside every block.

    Returns:
        An :class:`ImageClassifier` in training mode on the CPU, mapping ``(N, C, H, W)`` to
        ``(N, num_classes)`` logits.

    Raises:
        ValueError: unknown ``arch`` or an invalid size, statistic or WRN setting.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(
            f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}"
        )
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean and std need {in_channels} values (one per input channel), "
            f"got {len(mean)} and {len(std)}"
        )
    if arch == "small-cnn":
        return SmallCNN(in_channels, num_classes, mean, std)
    if arch == "preact-resnet18":
        return PreActResNet18(in_channels, num_classes, mean, std)
    if arch == "mnist-cnn":
        return MnistCNN(in_channels, num_classes, mean, std)
    return WideResNet(
        in_channels, num_classes, mean, std, depth=depth, width=width, dropout=dropout
    )
