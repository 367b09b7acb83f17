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
from collections.abc import Iterable
from typing import ClassVar

from pydantic import Field, field_validator
from torch import Tensor, nn

import artplug

# The site machinery lives in artplug (artplug/latent.py) so that moat can run SLAT without
# importing this plugin; these names stay importable from here for existing code.
LatentSite = artplug.LatentSite
latent_sites = artplug.latent_sites
capture = artplug.capture_latents

DEFAULT_SITES: dict[str, tuple[str, ...]] = {
    # SLAT preresnet.py: after the stem conv and after the first stage.
    "PreActResNet18": ("conv1", "layer1"),
    # SLAT wide_resnet.py: after the stem conv and after the first group of blocks.
    "WideResNet": ("conv1", "block1"),
    # No SLAT reference: the outputs of the first two conv units, by analogy (a reading).
    "SmallCNN": ("layer1", "layer2"),
}
"""Default sites per artplug architecture (class name), used when ``sites`` is not given."""


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

    name = artplug.LATENT_SITES_TRANSFORM
    paper = (
        'G. Park, S. Lee, "Reliably fast adversarial training via latent adversarial '
        'perturbation", ICCV 2021 (arXiv:2104.01575)'
    )
    # After smooth activations, before guided dropout and the hypersphere head: later
    # transforms must see, and keep, the hooked modules (docs/techniques/README.md, rule 3).
    stage: ClassVar[artplug.TransformStage] = "sites"

    class Params(artplug.Params):
        """Parameters of the ``latent-sites`` model transform."""

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
            artplug.add_latent_site(
                modules[name], name, domain_constraint=self.params.domain_constraint
            )
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
        """Require ``slat`` (or ``moat``) and one listing (the order follows from ``stage``).

        ``moat`` is accepted because it can run SLAT as its single-step stage; whether it
        does (``single_attack = "slat"``) is a parameter of ``moat``, which a transform cannot
        see, so ``moat``'s own check rejects ``latent-sites`` with any other single attack.
        """
        transforms = list(recipe.transforms)
        count = transforms.count(cls.name)
        if count > 1:
            yield f"latent-sites is listed {count} times; list it once with all its sites"
        # The perturbations that fill the sites: slat, and moat, which delegates its
        # single-step stage to slat (moat is a separate plugin, so it is named by its string).
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
    paper = (
        'G. Park, S. Lee, "Reliably fast adversarial training via latent adversarial '
        'perturbation", ICCV 2021 (arXiv:2104.01575)'
    )

    # SLAT's step lives in artplug (so moat can run it without this plugin); its parameters
    # are this perturbation's table, and moat's slat sub-table, unchanged.
    class Params(artplug.LatentStepParams):
        """The parameters of :func:`artplug.latent_sign_step` (see there)."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return ``x_adv`` and store the latent steps into the model's sites (see the class)."""
        # Read params at call time: schedules replace self.params between steps.
        return artplug.latent_sign_step(model, x, y, state, self.params)

    @classmethod
    def check_recipe(cls, params: Params, recipe: artplug.RecipeView) -> Iterable[str]:
        """Require ``latent-sites``; reject the ``trades`` loss."""
        if artplug.LATENT_SITES_TRANSFORM not in recipe.transforms:
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
