"""PGD adversarial training (Madry et al., 2018), plus the plain-training baselines.

Reference: A. Madry, A. Makelov, L. Schmidt, D. Tsipras, A. Vladu, "Towards Deep Learning Models
Resistant to Adversarial Attacks", ICLR 2018 (arXiv:1706.06083).

PGD-AT solves ``min_θ E max_{x' ∈ B(x, ε)} CE(f_θ(x'), y)``: the inner maximisation is
approximated by projected gradient ascent from a uniform random start, and the model is trained
with cross-entropy on the result. This module registers:

- perturbation ``none``: the clean batch (standard training);
- perturbation ``pgd``: the multi-step attack, L-inf or L2 following the recipe's ``[threat]``;
  untargeted by default, or targeted towards the least-likely class (``target =
  "least-likely"``, the ``pgdll`` attack that the official adversarial-logit-pairing code trains
  with; see ``artplug_plugins.alp``);
- loss term ``cross-entropy``: mean cross-entropy on the adversarial (or clean) logits.

Defaults follow the Bag-of-Tricks CIFAR-10 baseline (PGD-10, step 2/255 at ε = 8/255, one
random start). Madry's released CIFAR-10 model used 7 steps of 2/255; to reproduce it set
``steps = 7`` and ``step_size = 0.00784313725490196`` explicitly, since the default rule gives a
larger step for fewer steps.
"""

from __future__ import annotations

from typing import Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

import artplug


class NoPerturbation:
    """Standard training: the model is trained on the clean batch."""

    name = "none"

    class Params(artplug.Params):
        """No parameters."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return ``x`` itself, detached (no forward or backward pass)."""
        return x.detach()


class PGD:
    """Projected gradient descent on cross-entropy (Madry et al. 2018), with random restarts.

    Each step is the steepest-ascent step of the threat's norm (``sign`` of the gradient for
    L-inf, the L2-normalised gradient for L2) followed by projection onto the ball and [0, 1].
    With ``restarts > 1`` the attack runs from independent random starts and keeps, per example,
    the result whose final cross-entropy is highest (one extra forward pass per restart).

    ``step_size = None`` uses ``2.5 * eps / steps``, the usual rule that lets the walk cover 2.5
    times the radius so it can reach the boundary from any start: 2/255 at ε = 8/255 and 10
    steps. ``eps`` is the training threat of the step (``state.threat``), so under an eps
    warm-up the default step shrinks with it; an explicit ``step_size`` does not.

    ``target = "least-likely"`` makes the attack targeted, as ALP's ``pgdll`` (Kannan et al.
    2018; Kurakin et al. 2017's "iterative least-likely class" method): the target ``t`` is the
    class with the lowest attack-scaled output on the clean input (one extra forward, no graph,
    in the attack's model mode, shared by all restarts), and every step descends
    ``CE(s · f(x'), t)``, i.e. ascends ``−CE``; restarts keep the result with the lowest
    cross-entropy to ``t``. The labels ``y`` are then not used.
    """

    name = "pgd"
    paper = (
        'A. Madry, A. Makelov, L. Schmidt, D. Tsipras, A. Vladu, "Towards Deep Learning '
        'Models Resistant to Adversarial Attacks", ICLR 2018 (arXiv:1706.06083)'
    )

    class Params(artplug.Params):
        """Parameters of the ``pgd`` perturbation."""

        steps: int = Field(10, ge=1, description="gradient steps per restart")
        step_size: float | None = Field(
            None, gt=0, description="step length in pixel units; None means 2.5 * eps / steps"
        )
        random_start: bool = Field(
            True, description="start uniformly in the ball (True) or at the clean input (False)"
        )
        restarts: int = Field(
            1, ge=1, description="independent runs; keep the highest-loss result per example"
        )
        target: Literal["none", "least-likely"] = Field(
            "none",
            description='"none": untargeted, ascend CE(f(x\'), y); "least-likely": descend CE '
            "towards the class with the lowest clean output (ALP's pgdll)",
        )

        @model_validator(mode="after")
        def _restarts_need_random_start(self) -> Self:
            # Without a random start every restart is the same deterministic walk from x: the
            # extra runs would cost compute and change nothing, which is surely not intended.
            if self.restarts > 1 and not self.random_start:
                raise ValueError(
                    "restarts > 1 needs random_start = true (restarts from the clean input "
                    "are all identical)"
                )
            return self

    def __init__(self, params: Params) -> None:
        self.params = params

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """Return the PGD adversarial batch (detached, in [0, 1], inside ``state.threat``)."""
        # Read params at call time: schedules replace self.params between steps (with a copy
        # the engine has validated, so every field has its declared type).
        params = self.params
        threat = state.threat
        x = x.detach()
        if threat.eps == 0:
            # Plain float comparison, no host sync. The ball is the single point x; skipping
            # the walk also returns x bit-exactly instead of relying on clamp arithmetic.
            return x
        steps = params.steps
        restarts = params.restarts
        step_size = 2.5 * threat.eps / steps if params.step_size is None else params.step_size
        targeted = params.target == "least-likely"
        if targeted:
            # The least-likely class of the clean input, once per call (s > 0, so the argmin of
            # the scaled outputs is that of the raw ones; scaled to state the rule exactly).
            with torch.no_grad():
                labels = (artplug.attack_logit_scale(model) * model(x)).argmin(dim=1)
        else:
            labels = y
        # The engine enables grad, but calling generate under no_grad (tests, a user's own
        # evaluation loop) must not silently produce a zero-gradient attack.
        with torch.enable_grad():
            best = self._walk(
                model, x, labels, threat, steps, step_size, bool(params.random_start), targeted
            )
            if restarts == 1:
                return best
            best_loss = _per_example_loss(model, best, labels, targeted)
            for _ in range(restarts - 1):
                # Further restarts always start randomly: from x they would repeat the first.
                candidate = self._walk(model, x, labels, threat, steps, step_size, True, targeted)
                loss = _per_example_loss(model, candidate, labels, targeted)
                # torch.where keeps the choice on the device (no .item(), no Python branch);
                # strict '>' keeps the earlier restart on ties.
                better = loss > best_loss
                best_loss = torch.where(better, loss, best_loss)
                best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), candidate, best)
        return best

    @staticmethod
    def _walk(
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: artplug.Threat,
        steps: int,
        step_size: float,
        random_start: bool,
        targeted: bool,
    ) -> Tensor:
        """One PGD run of ``steps`` projected ascent steps; returns a detached tensor.

        Untargeted: ascend ``CE(s · f(x'), y)``. Targeted (``y`` holds the targets): ascend
        ``−CE(s · f(x'), y)``, i.e. step towards the target class.
        """
        start = artplug.random_start(x, threat) if random_start else x
        scale = artplug.attack_logit_scale(model)

        def objective(outputs: Tensor) -> Tensor:
            # reduction="sum": each example's input gradient is its own loss's gradient,
            # independent of the batch size (and not shrunk by 1/N, which could underflow
            # under fp16 autocast).
            loss = F.cross_entropy(scale * outputs, y, reduction="sum")
            return -loss if targeted else loss

        return artplug.projected_ascent(
            model, x, start, threat, objective, steps=steps, step_size=step_size
        )


