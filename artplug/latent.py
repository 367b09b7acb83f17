"""Latent perturbation sites (SLAT, Park & Lee 2021) and the SLAT step, for any plugin.

A latent site is a forward hook on one module of the model that can retain the module's output
(to differentiate a loss with respect to it) and add a stored perturbation to it in the
engine's ``"update-adv"`` forward. The ``latent-sites`` transform installs them
(:func:`add_latent_site`); perturbations find them with :func:`latent_sites` and fill them,
e.g. with :func:`latent_sign_step`, SLAT's one-backward input and latent sign step. They live
in artplug, not in the ``slat`` plugin, so that other perturbations (``moat`` runs SLAT as its
single-step stage) use them without importing, or depending on the loading of, another plugin.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from artplug.kinds import Params, StepState
from artplug.ops import ascent_step, attack_logit_scale, project
from artplug.phase import current_phase

LATENT_SITES_TRANSFORM = "latent-sites"
"""Name of the built-in model transform that installs latent sites (for ``check_recipe``)."""

_SITE_ATTRIBUTE = "artplug_latent_site"
# Name of the attribute through which a hooked module points at its LatentSite.


class LatentSite:
    """A latent perturbation point on the output of one module, installed as its forward hook.

    Behaviour per forward pass of the hooked module:

    - while :func:`capture_latents` arms it (the ``slat`` perturbation's clean forward, which
      the engine runs in the ``"attack"`` phase): keep a reference to the output, unchanged, so
      that the perturbation can differentiate the loss with respect to it in the same backward
      as the input gradient; a second call in the same armed forward is an error (a module
      used twice has no single output to perturb);
    - in the ``"update-adv"`` phase, when a ``delta`` is stored: return
      ``clamp(h + delta, lo, hi)`` where ``lo``/``hi`` are the minimum/maximum of ``h`` over its
      spatial positions, per example and channel, on THIS forward's unperturbed ``h`` (the
      code's "domain constraint": the perturbed map stays inside the range the clean map spans;
      the code writes it ``h + clamp(delta, lo − h, hi − h)``). The perturbation is a constant
      for autograd, as in the code: the gradient reaching ``h`` is the output's gradient,
      also where the clamp acted;
    - otherwise (``"update-clean"``, ``"update"``, ``"eval"``, or no ``delta``): the identity.

    ``delta`` is set by :func:`latent_sign_step` (the ``slat`` perturbation) and kept until its
    next call (which clears it first), so every ``"update-adv"`` forward of one optimizer step
    sees the same step; a forward whose output shape differs from ``delta``'s raises
    ``RuntimeError``.
    """

    def __init__(self, name: str, *, domain_constraint: bool = True) -> None:
        self.name = name
        self.domain_constraint = domain_constraint
        self.delta: Tensor | None = None
        self._armed = False
        self._retained: Tensor | None = None

    def __repr__(self) -> str:
        """Name and state, for error messages and debugging."""
        stored = "none" if self.delta is None else tuple(self.delta.shape)
        return f"LatentSite({self.name!r}, delta={stored})"

    def clear(self) -> None:
        """Forget the stored step and any retained output."""
        self.delta = None
        self._retained = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        """The forward hook: retain, perturb or pass through (``None`` keeps the output)."""
        if self._armed:
            self._retain(output)
            return None
        if self.delta is not None and current_phase() == "update-adv":
            return self.perturb(output)
        return None

    def _retain(self, output: Any) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"latent site {self.name!r}: the module returns {type(output).__name__}, "
                "not a tensor; choose a module whose output is one feature map"
            )
        if self.domain_constraint and output.dim() < 3:
            raise ValueError(
                f"latent site {self.name!r}: output of shape {tuple(output.shape)} has no "
                "spatial dimensions for the domain constraint (per-channel min/max over "
                "positions); choose a convolutional stage or set domain_constraint = false"
            )
        if self._retained is not None:
            raise RuntimeError(
                f"latent site {self.name!r}: the module ran twice in one forward; a module "
                "called more than once has no single output to perturb, choose another site"
            )
        self._retained = output

    def take_retained(self) -> Tensor:
        """The output retained by the armed forward (and forget it); error if it did not run."""
        retained, self._retained = self._retained, None
        if retained is None:
            raise RuntimeError(
                f"latent site {self.name!r}: the module did not run in the model's forward, "
                "so it has no output to perturb; choose a module the forward uses"
            )
        return retained

    def perturb(self, output: Tensor) -> Tensor:
        """``output`` plus the stored step, clipped by the domain constraint (see the class)."""
        delta = self.delta
        assert delta is not None
        if delta.shape != output.shape:
            raise RuntimeError(
                f"latent site {self.name!r}: the stored perturbation has shape "
                f"{tuple(delta.shape)} but this update-adv forward gives {tuple(output.shape)}; "
                "the update forward must use the batch that slat.generate perturbed"
            )
        delta = delta.to(output.dtype)
        if not self.domain_constraint:
            return output + delta
        with torch.no_grad():
            spatial = tuple(range(2, output.dim()))
            low = output.amin(dim=spatial, keepdim=True)
            high = output.amax(dim=spatial, keepdim=True)
        return _ClampedShift.apply(output, delta, low, high)


class _ClampedShift(torch.autograd.Function):
    """``clamp(h + delta, low, high)`` whose gradient reaches ``h`` unchanged.

    The SLAT code adds a perturbation that was clipped to ``[low − h, high − h]`` outside
    autograd, so the perturbed map has the clipped values while ``∂out/∂h`` is the identity.
    A custom function gives the same in two elementwise passes (add, clamp) and no backward
    work, instead of the five passes of ``h + (clamp(h + delta) − h).detach()``.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, delta: Tensor, low: Tensor, high: Tensor) -> Tensor:
        """The clipped sum (autograd is off inside ``forward``)."""
        return (h + delta).clamp_(low, high)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        """Identity for ``h``; ``delta`` and the bounds are constants."""
        return grad, None, None, None


