"""Shared pieces of the reference-parity tests: a tiny float64 network, a batch, a state.

The reference re-implementations in this folder are written from the papers' equations and
from what the authors' released code does (each names the repository, file and function it
follows). They are deliberately plain — explicit softmax sums, explicit clips — and never call
artplug's helpers, so that a shared mistake cannot hide a difference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import artplug
from artplug.kinds import Progress

TOL = 1e-10


class TinyNet(nn.Module):
    """``fc(features(x))``: flatten, linear, tanh, then a linear head called ``fc`` (float64)."""

    def __init__(self, in_dim: int = 12, hidden: int = 6, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, hidden), nn.Tanh())
        self.fc = nn.Linear(hidden, classes)
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def batch(n: int = 5, seed: int = 1, low: float = 0.0, high: float = 1.0) -> tuple[Tensor, Tensor]:
    """Images of shape (n, 3, 2, 2) uniform in [low, high] and labels in 0..3 (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, 3, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=gen)
    return x, y


def state(model: nn.Module, eps: float) -> artplug.StepState:
    """A training step's state under an L-inf threat of radius ``eps``."""
    progress = Progress(epoch=0, step=0, steps_per_epoch=10, total_steps=100)
    return artplug.StepState(
        progress=progress, knobs={}, model=model, threat=artplug.Threat("linf", eps)
    )


def param_grads(loss: Tensor, model: nn.Module | list[nn.Parameter]) -> list[Tensor]:
    """Gradients of ``loss`` with respect to the parameters (of a model, in its order)."""
    params = list(model.parameters()) if isinstance(model, nn.Module) else model
    return list(torch.autograd.grad(loss, [p for p in params if p.requires_grad]))


def assert_close(a: Tensor, b: Tensor, what: str) -> None:
    """``a`` equals ``b`` to ``TOL`` (absolute, elementwise)."""
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max |difference| = {diff:.3e}"
