"""SLAT: single-step adversarial training with latent adversarial perturbations.

Reference: G. Park, S. Lee, "Reliably fast adversarial training via latent adversarial
perturbation", ICCV 2021 (arXiv:2104.01575); official code ``geonyeong-park/SLAT`` (method name
``advGNI`` there). The mechanics below follow the released code (docs/techniques/slat.md); the
paper's
tables could not be read, so no number of it is claimed here.

One forward and ONE backward on the clean batch give, at the same time, the gradient of the
cross-entropy with respect to the input and with respect to the outputs of a few early layers
("sites"). The training forward then adds a signed step to the input (as FGSM, without a random
start) and a signed step of fixed size to every site's output. Adding ``η·sign(∇_h L)`` to a
feature map ``h`` raises the loss by about ``η‖∇_h L‖₁``, so training against it penalises the
L1 norm of the feature gradients; the authors report that this keeps single-step training
locally linear (no catastrophic overfitting) at the cost of FGSM.

This module registers two techniques that work together:

- model transform ``latent-sites``: installs a :class:`LatentSite` as a forward hook on each
  named module (``model.named_modules()`` names). A site keeps its module's output while the
  ``slat`` perturbation runs its clean forward, adds the stored latent step in the engine's
  ``"update-adv"`` forward (then applies the code's domain constraint), and is the identity in
  every other forward, so validation, ART evaluation and the sanity gate never see it;
- perturbation ``slat``: the clean forward/backward, the input step, and the latent steps it
  stores into the sites.

Differences from the released code, all deliberate:

- artplug's models take pixels in [0, 1] and normalise inside; the code feeds normalised inputs
  and writes the input radius as ``ε / σ`` per channel. A step of ``ε/σ_c`` in normalised units
  is a step of ``ε`` in pixels, and ``∂L/∂pixel = (∂L/∂normalised) / σ_c`` has the same sign, so
  the input step and its clipping to the valid image range are the same; only the units in
  which they are written differ.
- The code's cross-entropy is a batch mean, here it is a sum (as every artplug attack): the
  signs, and therefore every step, are identical; a sum only avoids underflow of per-example
  gradients in large batches.
- Under an L2 threat (the paper is L∞ only) the input step is the L2-normalised gradient of
  length ``alpha·ε``, projected onto the ball; latent steps stay signed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

import artplug

SITE_ATTRIBUTE = "artplug_latent_site"
"""Name of the attribute through which a hooked module points at its :class:`LatentSite`."""

DEFAULT_SITES: dict[str, tuple[str, ...]] = {
    # SLAT preresnet.py: after the stem conv and after the first stage.
    "PreActResNet18": ("conv1", "layer1"),
    # SLAT wide_resnet.py: after the stem conv and after the first group of blocks.
    "WideResNet": ("conv1", "block1"),
    # No SLAT reference: the outputs of the first two conv units, by analogy (a reading).
    "SmallCNN": ("layer1", "layer2"),
}
"""Default sites per artplug architecture (class name), used when ``sites`` is not given."""

# Transforms that latent-sites must precede (docs/techniques/README.md, rule 3: SAT -> SLAT sites ->
# AALP dropout -> HE head), so that later transforms see, and keep, the hooked modules.
_MUST_FOLLOW_SITES = ("guided-dropout", "hypersphere")


class LatentSite:
    """A latent perturbation point on the output of one module, installed as its forward hook.

    Behaviour per forward pass of the hooked module:

    - while :func:`capture` arms it (the ``slat`` perturbation's clean forward, which the engine
      runs in the ``"attack"`` phase): keep a reference to the output, unchanged, so that the
      perturbation can differentiate the loss with respect to it in the same backward as the
      input gradient; a second call in the same armed forward is an error (a module used twice
      has no single output to perturb);
    - in the ``"update-adv"`` phase, when a ``delta`` is stored: return
      ``clamp(h + delta, lo, hi)`` where ``lo``/``hi`` are the minimum/maximum of ``h`` over its
      spatial positions, per example and channel, on THIS forward's unperturbed ``h`` (the
      code's "domain constraint": the perturbed map stays inside the range the clean map spans;
      the code writes it ``h + clamp(delta, lo − h, hi − h)``). The perturbation is a constant
      for autograd, as in the code: the gradient reaching ``h`` is the output's gradient,
      also where the clamp acted;
    - otherwise (``"update-clean"``, ``"update"``, ``"eval"``, or no ``delta``): the identity.

    ``delta`` is set by the ``slat`` perturbation and kept until its next ``generate`` (which
    clears it first), so every ``"update-adv"`` forward of one optimizer step sees the same
    step; a forward whose output shape differs from ``delta``'s raises ``RuntimeError``.
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
        if self.delta is not None and artplug.current_phase() == "update-adv":
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