def _per_example_loss(model: nn.Module, x_adv: Tensor, y: Tensor, targeted: bool) -> Tensor:
    """The attack objective of each example at ``x_adv`` (no graph kept), to rank restarts.

    Cross-entropy to ``y``; its negation when the attack is targeted (``y`` = the targets), so
    that higher is better in both cases.
    """
    with torch.no_grad():
        logits = artplug.attack_logit_scale(model) * model(x_adv)
        loss = F.cross_entropy(logits, y, reduction="none").float()
        return -loss if targeted else loss


class CrossEntropy:
    """Cross-entropy on the adversarial (default) or clean logits, averaged over the batch."""

    name = "cross-entropy"
    paper = (
        'A. Madry, A. Makelov, L. Schmidt, D. Tsipras, A. Vladu, "Towards Deep Learning '
        'Models Resistant to Adversarial Attacks", ICLR 2018 (arXiv:1706.06083); the '
        "training loss of PGD-AT"
    )
    needs: frozenset[str]

    class Params(artplug.Params):
        """Parameters of the ``cross-entropy`` loss term."""

        on: Literal["adv", "clean"] = Field(
            "adv", description="which forward pass the loss is computed on"
        )
        label_smoothing: float = Field(
            0.0, ge=0.0, lt=1.0, description="mass spread uniformly over all classes"
        )

    def __init__(self, params: Params) -> None:
        self.params = params
        # Fixed at construction: 'on' is a string, so no (float-valued) knob can change it.
        self.needs = frozenset({params.on})

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> Tensor:
        """Mean cross-entropy of the chosen logits against ``out.y`` (0-dim tensor)."""
        params = self.params
        logits = out.logits_adv if params.on == "adv" else out.logits_clean
        if logits is None:
            raise RuntimeError(
                f"cross-entropy (on={params.on!r}) was called without logits_{params.on}; "
                f"the engine must run the forward passes listed in needs={sorted(self.needs)}"
            )
        # logit_scale is 1 for ordinary models; a hypersphere head outputs cosines and sets s.
        logits = artplug.logit_scale(state.model) * logits
        return F.cross_entropy(logits, out.y, label_smoothing=params.label_smoothing)


@artplug.hookimpl
def register_perturbations(register: artplug.Register) -> None:
    """Register the ``none`` and ``pgd`` perturbations."""
    register(NoPerturbation)
    register(PGD)


@artplug.hookimpl
def register_loss_terms(register: artplug.Register) -> None:
    """Register the ``cross-entropy`` loss term."""
    register(CrossEntropy)
