"""A linear toy model with a closed-form input gradient, shared by the formula tests.

``f(x) = W x + b`` has the cross-entropy input gradient ``(softmax(f(x)) - onehot(y)) @ W``, so
an attack's result can be compared with the formula instead of with itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear_model(
    shape: tuple[int, ...], classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64
) -> nn.Module:
    """Flatten + Linear on inputs of ``shape`` with fixed random weights, in eval mode."""
    dim = math.prod(shape)
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(dim, classes).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(classes, dim, generator=gen, dtype=dtype))
        linear.bias.copy_(torch.randn(classes, generator=gen, dtype=dtype))
    return nn.Sequential(nn.Flatten(), linear).eval()


def head(model: nn.Module) -> nn.Linear:
    """The linear layer of the toy model (also through a wrapper)."""
    return next(m for m in model.modules() if isinstance(m, nn.Linear))


def ce_input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Closed-form gradient of the summed cross-entropy of the linear model w.r.t. ``x``."""
    linear = head(model)
    with torch.no_grad():
        probs = torch.softmax(x.flatten(1) @ linear.weight.T + linear.bias, dim=1)
        onehot = F.one_hot(y, probs.shape[1]).to(probs.dtype)
        return ((probs - onehot) @ linear.weight).view_as(x)