def latent_sites(model: nn.Module) -> list[LatentSite]:
    """The sites installed on ``model`` (also when it was wrapped after the transform)."""
    found = (getattr(module, SITE_ATTRIBUTE, None) for module in model.modules())
    return [site for site in found if isinstance(site, LatentSite)]


@contextmanager
def capture(sites: Iterable[LatentSite]) -> Iterator[None]:
    """Arm ``sites`` to retain their outputs during the forward inside the ``with`` block."""
    armed = list(sites)
    for site in armed:
        site._armed = True
    try:
        yield
    finally:
        for site in armed:
            site._armed = False


def _valid_site_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


class LatentSites:
    """Install SLAT's latent perturbation sites (Park & Lee 2021) on named modules.

    ``sites`` are names from ``model.named_modules()``; the default (``None``) is the table
    :data:`DEFAULT_SITES` for artplug's architectures: ``conv1`` and ``layer1`` for
    preact-resnet18 and ``conv1`` and ``block1`` for wide-resnet (the SLAT code's sites), and
    ``layer1`` and ``layer2`` for small-cnn (a reading: the code has no such model). Each site is
    a forward hook plus an attribute on its module (no parameters, no buffers: the state dict
    and checkpoints are unchanged), see :class:`LatentSite`. The transform changes nothing by
    itself; the ``slat`` perturbation fills the sites every step.

    Order: list it before ``guided-dropout`` (AALP) and ``hypersphere`` (HE), after smooth
    activations (SAT), as docs/techniques/README.md, rule 3 fixes. The hooked modules must not be
    replaced by a later transform, and the model must not modify a site's output in place.
    """

    name = "latent-sites"

    class Params(BaseModel):
        """Parameters of the ``latent-sites`` model transform."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        sites: list[str] | None = Field(
            None,
            description="module names (as in model.named_modules()) whose outputs get latent "
            "perturbations; None = the architecture's default (preact-resnet18: conv1, "
            "layer1; wide-resnet: conv1, block1; small-cnn: layer1, layer2)",
        )
        domain_constraint: bool = Field(
            True,
            description="clip each perturbed feature map into the per-(example, channel) "
            "min/max over positions of the unperturbed map (the SLAT code)",
        )

        @field_validator("sites")
        @classmethod
        def _distinct_names(cls, sites: list[str] | None) -> list[str] | None:
            if sites is None:
                return None
            if not sites:
                raise ValueError("give at least one site, or leave sites out for the default")
            if "" in sites:
                raise ValueError("'' is the whole model; name a submodule")
            repeated = sorted({s for s in sites if sites.count(s) > 1})
            if repeated:
                raise ValueError(f"site names must be distinct; repeated: {repeated}")
            return sites

    def __init__(self, params: Params) -> None:
        self.params = params

    def site_names(self, model: nn.Module) -> tuple[str, ...]:
        """The names to hook on ``model``: the ``sites`` parameter or the default table."""
        if self.params.sites is not None:
            return tuple(self.params.sites)
        arch = type(model).__name__
        if arch not in DEFAULT_SITES:
            known = ", ".join(f"{k} ({', '.join(v)})" for k, v in DEFAULT_SITES.items())
            raise ValueError(
                f"latent-sites has no default sites for a {arch}; set sites = [...] to module "
                f"names of model.named_modules() (defaults exist for {known})"
            )
        return DEFAULT_SITES[arch]

    def apply(self, model: nn.Module) -> nn.Module:
        """Hook a :class:`LatentSite` onto every site module of ``model``; in place."""
        if latent_sites(model):
            raise ValueError(
                "latent-sites: the model already has latent sites; list the transform only once"
            )
        names = self.site_names(model)
        modules = dict(model.named_modules())
        missing = [name for name in names if not name or name not in modules]
        if missing:
            raise ValueError(self._missing_message(model, missing))
        for name in names:
            module = modules[name]
            site = LatentSite(name, domain_constraint=self.params.domain_constraint)
            module.register_forward_hook(site)
            # A plain attribute, not a submodule: the site adds nothing to the state dict.
            setattr(module, SITE_ATTRIBUTE, site)
        return model

    @staticmethod
    def _missing_message(model: nn.Module, missing: list[str]) -> str:
        valid = _valid_site_names(model)
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, valid, n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            hints.append(f"{name!r}{hint}")
        # The two top levels are enough to orient; deeper names are valid too.
        shallow = [name for name in valid if name.count(".") <= 1]
        return (
            f"latent-sites: {type(model).__name__} has no module {', '.join(hints)}; valid "
            f"names include {', '.join(shallow)} (any name of model.named_modules())"
        )

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Require ``slat`` (or ``moat``), one listing, and the transform order of
        docs/techniques/README.md, combinations.

        ``moat`` is accepted because it can run SLAT as its single-step stage; whether it
        does (``single_attack = "slat"``) is a parameter of ``moat``, which a transform cannot
        see, so ``moat``'s own check rejects ``latent-sites`` with any other single attack.
        """
        transforms = list(recipe.transforms)
        count = transforms.count(cls.name)
        if count > 1:
            yield f"latent-sites is listed {count} times; list it once with all its sites"
        first = transforms.index(cls.name) if cls.name in transforms else len(transforms)
        before = [t for t in transforms[:first] if t in _MUST_FOLLOW_SITES]
        if before:
            yield (
                "latent-sites must come before "
                f"{', '.join(repr(t) for t in before)} (transforms apply in the order SAT -> "
                "SLAT sites -> AALP dropout -> HE head, so hooks see the final modules)"
            )
        # The perturbations that fill the sites: slat, and moat, which delegates its
        # single-step stage to slat (moat imports this module, so moat is named by its string).
        if recipe.perturbation not in (Slat.name, "moat"):
            yield (
                "latent-sites only acts through the slat perturbation (it is the identity "
                'otherwise); use [perturbation] use = "slat" (or "moat" with single_attack = '
                '"slat") or drop the transform'
            )