def add_latent_site(module: nn.Module, name: str, *, domain_constraint: bool = True) -> LatentSite:
    """Install a :class:`LatentSite` on the output of ``module`` and return it.

    ``name`` is the module's name in ``model.named_modules()``, used in error messages. The
    site is a forward hook plus a plain attribute on the module (no parameters, no buffers:
    the state dict and checkpoints are unchanged), so :func:`latent_sites` finds it also after
    the model has been wrapped.
    """
    site = LatentSite(name, domain_constraint=domain_constraint)
    module.register_forward_hook(site)
    # A plain attribute, not a submodule: the site adds nothing to the state dict.
    object.__setattr__(module, _SITE_ATTRIBUTE, site)
    return site


def latent_sites(model: nn.Module) -> list[LatentSite]:
    """The latent sites installed on ``model`` (also when it was wrapped after the transform)."""
    found = (getattr(module, _SITE_ATTRIBUTE, None) for module in model.modules())
    return [site for site in found if isinstance(site, LatentSite)]


@contextmanager
def capture_latents(sites: Iterable[LatentSite]) -> Iterator[None]:
    """Arm ``sites`` to retain their outputs during the forward inside the ``with`` block.

    After the forward, :meth:`LatentSite.take_retained` hands each output over, to
    differentiate a loss with respect to it.
    """
    armed = list(sites)
    for site in armed:
        site._armed = True
    try:
        yield
    finally:
        for site in armed:
            site._armed = False


class LatentStepParams(Params):
    """Parameters of SLAT's step (:func:`latent_sign_step`), the ``slat`` perturbation's table."""

    alpha: float = Field(
        0.9,
        gt=0.0,
        allow_inf_nan=False,
        description="input step = alpha * eps (the code's alpha, 0.9)",
    )
    latent_eps: float = Field(
        8 / 255,
        ge=0.0,
        allow_inf_nan=False,
        description="eta: bound of every latent step, in raw activation units (8/255)",
    )
    latent_multiplier: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="latent step = multiplier * latent_eps * sign(grad) before the clip "
        "to ±latent_eps; None = 2 * alpha (the code)",
    )


def latent_sign_step(
    model: nn.Module, x: Tensor, y: Tensor, state: StepState, params: LatentStepParams
) -> Tensor:
    """SLAT's step: return ``x_adv`` and store the latent steps into the model's sites.

    See the ``slat`` perturbation (plugins/slat.py) for the formulas. Every site of ``model`` is
    cleared first; a model without sites gets only the input step.
    """
    threat = state.threat
    x = x.detach()
    sites = latent_sites(model)
    for site in sites:
        site.clear()
    if threat.eps == 0 and not sites:
        return x
    scale = attack_logit_scale(model)
    with torch.enable_grad():
        x_in = x.clone().requires_grad_(True)
        with capture_latents(sites):
            outputs = model(x_in)
        retained = [site.take_retained() for site in sites]
        # Sum, not mean: the per-example gradient does not depend on the batch size.
        loss = F.cross_entropy(scale * outputs, y, reduction="sum")
        # ONE backward for the input and every site: SLAT's cost is FGSM's. autograd.grad
        # (not backward) leaves no .grad on the parameters.
        grads = torch.autograd.grad(loss, [x_in, *retained], allow_unused=True)
    grad_in, *grad_sites = grads
    if grad_in is None:
        raise RuntimeError("slat: the model's output does not depend on its input")
    step = params.alpha * threat.eps
    x_adv = project(x + ascent_step(grad_in, step, threat.norm), x, threat)
    eta = float(params.latent_eps)
    multiplier = (
        2.0 * float(params.alpha)
        if params.latent_multiplier is None
        else float(params.latent_multiplier)
    )
    # clip_[-eta, eta](m * eta * s) = min(m, 1) * eta * s for signs s in {-1, 0, 1}: one
    # elementwise pass fewer on every site.
    latent_step = min(multiplier, 1.0) * eta
    for site, grad in zip(sites, grad_sites, strict=True):
        if grad is None:
            raise RuntimeError(f"slat: the loss does not depend on latent site {site.name!r}")
        site.delta = grad.sign().mul_(latent_step)
    return x_adv.detach()
