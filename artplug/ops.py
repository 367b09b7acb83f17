"""Tensor helpers for perturbation plugins: projection, random starts and steepest-ascent steps.

All functions work on batches (first dimension = examples) in pixel space [0, 1] and never
touch model parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from artplug.kinds import Threat

# Guards divisions by a per-example norm that can be exactly zero (a zero gradient, eps = 0).
_TINY = 1e-12


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def full_precision(t: Tensor) -> Tensor:
    """``t`` in float32 when it is float16 or bfloat16 (AMP), else unchanged.

    For losses and saliencies on AMP outputs: scaling, log-softmax differences and small
    corrections lose most of their digits in half precision, while float64 inputs (tests) keep
    theirs.
    """
    return t.float() if t.dtype in _HALF_DTYPES else t


def _per_example_l2(t: Tensor) -> Tensor:
    """L2 norm of each example, shaped to broadcast against ``t``."""
    norms = t.flatten(1).norm(p=2, dim=1)
    return norms.view(-1, *([1] * (t.dim() - 1)))


def project_ball(delta: Tensor, threat: Threat) -> Tensor:
    """Project the perturbation ``delta`` onto ``threat``'s ball around the origin.

    L-inf: clip every coordinate to [-eps, eps]. L2: rescale each example that lies outside
    onto the sphere of radius eps. No [0, 1] clip (use :func:`project` for points): for a
    perturbation kept across batches (FreeAT's δ) the box depends on the batch it is added to.
    """
    if threat.norm == "linf":
        return delta.clamp(-threat.eps, threat.eps)
    factor = (threat.eps / (_per_example_l2(delta) + _TINY)).clamp(max=1.0)
    return delta * factor


def project(x_adv: Tensor, x: Tensor, threat: Threat) -> Tensor:
    """Project ``x_adv`` onto ``threat``'s ball around ``x``, then clip to [0, 1].

    Clipping after the projection keeps the point inside the ball: since ``x`` is in [0, 1],
    clipping only moves coordinates towards ``x``.
    """
    return (x + project_ball(x_adv - x, threat)).clamp(0.0, 1.0)


def random_start(x: Tensor, threat: Threat) -> Tensor:
    """A point drawn uniformly from the threat ball around ``x`` (clipped to [0, 1]).

    L-inf: each coordinate uniform in [-eps, eps]. L2: a uniformly random direction and a
    radius ``eps * u ** (1/d)`` with ``u ~ U(0, 1)``, which is uniform in the ball's volume.
    """
    if threat.norm == "linf":
        delta = torch.empty_like(x).uniform_(-threat.eps, threat.eps)
    else:
        direction = torch.randn_like(x)
        direction = direction / (_per_example_l2(direction) + _TINY)
        dims = x[0].numel()
        radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / dims)
        delta = direction * (threat.eps * radius).view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


def ascent_step(grad: Tensor, step_size: float, norm: str) -> Tensor:
    """The steepest-ascent step of length ``step_size`` for ``norm``.

    L-inf: ``step_size * sign(grad)``. L2: ``step_size * grad / ||grad||_2`` per example.
    """
    if norm == "linf":
        return step_size * grad.sign()
    return step_size * grad / (_per_example_l2(grad) + _TINY)


# The marks below live on the model or parameter itself (plain attributes, not buffers), so they
# follow it through wrapping and ``.to(device)`` and add nothing to the state dict. Their names
# are private: plugins set and read them only through the functions of this module.
_LOGIT_SCALE = "artplug_logit_scale"
_ATTACK_LOGIT_SCALE = "artplug_attack_logit_scale"
_NO_WEIGHT_DECAY = "artplug_no_weight_decay"


def set_logit_scale(model: nn.Module, scale: float, attack_scale: float | None = None) -> None:
    """Declare that ``model``'s outputs times ``scale`` are its softmax logits.

    For a model transform whose head outputs bounded scores (hypersphere embedding: cosines
    in [-1, 1]). Softmax-based losses read it back with :func:`logit_scale`, training attacks
    with :func:`attack_logit_scale` (``attack_scale``, default ``scale``).
    """
    # object.__setattr__: nn.Module's __setattr__ is typed for tensors and modules only.
    object.__setattr__(model, _LOGIT_SCALE, float(scale))
    attack = scale if attack_scale is None else attack_scale
    object.__setattr__(model, _ATTACK_LOGIT_SCALE, float(attack))


def logit_scale(model: nn.Module) -> float:
    """The factor that turns ``model``'s outputs into softmax logits (1.0 for ordinary models).

    Set by :func:`set_logit_scale` (the hypersphere transform's cosine head); softmax-based
    losses multiply the outputs by this factor (``F.cross_entropy(logit_scale(m) * out, y)``),
    while terms defined on the raw outputs (logit pairing) do not.
    """
    return float(getattr(model, _LOGIT_SCALE, 1.0))


def attack_logit_scale(model: nn.Module) -> float:
    """The factor applied to ``model``'s outputs inside training attacks (default: logit_scale)."""
    return float(getattr(model, _ATTACK_LOGIT_SCALE, logit_scale(model)))


def no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Mark ``param`` so that ``[optim] weight_decay`` skips it; returns ``param``.

    For a parameter a model transform adds that is a shape parameter rather than a weight
    (SmoothReLU's ``b``): decay would pull it towards a different function, not towards small
    weights. Call it in ``apply``, before the engine builds the optimizer.
    """
    object.__setattr__(param, _NO_WEIGHT_DECAY, True)
    return param


def is_no_weight_decay(param: Tensor) -> bool:
    """Whether ``param`` was marked by :func:`no_weight_decay`."""
    return bool(getattr(param, _NO_WEIGHT_DECAY, False))


def projected_ascent(
    model: nn.Module,
    x: Tensor,
    start: Tensor,
    threat: Threat,
    objective: Callable[[Tensor], Tensor],
    *,
    steps: int,
    step_size: float,
) -> Tensor:
    """Maximise ``objective(model(x_adv))`` over the threat ball around ``x``, from ``start``.

    Each of the ``steps`` iterations takes :func:`ascent_step` along the gradient with respect
    to the input only (``torch.autograd.grad``: no ``.grad`` lands on parameters), then
    :func:`project`\\ s back. ``objective`` maps the model's outputs to a scalar; make it a sum
    over examples so each example's step does not depend on the batch size. Works under
    ``torch.no_grad()`` callers too. Returns a detached tensor.
    """
    x_adv = start.detach()
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(model(x_adv)), x_adv)
            x_adv = project(x_adv.detach() + ascent_step(grad, step_size, threat.norm), x, threat)
    return x_adv.detach()


# TRADES' CIFAR-10 attack: step 0.007 at eps 0.031 (train_trades_cifar10.py); the KL attacks'
# default step is this ratio times the training eps.
TRADES_STEP_RATIO = 0.007 / 0.031


def kl_terms(log_p: Tensor, logits_q: Tensor) -> Tensor:
    """The elementwise terms ``p (log p − log q)`` of ``KL(p ‖ softmax(logits_q))``, ``(N, K)``.

    TRADES' divergence, shared by its loss and by attacks that maximise it (``trades-kl``,
    ``spat`` with ``loss = "kl"``). Summed over the classes (``dim=1``) they are each example's
    KL, summed over everything the batch's total. ``log_p = log p``; both logarithms come from
    ``log_softmax``: finite, and with finite gradients, even where a probability underflows to
    zero (``p · log p`` there is ``0 · finite``, unlike ``xlogy(p, p)`` whose gradient with
    respect to ``p`` is 0/0 at 0).
    """
    return log_p.exp() * (log_p - F.log_softmax(logits_q, dim=1))


def kl_attack_start(
    model: nn.Module, x: Tensor, threat: Threat, scale: float, init_std: float
) -> tuple[Tensor, Tensor]:
    """TRADES' attack setup: the fixed target ``log softmax(s · f(x))`` and the start.

    The target is computed once, without a graph, in the caller's model mode; the start is
    ``x + init_std · N(0, I)`` projected onto the ball and [0, 1] (the KL gradient vanishes at
    ``x' = x``). Returns ``(log_p, start)``.
    """
    with torch.no_grad():
        log_p = F.log_softmax(scale * full_precision(model(x)), dim=1)
    start = project(x + init_std * torch.randn_like(x), x, threat)
    return log_p, start