class Slat:
    """SLAT (Park & Lee 2021): input and latent sign steps from one clean forward and backward.

    With the model in the recipe's attack mode (the SLAT code uses train mode: set
    ``[perturbation] model_mode = "train"``), one forward of the clean batch with the
    ``latent-sites`` armed, the summed cross-entropy of ``attack_logit_scale · outputs`` (HE:
    the attack logits without margin), and ONE ``torch.autograd.grad`` call with respect to the
    input and every site's output (no parameter gradients) give ``g_in`` and ``g_l``. Then:

    - input: ``x_adv = project(x + alpha·ε·sign(g_in))`` (clip to ±ε and to [0, 1]); no random
      start, α = 0.9 by default; ε is the step's training threat (scaled by an eps warm-up);
    - latent: ``δ_l = clip_[−η, η](m·η·sign(g_l))`` with ``η = latent_eps`` in raw activation
      units (8/255 by default, not scaled by the eps warm-up) and ``m = latent_multiplier``
      (None = 2·alpha = 1.8, so ``δ_l = η·sign(g_l)``), stored into each site, which adds it in
      the engine's ``"update-adv"`` forward (see :class:`LatentSite`).

    ``δ_l`` comes from the clean latent gradient and is added to the latent map of the
    input-perturbed forward, as in the code. A model without sites gets only the input step
    (``check_recipe`` makes recipes add ``latent-sites``). Cost: one forward and one backward
    more than the update, like FGSM-RS. Not offered with the ``trades`` loss (see
    docs/techniques/slat.md, interactions); losses on the clean forward are fine, since the sites
    leave it unperturbed.
    """

    name = "slat"

    class Params(BaseModel):
        """Parameters of the ``slat`` perturbation."""

        model_config = ConfigDict(extra="forbid", frozen=True)

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

    def __init__(self, params: Params) -> None:
        self.params = params

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return ``x_adv`` and store the latent steps into the model's sites (see the class)."""
        # Read params at call time: schedules replace self.params between steps.
        params = self.params
        threat = state.threat
        x = x.detach()
        sites = latent_sites(model)
        for site in sites:
            site.clear()
        if threat.eps == 0 and not sites:
            return x
        scale = artplug.attack_logit_scale(model)
        with torch.enable_grad():
            x_in = x.clone().requires_grad_(True)
            with capture(sites):
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
        step = float(params.alpha) * threat.eps
        x_adv = artplug.project(x + artplug.ascent_step(grad_in, step, threat.norm), x, threat)
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

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Require ``latent-sites``; reject the ``trades`` loss."""
        if LatentSites.name not in recipe.transforms:
            yield (
                'slat perturbs latent feature maps; add [[transform]] use = "latent-sites" '
                "(before any guided-dropout or hypersphere transform)"
            )
        if "trades" in recipe.losses:
            yield (
                "cannot be combined with the trades loss: TRADES-SLAT is not defined (the KL "
                "gradient at the clean point is zero, and SLAT has no random start); use "
                'cross-entropy or he-margin, or [perturbation] use = "trades-kl" for TRADES'
            )


@artplug.hookimpl
def register_model_transforms(register: artplug.Register) -> None:
    """Register the ``latent-sites`` model transform."""
    register(LatentSites)


@artplug.hookimpl
def register_perturbations(register: artplug.Register) -> None:
    """Register the ``slat`` perturbation."""
    register(Slat)
