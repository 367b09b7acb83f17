"""Adversarial logit pairing (Kannan, Kurakin, Goodfellow, 2018).

Reference: H. Kannan, A. Kurakin, I. Goodfellow, "Adversarial Logit Pairing", 2018
(arXiv:1803.06373).

ALP adds to adversarial training a term that pulls the outputs of each clean example and of
its adversarial counterpart together. This module registers one loss term, ``logit-pairing``:
the mean over all ``B × K`` elements of ``(f(x) − f(x'))²`` on the model's raw outputs. That is
``tf.losses.mean_squared_error(clean_logits, adv_logits)`` of the official TensorFlow code
(``tensorflow/models``, ``research/adversarial_logit_pairing``), whose ``weights = λ`` is the
recipe's ``weight`` here, and ``MSE_mean`` of the hypersphere-embedding code (AT_HE,
``losses.py::alp_loss``). The gradient flows through both sides.

The full ALP objective is composed in the recipe, one term per line::

    [[loss]]                       # cross-entropy on the clean half
    use = "cross-entropy"
    id = "ce-clean"
    on = "clean"
    weight = 0.5
    label_smoothing = 0.1          # the official code's label smoothing

    [[loss]]                       # cross-entropy on the adversarial half
    use = "cross-entropy"
    id = "ce-adv"
    weight = 0.5
    label_smoothing = 0.1

    [[loss]]
    use = "logit-pairing"
    weight = 0.5                   # λ (train_lp_weight = 0.5)

The 0.5/0.5 weights reproduce the official mean cross-entropy over the concatenated 2B logits.
Two differences from the official code remain: it runs ``[x; x']`` through the network as one
train-mode batch (batch-norm statistics shared by both halves), while artplug runs two forwards
(as AT_HE's ALP does); and its attack is targeted PGD towards the least-likely class
(``pgdll_16_2_10``: ε = 16/255, step 2/255, 10 steps, uniform random start), which is ``pgd``
with ``target = "least-likely"``, ``steps = 10`` and an explicit ``step_size =
0.00784313725490196`` (``pgd``'s default rule would give 2.5 ε / steps = 4/255). AT_HE's
CIFAR-10 ALP uses untargeted PGD instead.

Hypersphere embedding (ALP+HE): the pairing is on the raw cosines, never multiplied by
``artplug.logit_scale`` (on ``s · cos`` the term would be ``s²`` times larger). Caution: ALP's
ImageNet robustness was later broken; evaluate ALP-family models with AutoAttack.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

import artplug


class LogitPairing:
    """ALP's logit pairing: mean squared difference of clean and adversarial raw outputs.

    Value: ``(1 / (B · K)) Σ_i Σ_k (f(x_i)_k − f(x'_i)_k)²`` on the model's outputs as they are
    (cosines under a hypersphere head; ``logit_scale`` is not applied). The weight λ is the
    recipe's ``weight`` (0.5 in the official code); the cross-entropy terms of ALP are separate
    ``cross-entropy`` terms (see the module docstring).
    """

    name = "logit-pairing"
    paper = (
        'H. Kannan, A. Kurakin, I. Goodfellow, "Adversarial Logit Pairing", 2018 (arXiv:1803.06373)'
    )
    needs = frozenset({"clean", "adv"})

    class Params(artplug.Params):
        """No parameters: λ is the recipe's ``weight``."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> Tensor:
        """Mean over batch and classes of the squared output difference (0-dim tensor)."""
        if out.logits_clean is None or out.logits_adv is None:
            raise RuntimeError(
                "logit-pairing was called without logits_clean and logits_adv; the engine "
                "must run the forward passes listed in needs=['adv', 'clean']"
            )
        # Raw outputs on purpose: no logit_scale (the pairing of AT_HE is on the cosines).
        return F.mse_loss(out.logits_clean, out.logits_adv, reduction="mean")


@artplug.hookimpl
def register_loss_terms(register: artplug.Register) -> None:
    """Register the ``logit-pairing`` loss term."""
    register(LogitPairing)
