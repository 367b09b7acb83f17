"""Robustness evaluation through ART, from a fixed and versioned table of attacks.

Evaluation attacks are deliberately *not* a plugin kind: numbers must stay comparable across
recipes and installs, so the table lives here, in core. Each entry is named for exactly what it
runs (see :data:`ATTACKS`); every entry attacks the recipe's threat (``Threat.norm``, full
``Threat.eps``) in pixel space [0, 1], with the model's own normalization inside the model.

Versioning rule: changing what an existing entry computes (its attack, step size, iterations,
restarts, loss, ...) means bumping :data:`ATTACK_TABLE_VERSION` and adding a CHANGELOG line, so
that runs logged under different table versions are never compared by accident. Adding a new
entry keeps the version (old numbers keep their meaning) but still gets a CHANGELOG line.

Conventions shared by every entry:

- Accuracy is *robust* accuracy: an example counts as correct only if the model classifies both
  the clean input and the adversarial input correctly. An example the model already gets wrong
  is its own adversarial example (it lies inside every ball around itself), so it is not
  attacked at all; this is the AutoAttack/RobustBench convention and it also saves the attack's
  work on those examples.
- ``eps == 0`` needs no attack: every entry then returns the clean inputs.
- numpy, torch and Python's ``random`` are seeded with ``seed`` before each entry, and their
  global states are restored afterwards, so an evaluation in the middle of training neither
  depends on nor changes the training's random stream.
- Every ART attack runs with ``batch_size`` = the evaluation's batch size (ART's defaults are 32
  or 1) and ``verbose=False``; the model runs in eval mode with its parameters frozen, so ART's
  ``loss.backward()`` computes input gradients only.
- The ART classifier remembers the logits of the clean inputs and of the inputs of its last
  three ``predict`` calls, keyed by content (:class:`LogitMemo`), so an input ART predicts
  again costs no forward pass. This assumes a deterministic model in eval mode (artplug's
  models are).

The table (version 2). Cost is per attacked example; ``F`` is one forward + backward pass, ``f``
one forward pass; ``K`` the number of classes.

``clean``
    No attack.
``fgsm``
    ART ``FastGradientMethod(norm, eps, eps_step=eps, num_random_init=0)``: one step of size eps
    (sign for linf, L2-normalised for l2). Cost 1 F + 1 f.
``pgd-20``, ``pgd-50``
    ART ``ProjectedGradientDescentPyTorch(norm, eps, eps_step=eps/4, max_iter=20|50,
    num_random_init=1, random_eps=False)`` on the cross-entropy loss: one uniform random start in
    the ball, then 20 (50) steps. Cost 20 (50) F + 1 f: ART's ``generate`` predicts the clean
    and the adversarial inputs to log a success rate (an eagerly evaluated ``logger.info``
    argument no setting turns off), but the classifier's logit memo answers the clean ones from
    the clean pass and keeps the adversarial ones for artplug's scoring.
``pgd-20-cw``, ``pgd-50-cw``
    The same PGD, run on a second ``PyTorchClassifier`` over the same model whose loss is the
    Carlini-Wagner margin ``max_{k != y} z_k - z_y`` on the logits (mean over the batch). ART
    ascends the estimator's loss in an untargeted attack, so PGD maximises the margin; unlike
    the cross-entropy it does not saturate when the softmax does (large logit scales, HE's
    cosine heads). Cost as ``pgd-20``/``pgd-50``.
``apgd-ce``
    ART ``AutoProjectedGradientDescent(norm, eps, eps_step=2*eps, max_iter=100,
    nb_random_init=1, loss_type="cross_entropy")``: AutoAttack's step-size-free PGD with its
    budget (100 iterations, initial step 2 eps) and one random start. Cost at most
    100 (F + f) + 4 f.
``apgd-dlr``
    Targeted APGD on the DLR loss, as AutoAttack's APGD-T: ART
    ``AutoProjectedGradientDescent(targeted=True, loss_type="difference_logits_ratio")``, same
    norm, eps, step, iterations and start as ``apgd-ce``, run once per target class. The targets
    are the ``k = min(9, K - 1)`` classes with the largest clean logits other than the true one,
    tried in that order; each target attacks only the examples that survived the previous ones,
    and an example is robust only if it survives every target (per-example worst case). ART's
    targeted DLR loss is ``-(z_t - max_{j != t} z_j) / (z_pi1 - z_pi3)`` (pi = logits sorted in
    decreasing order), not AutoAttack's ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; both
    are invariant to the scale of the logits. ART keeps a targeted run's iterate only if it
    reaches the target (an example pushed to a third class keeps its random start). Needs
    ``K >= 3``. Cost at most k times ``apgd-ce``'s.
``square``
    ART ``SquareAttack(norm, eps, max_iter=5000, p_init=0.8, nb_restarts=1)``: the black-box
    random search with standard AutoAttack's budget of 5000 queries (iterations), stopping early
    once every example is misclassified. Its loss is the margin ``z_y - max_{j != y} z_j``
    (ART's default takes the second-largest logit, which is not the largest wrong one once the
    true class has fallen). Each ART iteration predicts every current input, then the ones not
    yet misclassified, then the candidate update; only the candidates are new, so ART's
    estimator answers repeated inputs from a content-keyed memo (:class:`LogitMemo`) and the
    model runs once per iteration on the candidates, as in the reference implementation.
    Cost at most 5000 x f on the examples not yet misclassified + 2 f. Needs image
    inputs ``(N, C, H, W)``. On images under 10 pixels wide ART's L2 initialisation has empty
    tiles and is skipped (its numpy warnings are silenced); the search itself still runs.
``cw-l2``
    ART ``CarliniL2Method(confidence=0, learning_rate=0.01, binary_search_steps=10, max_iter=10,
    initial_const=0.01, max_halving=5, max_doubling=5)``: a *minimal-perturbation* attack, not
    bounded by eps. An example counts as broken only if C&W finds a misclassified input whose
    distance to the clean input, measured in the threat's norm, is at most eps; otherwise it is
    robust and the clean input is returned. For an l2 threat this is the usual "C&W robust
    accuracy at eps"; for an linf threat it only accepts the L2-minimal examples that happen to
    lie in the L-inf ball, a weak L-inf attack useful as a diagnostic, never as the headline
    number. ART's class gradients are fused into one backward pass per call (the same
    gradients, computed once instead of once per distinct class). It is weak on images with
    many pixels at exactly 0 or 1 (digits, MNIST): ART optimises in tanh space with plain
    gradient steps, which barely move saturated pixels. Cost at most 100 x (2 F + 11 f) + 11 f.
``autoattack-art``
    ``apgd-ce``, then ``apgd-dlr``, then ``square`` (exactly those entries), a worst case per
    example: an example is robust only if it survives all three; each attack runs only on the
    examples that survived the ones before (as the standard AutoAttack does). It is *not* the
    standard AutoAttack: FAB-T is missing, ART's APGD returns its last iterate instead of the
    best one seen and always starts from a random point, and the targeted DLR loss differs (see
    ``apgd-dlr``). Nor is it ART's ``AutoAttack`` class, whose default ensemble is APGD-CE and
    untargeted APGD-DLR with 5 restarts each, DeepFool and Square. Cost at most the sum of the
    three; usually much less, since later attacks see only survivors.
``autoattack``
    The standard AutoAttack (``version="standard"``: APGD-CE, APGD-T with 9 targets, FAB-T with
    9 targets, Square with 5000 queries) from the ``pyautoattack`` package (the optional extra
    ``artplug[autoattack]``; a source install of ``autoattack`` works too), run directly on the
    model, for numbers comparable with RobustBench. Without the package, asking for it raises
    :class:`~artplug.errors.ArtplugError` before any attack runs.

Reporting: :func:`format_table` ends the printed table with :func:`summary_lines`, the strongest
single attack and the worst case over the attacks run, plus :data:`PGD_ONLY_NOTE` when every
attack was FGSM/PGD (:data:`PGD_FAMILY`) and :func:`black_box_note` when the black-box
``square`` beat every white-box attack (gradient masking); :func:`robustness_summary` gives the
strongest attack and the worst case for ``eval.json``. Which entries a run uses by default
(``[eval] final_attacks``) is decided in :mod:`artplug.recipe`, not here.

Importing this module must not import ART or mlflow (``artplug validate`` reads :data:`ATTACKS`
and must stay light): ART is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from artplug import distributed
from artplug.errors import ArtplugError
from artplug.kinds import Threat

ATTACK_TABLE_VERSION: int = 2
"""Version of the attack table; bump it whenever an existing entry changes what it computes."""

AUTOATTACK_MISSING = (
    "the autoattack entry needs the pyautoattack package: pip install 'artplug[autoattack]'"
)
"""The error message when ``autoattack`` is requested and no AutoAttack package is installed."""

AUTOATTACK_ART_PARTS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "square")
"""The entries ``autoattack-art`` runs, in order, as a per-example worst case."""

Outcome = tuple[np.ndarray, np.ndarray]
"""``(x_adv, correct)`` for the attacked examples: inputs scored and the robust mask."""

AttackRunner = Callable[["_Context", np.ndarray, np.ndarray], Outcome]
"""``(context, x, y) -> (x_adv, correct)``: attack the clean-correct examples ``x`` (numpy).

``y`` holds class indices. ``x_adv`` must lie in the eps ball and in [0, 1]; ``correct[i]`` is
True when the model classifies ``x_adv[i]`` as ``y[i]``. ART is imported inside the runner.
"""


@dataclass(frozen=True)
class AttackEntry:
    """One row of the evaluation table: a one-line description, a cost and how to run it.

    ``run`` is ``None`` for ``clean`` (no attack); a runner imports ART itself when called, so
    defining entries costs no ART import. ``cost`` is a one-line estimate per attacked example.
    """

    description: str
    run: AttackRunner | None
    cost: str


# ------------------------------------------------------------------------------------------
# Small helpers


def _art_norm(threat: Threat) -> float:
    """ART's name for the threat's norm (``np.inf`` or ``2``)."""
    if threat.norm == "linf":
        return float(np.inf)
    if threat.norm == "l2":
        return 2.0
    raise ValueError(f"unsupported threat norm {threat.norm!r}; expected 'linf' or 'l2'")


def _distances(delta: np.ndarray, threat: Threat) -> np.ndarray:
    """Per-example size of ``delta`` in the threat's norm, in float64."""
    flat = delta.reshape(delta.shape[0], -1).astype(np.float64)
    if threat.norm == "linf":
        return np.abs(flat).max(axis=1, initial=0.0)
    return np.sqrt((flat**2).sum(axis=1))


def _one_hot_to_index(y: np.ndarray) -> np.ndarray:
    """Class indices from index or one-hot labels (ART hands attacks' callbacks one-hot)."""
    return y.argmax(axis=1) if y.ndim == 2 else y.astype(np.int64)


def _margin_np(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``z_y - max_{j != y} z_j`` per row: positive while the example is classified correctly."""
    rows = np.arange(logits.shape[0])
    true = logits[rows, y]
    other = logits.copy()
    other[rows, y] = -np.inf
    return np.asarray(true - other.max(axis=1), dtype=np.float64)


class MarginLoss(nn.Module):
    """The Carlini-Wagner margin ``max_{k != y} z_k - z_y`` on logits, as a torch loss.

    Positive exactly when the example is misclassified, so an untargeted attack that ascends it
    (ART ascends the estimator's loss) pushes the largest wrong logit over the true one. Takes
    index labels or the one-hot labels ART passes to non-cross-entropy losses. ``reduction`` is
    ``"mean"`` (default), ``"sum"`` or ``"none"``; ART sets it when it needs per-example values.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        labels = target.argmax(dim=1) if target.dim() == 2 else target.long()
        true = logits.gather(1, labels[:, None]).squeeze(1)
        is_true = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
        largest_other = logits.masked_fill(is_true, float("-inf")).amax(dim=1)
        margin = largest_other - true
        if self.reduction == "mean":
            return margin.mean()
        if self.reduction == "sum":
            return margin.sum()
        if self.reduction == "none":
            return margin
        raise ValueError(f"unknown reduction {self.reduction!r}")


# ------------------------------------------------------------------------------------------
# The per-evaluation context the runners share


@dataclass
class _Context:
    """What every runner needs: the ART classifier, the threat and the evaluation settings.

    ``full`` caches the outcome of entries run on *all* clean-correct examples in this
    evaluation (same inputs, same seed, so the same result): ``autoattack-art`` reuses its first
    stage from an ``apgd-ce`` requested alongside, and the other way round.
    """

    classifier: Any
    threat: Threat
    batch_size: int
    seed: int
    device: torch.device
    nb_classes: int
    full: dict[str, Outcome] = field(default_factory=dict)
    _margin: Any = None

    @property
    def eps(self) -> float:
        return float(self.threat.eps)

    @property
    def norm(self) -> float:
        return _art_norm(self.threat)

    def logits(self, x: np.ndarray, *, pin: bool = False) -> np.ndarray:
        """The model's logits for ``x`` in one batched pass (``pin``: keep them in the memo)."""
        return np.asarray(self.classifier.predict(x, batch_size=self.batch_size, pin=pin))

    def correct(self, x: np.ndarray, y: np.ndarray, *, pin: bool = False) -> np.ndarray:
        """Mask of the rows of ``x`` classified as ``y``."""
        return np.asarray(self.logits(x, pin=pin).argmax(axis=1) == y)

    def classifier_with(self, loss: nn.Module) -> Any:
        """Another ART classifier over the same model, with ``loss`` and no logit memo."""
        return _make_classifier(
            self.classifier.model,
            loss,
            tuple(self.classifier.input_shape),
            self.nb_classes,
            self.device,
        )

    def margin_classifier(self) -> Any:
        """A second ART classifier over the same model, whose loss is :class:`MarginLoss`."""
        if self._margin is None:
            self._margin = self.classifier_with(MarginLoss())
            # Same model, same logits: the margin classifier shares the memo.
            self._margin.logit_memo = self.classifier.logit_memo
        return self._margin


def _generate(
    ctx: _Context, attack: Any, x: np.ndarray, y: np.ndarray, target: np.ndarray | None = None
) -> Outcome:
    """``attack.generate`` on ``x`` (towards ``target`` if given), scored against ``y``."""
    # Index labels are fine here: ART turns numpy index labels into one-hot itself (only the
    # torch-tensor path of loss_gradient chokes on index labels).
    x_adv = np.asarray(attack.generate(x=x, y=y if target is None else target), dtype=np.float32)
    return x_adv, ctx.correct(x_adv, y)


def _on_survivors(x: np.ndarray, stages: Iterable[Callable[[np.ndarray], Outcome]]) -> Outcome:
    """Per-example worst case of ``stages``, each run on the examples no earlier stage broke.

    A stage gets the indices of the still-robust rows of ``x`` and returns their outcome;
    survivors keep the last input tried on them (classified correctly, inside the ball).
    """
    x_out = x.copy()
    robust = np.ones(x.shape[0], dtype=bool)
    for stage in stages:
        todo = np.flatnonzero(robust)
        if todo.size == 0:
            break
        x_adv, still = stage(todo)
        x_out[todo] = x_adv
        robust[todo] = still
    return x_out, robust


# ------------------------------------------------------------------------------------------
# Runners, one per kind of entry (parameters are bound when the table is built)


def _fgsm(ctx: _Context, x: np.ndarray, y: np.ndarray) -> Outcome:
    """One gradient step of size eps from the clean input (FGSM for linf, FGM for l2)."""
    from art.attacks.evasion import FastGradientMethod

    # With minimal=False ART steps by ``eps`` and ignores ``eps_step``; it must still be > 0.
    attack = FastGradientMethod(
        ctx.classifier,
        norm=ctx.norm,
        eps=ctx.eps,
        eps_step=ctx.eps,
        targeted=False,
        num_random_init=0,
        batch_size=ctx.batch_size,
    )
    return _generate(ctx, attack, x, y)


def pgd_runner(max_iter: int, *, margin: bool = False) -> AttackRunner:
    """PGD with ``max_iter`` steps of size eps/4 and one uniform random start.

    Cross-entropy, or the CW margin (:class:`MarginLoss`) when ``margin`` is true.
    """

    def run(ctx: _Context, x: np.ndarray, y: np.ndarray) -> Outcome:
        # The PyTorch implementation directly (not the ProjectedGradientDescent dispatcher): the
        # whole attack loop then runs as torch tensors on the classifier's device.
        from art.attacks.evasion import ProjectedGradientDescentPyTorch

        attack = ProjectedGradientDescentPyTorch(
            ctx.margin_classifier() if margin else ctx.classifier,
            norm=ctx.norm,
            eps=ctx.eps,
            eps_step=ctx.eps / 4,
            max_iter=max_iter,
            targeted=False,
            num_random_init=1,
            batch_size=ctx.batch_size,
            random_eps=False,
            verbose=False,
        )
        return _generate(ctx, attack, x, y)

    return run


def _apgd(ctx: _Context, max_iter: int, *, targeted: bool, loss_type: str) -> Any:
    """ART's APGD with AutoAttack's budget: initial step 2 eps, one random start."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    return AutoProjectedGradientDescent(
        ctx.classifier,
        norm=ctx.norm,
        eps=ctx.eps,
        eps_step=2 * ctx.eps,
        max_iter=max_iter,
        targeted=targeted,
        nb_random_init=1,
        batch_size=ctx.batch_size,
        loss_type=loss_type,
        verbose=False,
    )


def apgd_ce_runner(max_iter: int = 100) -> AttackRunner:
    """APGD on the cross-entropy, ``max_iter`` iterations."""

    def run(ctx: _Context, x: np.ndarray, y: np.ndarray) -> Outcome:
        attack = _apgd(ctx, max_iter, targeted=False, loss_type="cross_entropy")
        return _generate(ctx, attack, x, y)

    return run


def dlr_targets(logits: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """``(N, k)``: per row, the ``k`` classes with the largest logits other than ``y``.

    In decreasing order of logit (ties: lower class index first), as AutoAttack's APGD-T picks
    its targets from the clean logits.
    """
    scores = np.asarray(logits, dtype=np.float64).copy()
    scores[np.arange(scores.shape[0]), y] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def apgd_dlr_runner(max_iter: int = 100, max_targets: int = 9) -> AttackRunner:
    """Targeted APGD-DLR over the top ``min(max_targets, K - 1)`` other classes, worst case."""

    def run(ctx: _Context, x: np.ndarray, y: np.ndarray) -> Outcome:
        if ctx.nb_classes < 3:
            raise ValueError(
                f"apgd-dlr needs a model with at least 3 classes (the DLR loss uses the "
                f"third-largest logit), got {ctx.nb_classes}"
            )
        k = min(max_targets, ctx.nb_classes - 1)
        targets = dlr_targets(ctx.logits(x), y, k)
        attack = _apgd(ctx, max_iter, targeted=True, loss_type="difference_logits_ratio")

        def towards(rank: int) -> Callable[[np.ndarray], Outcome]:
            return lambda todo: _generate(ctx, attack, x[todo], y[todo], targets[todo, rank])

        return _on_survivors(x, (towards(rank) for rank in range(k)))

    return run


class LogitMemo:
    """The logits of every row predicted in the last ``generations`` calls, keyed by content.

    A row is identified by a 128-bit BLAKE2b digest of its float32 bytes, so a hit returns the
    logits the model gave for exactly that input (eval mode, frozen weights: the same input
    gives the same logits). Rows not found are predicted in one batched call. Keeping three
    generations makes every per-iteration ``predict`` of ART's Square attack a hit (see
    :func:`square_runner`); the memo's size stays at three calls' worth of rows, plus the rows
    of calls made with ``pin=True`` (the clean inputs), which stay for the whole evaluation.
    ``rows_predicted`` counts the rows that actually went through the model.
    """

    def __init__(self, generations: int = 3) -> None:
        self.generations: deque[dict[bytes, np.ndarray]] = deque(maxlen=generations)
        self.pinned: dict[bytes, np.ndarray] = {}
        self.rows_predicted = 0

    def _lookup(self, key: bytes) -> np.ndarray | None:
        hit = self.pinned.get(key)
        for generation in reversed(self.generations):
            if hit is not None:
                break
            hit = generation.get(key)
        return hit

    def predict(
        self, compute: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *, pin: bool = False
    ) -> np.ndarray:
        """Logits of ``x``: remembered ones, and ``compute(rows)`` for the others."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x]
        found = [self._lookup(key) for key in keys]
        missing = [i for i, hit in enumerate(found) if hit is None]
        if len(missing) == len(x):
            out = np.asarray(compute(x), dtype=np.float32)
        else:
            hits = [(i, hit) for i, hit in enumerate(found) if hit is not None]
            out = np.empty((len(x), hits[0][1].shape[0]), dtype=np.float32)
            for i, hit in hits:
                out[i] = hit
            if missing:
                out[missing] = compute(x[missing])
        self.rows_predicted += len(missing)
        remembered = dict(zip(keys, out.copy(), strict=True))
        if pin:
            self.pinned.update(remembered)
        else:
            self.generations.append(remembered)
        return out


def square_runner(max_iter: int = 5000, *, memo: bool = True) -> AttackRunner:
    """ART's Square attack with ``max_iter`` queries and the margin loss.

    Each iteration of ART's ``SquareAttack.generate`` predicts every current ``x_adv`` (to see
    which are adversarial), then the rows not yet adversarial (the same inputs again) and the
    candidate update. Only the candidates are new inputs: through the evaluation classifier's
    :class:`LogitMemo` the model runs on the candidates only, as in the reference
    implementation (3 passes become 1), and the final scoring costs nothing. ``memo=False``
    attacks through a classifier without a memo: ART's plain behaviour (kept for tests).
    """

    def run(ctx: _Context, x: np.ndarray, y: np.ndarray) -> Outcome:
        from art.attacks.evasion import SquareAttack

        if x.ndim != 4:
            raise ValueError(f"square needs image inputs (N, C, H, W), got shape {tuple(x.shape)}")
        estimator = ctx.classifier if memo else ctx.classifier_with(nn.CrossEntropyLoss())

        def margin(x_rows: np.ndarray, y_rows: np.ndarray) -> np.ndarray:
            logits = estimator.predict(x_rows, batch_size=ctx.batch_size)
            return _margin_np(logits, _one_hot_to_index(y_rows))

        attack = SquareAttack(
            estimator,
            norm=ctx.norm,
            loss=margin,
            max_iter=max_iter,
            eps=ctx.eps,
            p_init=0.8,
            nb_restarts=1,
            batch_size=ctx.batch_size,
            verbose=False,
        )
        # ART's L2 initialisation divides by zero-norm tiles on images under 10 pixels wide.
        with np.errstate(divide="ignore", invalid="ignore"):
            x_adv = np.asarray(attack.generate(x=x, y=y), dtype=np.float32)
        logits = estimator.predict(x_adv, batch_size=ctx.batch_size)
        return x_adv, np.asarray(logits.argmax(axis=1) == y)

    return run


def cw_l2_runner(binary_search_steps: int = 10, max_iter: int = 10) -> AttackRunner:
    """ART's C&W L2, its examples accepted only inside the threat's eps ball."""

    def run(ctx: _Context, x: np.ndarray, y: np.ndarray) -> Outcome:
        from art.attacks.evasion import CarliniL2Method

        attack = CarliniL2Method(
            ctx.classifier,
            confidence=0.0,
            targeted=False,
            learning_rate=0.01,
            binary_search_steps=binary_search_steps,
            max_iter=max_iter,
            initial_const=0.01,
            max_halving=5,
            max_doubling=5,
            batch_size=ctx.batch_size,
            verbose=False,
        )
        x_adv, correct = _generate(ctx, attack, x, y)
        accepted = ~correct & (_distances(x_adv - x, ctx.threat) <= ctx.eps)
        where = accepted.reshape((-1,) + (1,) * (x.ndim - 1))
        return np.where(where, x_adv, x).astype(np.float32), ~accepted

    return run


def _autoattack_art(ctx: _Context, x: np.ndarray, y: np.ndarray) -> Outcome:
    """``AUTOATTACK_ART_PARTS`` in order, each on the survivors of the previous ones."""

    def stage(name: str) -> Callable[[np.ndarray], Outcome]:
        def run(todo: np.ndarray) -> Outcome:
            if todo.size == x.shape[0]:
                # Nothing broken yet: these are all the clean-correct examples, the same inputs
                # a standalone entry sees, so its cached outcome (if any) is exactly this stage.
                return _run_full(ctx, name, x, y)
            runner = ATTACK_ENTRIES[name].run
            assert runner is not None
            _seed(ctx.seed)
            return runner(ctx, x[todo], y[todo])

        return run

    return _on_survivors(x, (stage(name) for name in AUTOATTACK_ART_PARTS))


def _load_autoattack() -> Any:
    """The ``AutoAttack`` class; :class:`ArtplugError` when no AutoAttack package is installed.

    PyPI's ``pyautoattack`` installs the module ``pyautoattack``; a source install of
    fra31/auto-attack installs ``autoattack``.
    """
    for module_name in ("pyautoattack", "autoattack"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return module.AutoAttack
    raise ArtplugError(AUTOATTACK_MISSING)


def _autoattack(ctx: _Context, x: np.ndarray, y: np.ndarray) -> Outcome:
    """The standard AutoAttack run directly on the model (ART's wrapper module).

    Handles both APIs: pyautoattack 0.2 (keyword-only arguments, ``batch_size=``, returns
    ``(x_adv, y_adv)``, logs instead of printing) and fra31/auto-attack (``bs=``, returns
    ``x_adv``, prints unless ``verbose=False``).
    """
    auto_attack = _load_autoattack()
    model = ctx.classifier.model  # the plain module ART runs: the model's own forward
    options: dict[str, Any] = {
        "norm": "Linf" if ctx.threat.norm == "linf" else "L2",
        "eps": ctx.eps,
        "version": "standard",
        "seed": ctx.seed,
        "device": ctx.device,
    }
    if "verbose" in inspect.signature(auto_attack).parameters:
        options["verbose"] = False
    adversary = auto_attack(model, **options)
    run = adversary.run_standard_evaluation
    size = "batch_size" if "batch_size" in inspect.signature(run).parameters else "bs"
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    out = run(x_t, y_t, **{size: ctx.batch_size})
    x_adv = out[0] if isinstance(out, tuple) else out
    x_np = x_adv.detach().to(device="cpu", dtype=torch.float32).numpy()
    return x_np, ctx.correct(x_np, y)


# ------------------------------------------------------------------------------------------
# The table

_PGD = "ART ProjectedGradientDescentPyTorch, {k} steps of eps/4, 1 uniform random start, {loss}"

ATTACK_ENTRIES: Mapping[str, AttackEntry] = {
    "clean": AttackEntry("no attack: accuracy on the clean inputs", None, "1 f (shared)"),
    "fgsm": AttackEntry(
        "one gradient step of size eps (sign for linf, L2-normalised for l2), no random start",
        _fgsm,
        "1 F + 1 f",
    ),
    "pgd-20": AttackEntry(
        "ART PGD (PyTorch), 20 steps of eps/4, 1 uniform random start, cross-entropy",
        pgd_runner(20),
        "20 F + 1 f",
    ),
    "pgd-50": AttackEntry(
        "ART PGD (PyTorch), 50 steps of eps/4, 1 uniform random start, cross-entropy",
        pgd_runner(50),
        "50 F + 1 f",
    ),
    "pgd-20-cw": AttackEntry(
        _PGD.format(k=20, loss="CW margin loss max_{k!=y} z_k - z_y"),
        pgd_runner(20, margin=True),
        "20 F + 1 f",
    ),
    "pgd-50-cw": AttackEntry(
        _PGD.format(k=50, loss="CW margin loss max_{k!=y} z_k - z_y"),
        pgd_runner(50, margin=True),
        "50 F + 1 f",
    ),
    "apgd-ce": AttackEntry(
        "ART AutoProjectedGradientDescent, cross-entropy, 100 iterations, initial step 2 eps, "
        "1 random start",
        apgd_ce_runner(100),
        "<= 100 (F + f) + 4 f",
    ),
    "apgd-dlr": AttackEntry(
        "ART AutoProjectedGradientDescent, targeted DLR loss, 100 iterations, initial step "
        "2 eps, 1 random start, per target: the min(9, K-1) most likely other classes, worst case",
        apgd_dlr_runner(100, 9),
        "<= min(9, K-1) x (100 (F + f) + 4 f)",
    ),
    "square": AttackEntry(
        "ART SquareAttack (black-box), 5000 queries, p_init 0.8, 1 restart, margin loss; "
        "image inputs only",
        square_runner(5000),
        "<= 5000 f on survivors + 2 f",
    ),
    "cw-l2": AttackEntry(
        "ART CarliniL2Method (minimal L2 perturbation, 10 binary-search steps x 10 iterations); "
        "broken only if the example it finds lies within eps in the threat's norm",
        cw_l2_runner(10, 10),
        "<= 100 x (2 F + 11 f) + 11 f",
    ),
    "autoattack-art": AttackEntry(
        "apgd-ce, then apgd-dlr, then square on the survivors, worst case per example "
        "(not the standard AutoAttack: no FAB-T; ART's APGD variants)",
        _autoattack_art,
        "<= apgd-ce + apgd-dlr + square, later ones on survivors only",
    ),
    "autoattack": AttackEntry(
        "standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5000) from the pyautoattack "
        "package; needs pip install 'artplug[autoattack]'",
        _autoattack,
        "standard AutoAttack's (about apgd-ce + 9 x apgd + 9 x FAB + square)",
    ),
}
"""The evaluation table: entry name -> :class:`AttackEntry` (new rows: see the module docstring)."""

ATTACKS: dict[str, str] = {name: entry.description for name, entry in ATTACK_ENTRIES.items()}
"""Entry name -> one-line description; available without importing ART."""


# ------------------------------------------------------------------------------------------
# Checks, model wrapping, random state


def _check_names(attacks: Sequence[str]) -> list[str]:
    """The requested names without duplicates, in order; ValueError on an unknown name.

    Also raises :class:`ArtplugError` up front when ``autoattack`` is requested and no
    AutoAttack package is installed, before any other attack spends time.
    """
    if isinstance(attacks, str):
        # A bare string is a Sequence[str] too; iterating it would look up single letters.
        attacks = [attacks]
    unknown = [name for name in attacks if name not in ATTACK_ENTRIES]
    if unknown:
        raise ValueError(
            f"unknown evaluation attack(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(ATTACK_ENTRIES)}"
        )
    names = list(dict.fromkeys(attacks))
    if "autoattack" in names:
        _load_autoattack()
    return names


def _check_inputs(x: Tensor, y: Tensor, threat: Threat) -> None:
    """Reject inputs the attacks would silently mis-handle."""
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"y must hold one class index per input, shape ({x.shape[0]},), got {tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class indices, got dtype {y.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        # The attacks clip to [0, 1]; normalized inputs would be clipped into nonsense.
        raise ValueError(
            f"x must be in pixel space [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
            "normalization belongs inside the model"
        )
    _art_norm(threat)
    if not threat.eps >= 0.0:  # also rejects NaN
        raise ValueError(f"threat eps must be >= 0, got {threat.eps}")


def _resolve_device(model: nn.Module, device: torch.device | None) -> torch.device:
    """``device``, or where the model's parameters live (CPU for a parameter-free model)."""
    if device is not None:
        return torch.device(device)
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


class _BatchCounter:
    """Counts the model's forward passes (batches) of the entry being run, for a progress display.

    ``callback(count)`` is called after every pass; :meth:`restart` sets the count back to 0
    when the next entry starts.
    """

    def __init__(self, callback: Callable[[int], None] | None = None) -> None:
        self.callback = callback
        self.count = 0

    def restart(self) -> None:
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.callback is not None:
            self.callback(self.count)


class _Plain(nn.Module):
    """A plain ``nn.Module`` around the model.

    ART's model wrapper runs an ``nn.Sequential`` child by child, which skips an overridden
    ``forward`` and forward hooks on the top module; behind this wrapper ART always calls the
    model's own ``forward``. With a ``counter``, every forward pass is counted: ART batches
    inside its attacks, and this is where each batch can be seen.
    """

    def __init__(self, model: nn.Module, counter: _BatchCounter | None = None) -> None:
        super().__init__()
        self.model = model
        self.counter = counter

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if self.counter is not None:
            self.counter.tick()
        return out


@contextmanager
def _attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters while attacking; restores everything afterwards.

    ART's ``loss_gradient`` calls ``loss.backward()``, which would also compute (and store)
    gradients for every parameter on every attack step. With ``requires_grad`` off, backward
    computes the input gradient only: less work, and no ``.grad`` is left behind. Each module's
    own ``training`` flag and each parameter's ``requires_grad`` and ``.grad`` are restored
    exactly (a model may have, e.g., frozen BatchNorm layers in eval mode while training).
    """
    modes = [(module, module.training) for module in model.modules()]
    params = list(model.parameters())
    saved = [(param, param.requires_grad, param.grad) for param in params]
    try:
        model.eval()
        for param in params:
            param.requires_grad_(False)
        yield
    finally:
        for param, requires_grad, grad in saved:
            param.requires_grad_(requires_grad)
            param.grad = grad
        for module, training in modes:
            module.training = training


@contextmanager
def _own_rng(device: torch.device) -> Iterator[None]:
    """Restore numpy's, torch's and Python's global random states on exit.

    Not only the attacks' seeding touches them: every ART ``predict`` iterates a torch
    ``DataLoader``, which draws a base seed from torch's global generator, and ART's L2 Square
    draws from Python's ``random``.
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _seed(seed: int) -> None:
    """Seed the global generators the attacks draw from (inside :func:`_own_rng`)."""
    # ART draws its random starts from numpy's global generator (art.utils.random_sphere).
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.seed(seed)


@functools.cache
def _classifier_type() -> type:
    """ART's ``PyTorchClassifier`` with per-example class gradients in one backward pass.

    ART's ``class_gradient(x, label=<one label per example>)`` runs one backward pass per
    distinct label (up to K) and keeps one column per example; C&W calls it twice per step.
    The gradient of ``sum_i z_{label_i}(x_i)`` with respect to ``x`` has exactly those
    per-example rows (in eval mode each output depends on its own input only, which ART's
    loop assumes too), in a single backward pass.
    """
    from art.estimators.classification import PyTorchClassifier

    class ArtplugClassifier(PyTorchClassifier):  # type: ignore[misc]
        logit_memo: LogitMemo | None = None
        """When set, ``predict`` answers from (and fills) this memo."""

        def predict(
            self, x: np.ndarray, batch_size: int = 128, training_mode: bool = False, **kwargs: Any
        ) -> np.ndarray:
            memo = self.logit_memo
            pin = bool(kwargs.pop("pin", False))
            if memo is None or training_mode or kwargs:
                return super().predict(
                    x, batch_size=batch_size, training_mode=training_mode, **kwargs
                )
            return memo.predict(
                lambda rows: super(ArtplugClassifier, self).predict(rows, batch_size=batch_size),
                x,
                pin=pin,
            )

        def class_gradient(
            self,
            x: np.ndarray,
            label: int | list[int] | np.ndarray | None = None,
            training_mode: bool = False,
            **kwargs: Any,
        ) -> np.ndarray:
            per_example = isinstance(label, (list, np.ndarray)) and len(label) == len(x)
            if not per_example or self.is_rnn or not self.all_framework_preprocessing:
                return super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)
            label_np = np.asarray(label, dtype=np.int64)
            # Checked on the host: a check on the device tensor would sync on every call.
            if label_np.ndim != 1 or ((label_np < 0) | (label_np >= self.nb_classes)).any():
                raise ValueError(f"Label {label} is out of range.")
            labels = torch.as_tensor(label_np, dtype=torch.int64, device=self._device)
            self._model.train(mode=training_mode)
            x_grad = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(self._device)
            x_grad.requires_grad_(True)
            x_input, _ = self._apply_preprocessing(x_grad, y=None, fit=False, no_grad=False)
            logits = self._model(x_input)[-1]
            picked = logits.gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, x_grad)
            return grad.detach().cpu().numpy()[:, None]

    return ArtplugClassifier


def _make_classifier(
    module: nn.Module,
    loss: nn.Module,
    input_shape: tuple[int, ...],
    nb_classes: int,
    device: torch.device,
) -> Any:
    """An artplug ART classifier over ``module`` (already wrapped in :class:`_Plain`)."""
    is_cuda = device.type == "cuda"
    # ART picks ``cuda:{current_device()}`` at construction; make that the requested GPU.
    with torch.cuda.device(device) if is_cuda else nullcontext():
        return _classifier_type()(
            model=module,
            loss=loss,
            input_shape=input_shape,
            nb_classes=nb_classes,
            clip_values=(0.0, 1.0),
            # None, not ART's default (0, 1): normalization lives inside the model, and the
            # default would still insert an identity standardisation op into every call.
            preprocessing=None,
            device_type="gpu" if is_cuda else "cpu",
        )


def _classifier(
    model: nn.Module, x: Tensor, device: torch.device, counter: _BatchCounter | None = None
) -> Any:
    """Wrap ``model`` (already in eval mode) in an ART classifier on ``device``.

    Its ``predict`` remembers the logits of recent inputs (:class:`LogitMemo`): inputs ART
    predicts again (the clean ones inside PGD's success rate, Square's current points, the
    adversarial examples artplug then scores) cost no second forward pass. This relies on the
    model being deterministic in eval mode, as artplug's models are.
    """
    model.to(device)  # ART would move it too; the probe forward below needs it there first
    with torch.no_grad():
        out = model(x[:1].to(device=device, dtype=torch.float32))
    if out.dim() != 2:
        raise ValueError(
            f"the model must return logits of shape (N, classes), got {tuple(out.shape)}"
        )
    classifier = _make_classifier(
        _Plain(model, counter), nn.CrossEntropyLoss(), tuple(x.shape[1:]), int(out.shape[1]), device
    )
    classifier.logit_memo = LogitMemo()
    return classifier


@contextmanager
def _session(
    model: nn.Module,
    x: Tensor,
    threat: Threat,
    device: torch.device | None,
    batch_size: int,
    seed: int,
    counter: _BatchCounter | None = None,
) -> Iterator[_Context]:
    """Attack mode, private random state and the current CUDA device for one evaluation."""
    dev = _resolve_device(model, device)
    # ART classifiers built inside attacks (APGD's loss wrappers) also take the current CUDA
    # device, so it stays the requested one for the whole evaluation.
    on_device = torch.cuda.device(dev) if dev.type == "cuda" else nullcontext()
    with _attack_mode(model), _own_rng(dev), on_device:
        classifier = _classifier(model, x, dev, counter)
        yield _Context(
            classifier=classifier,
            threat=threat,
            batch_size=batch_size,
            seed=seed,
            device=dev,
            nb_classes=int(classifier.nb_classes),
        )


# ------------------------------------------------------------------------------------------
# Running entries


def _run_full(ctx: _Context, name: str, x: np.ndarray, y: np.ndarray) -> Outcome:
    """Entry ``name`` on all clean-correct examples ``(x, y)``, freshly seeded; cached."""
    if name not in ctx.full:
        runner = ATTACK_ENTRIES[name].run
        assert runner is not None
        _seed(ctx.seed)
        ctx.full[name] = runner(ctx, x, y)
    return ctx.full[name]


def _run_entry(
    ctx: _Context,
    name: str,
    x_np: np.ndarray,
    y_np: np.ndarray,
    clean_correct: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Run one entry on the clean-correct examples.

    Returns ``(idx, x_sub, correct)``: the indices that were attacked, their adversarial inputs
    (``None`` when nothing was attacked) and the mask of robustly classified examples.
    """
    idx = np.flatnonzero(clean_correct)
    if ATTACK_ENTRIES[name].run is None or ctx.threat.eps <= 0 or idx.size == 0:
        return idx[:0], None, clean_correct
    x_sub, still = _run_full(ctx, name, x_np[idx], y_np[idx])
    correct = clean_correct.copy()
    correct[idx] = still
    return idx, x_sub, correct


def _to_numpy(x: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    x_np = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    y_np = y.detach().to(device="cpu", dtype=torch.int64).numpy()
    return x_np, y_np


def generate_adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    name: str,
    *,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
) -> Tensor:
    """The adversarial batch that entry ``name`` evaluates, same shape, dtype and device as ``x``.

    Examples the model misclassifies on the clean input are returned unchanged (see the module
    docstring), as is everything for ``clean`` or ``eps == 0``; examples an entry could not
    break come back as the last input it tried (or the clean one), which the model classifies
    correctly. Every returned input lies in the eps ball and in [0, 1]. The model's modes,
    parameter flags and ``.grad`` are restored as in :func:`evaluate`.
    """
    (name,) = _check_names([name])
    _check_inputs(x, y, threat)
    x_np, y_np = _to_numpy(x, y)
    with _session(model, x, threat, device, batch_size, seed) as ctx:
        clean_correct = ctx.correct(x_np, y_np, pin=True)
        idx, x_sub, _ = _run_entry(ctx, name, x_np, y_np, clean_correct)
    x_adv = x.detach().clone()
    if x_sub is not None:
        where = torch.from_numpy(idx).to(x.device)
        x_adv[where] = torch.from_numpy(x_sub).to(device=x.device, dtype=x.dtype)
    return x_adv


def evaluate_detailed(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    attacks: Sequence[str],
    *,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
    on_attack: Callable[[str], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Accuracies and per-example robust masks under each requested entry, plus ``"worst"``.

    Returns ``(accuracy, robust)``: ``accuracy[name]`` as :func:`evaluate` gives it, and
    ``robust[name]`` a bool tensor of shape ``(N,)`` on ``x``'s device, True where the model
    classifies example ``i`` correctly both clean and under that entry (``accuracy[name]`` is
    its mean). Both dicts list the requested names in order, then ``"worst"``: the per-example
    AND over every requested entry (clean included, so with ``["clean"]`` alone it is the clean
    mask), i.e. an example counts only if it survives every requested attack. That is the
    number to report for a set of attacks; it can be lower than each entry's own accuracy.
    Empty ``attacks`` gives two empty dicts. Arguments and guarantees as :func:`evaluate`.
    """
    names = _check_names(attacks)
    _check_inputs(x, y, threat)
    if not names:
        return {}, {}
    out_device, n = x.device, len(x)
    # In a distributed run (artplug.distributed) every rank attacks its contiguous part of the
    # examples and the per-example masks are gathered back in order: the same numbers as one
    # process, in a 1/world_size of the time. Every rank must call this with the same inputs.
    part = distributed.eval_part(n)
    if part is not None:
        x, y = x[part], y[part]
    x_np, y_np = _to_numpy(x, y)
    masks: dict[str, np.ndarray] = {}
    if len(x) == 0:  # a rank left without examples (fewer examples than ranks)
        masks = {name: np.zeros(0, dtype=bool) for name in names}
    else:
        counter = _BatchCounter(on_batch) if on_batch is not None else None
        with _session(model, x, threat, device, batch_size, seed, counter) as ctx:
            # Clean predictions are needed by every entry (misclassified examples are not
            # attacked), so they are computed once and double as the ``clean`` result.
            clean_correct: np.ndarray | None = None
            for name in names:
                if on_attack is not None:
                    on_attack(name)
                if counter is not None:
                    counter.restart()
                if clean_correct is None:
                    clean_correct = ctx.correct(x_np, y_np, pin=True)
                _, _, masks[name] = _run_entry(ctx, name, x_np, y_np, clean_correct)
    if part is not None:
        masks = distributed.gather_masks(masks, n)
    masks["worst"] = np.logical_and.reduce(list(masks.values()))
    accuracy = {name: float(mask.mean()) for name, mask in masks.items()}
    robust = {name: torch.from_numpy(mask.copy()).to(out_device) for name, mask in masks.items()}
    return accuracy, robust


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    attacks: Sequence[str],
    *,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
    on_attack: Callable[[str], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Accuracy in [0, 1] of ``model`` on ``(x, y)`` under each requested entry of the table.

    ``x`` holds inputs in [0, 1] (any device; normalization is inside the model) and ``y`` the
    class indices. ``attacks`` names entries of :data:`ATTACKS`; the result has one key per
    name, in the requested order. ``batch_size`` is used for every ART attack and prediction
    (ART's own defaults, 32 or 1, waste the accelerator). ``device`` defaults to where the
    model's parameters are; ART moves the model there. ``on_attack(name)`` is called before each
    entry starts and ``on_batch(count)`` after each forward pass of the model through ART
    (``count``: the passes of the current entry so far), for a progress display. For the
    per-example worst case over the requested entries, use :func:`evaluate_detailed`.

    The model runs in eval mode; afterwards every module's training flag, every parameter's
    ``requires_grad`` and ``.grad`` are as they were. Results are reproducible for a given
    ``seed``. Raises ``ValueError`` for an unknown entry name (listing the known ones) or for
    malformed inputs, and :class:`~artplug.errors.ArtplugError` when ``autoattack`` is requested
    without its package.
    """
    accuracy, _ = evaluate_detailed(
        model,
        x,
        y,
        threat,
        attacks,
        batch_size=batch_size,
        seed=seed,
        device=device,
        on_attack=on_attack,
        on_batch=on_batch,
    )
    accuracy.pop("worst", None)
    return accuracy


PGD_FAMILY: frozenset[str] = frozenset({"fgsm", "pgd-20", "pgd-50", "pgd-20-cw", "pgd-50-cw"})
"""Entries that are fixed-step gradient attacks (FGSM/PGD): a suite made only of these (and
``clean``) gets a warning line, since PGD alone overstates robustness, most of all for cosine
heads (hypersphere embedding), whose cross-entropy gradient is weak."""

PGD_ONLY_NOTE = (
    "note: only PGD was run; PGD alone overstates robustness (esp. cosine heads); "
    "add apgd-ce and apgd-dlr"
)
"""The line printed under the table when every attack run belongs to :data:`PGD_FAMILY`."""

_NOT_ATTACKS = ("clean", "worst")

BLACK_BOX: frozenset[str] = frozenset({"square"})
"""Entries that query only the model's outputs, never its gradients."""

ENSEMBLES: frozenset[str] = frozenset({"autoattack", "autoattack-art"})
"""Entries that run a black-box attack among white-box ones: counted as neither."""


def black_box_note(results: Mapping[str, float]) -> str | None:
    """The line printed under the table when a black-box entry beats every white-box one.

    A gradient-free attack should never do better than the gradient attacks on a model whose
    gradients are informative: when it does, the gradients are masked (obfuscated) and the
    white-box accuracies overstate robustness. ``None`` when no black-box entry, or no
    white-box one, is in ``results``, or when some white-box entry is as strong.
    """
    attacks = [name for name in results if name not in _NOT_ATTACKS]
    black = [name for name in attacks if name in BLACK_BOX]
    white = [name for name in attacks if name not in BLACK_BOX and name not in ENSEMBLES]
    if not black or not white:
        return None
    black_best = min(black, key=lambda name: results[name])
    white_best = min(white, key=lambda name: results[name])
    if results[black_best] >= results[white_best]:
        return None
    return (
        f"WARNING: black-box {black_best} ({100 * results[black_best]:.2f}%) beats every "
        f"white-box attack (best: {white_best}, {100 * results[white_best]:.2f}%): a sign of "
        "gradient masking"
    )


def robustness_summary(results: Mapping[str, float]) -> dict[str, Any]:
    """The strongest single attack and the worst case of ``results`` (name -> accuracy).

    Returns ``{"strongest": {"attack", "accuracy"} | None, "worst": {"accuracy", "attacks"} |
    None, "pgd_only": bool}``: ``strongest`` is the attack (not ``clean``/``worst``) with the
    lowest accuracy, the first one on ties; ``worst`` is ``results["worst"]`` (the per-example
    worst case over the attacks) or, with a single attack, that attack's accuracy (its robust
    mask is already inside the clean one), ``None`` for several attacks without ``worst``;
    both are ``None`` when no attack ran. ``pgd_only``
    is True when at least one attack ran and every one is in :data:`PGD_FAMILY`.
    """
    attacks = [name for name in results if name not in _NOT_ATTACKS]
    if not attacks:
        return {"strongest": None, "worst": None, "pgd_only": False}
    strongest = min(attacks, key=lambda name: results[name])  # min keeps the first on ties
    # Without a per-example ``worst`` (results of :func:`evaluate`), several attacks' worst case
    # is unknown: the strongest one's accuracy is only an upper bound, so none is claimed.
    worst = results.get("worst", results[strongest] if len(attacks) == 1 else None)
    return {
        "strongest": {"attack": strongest, "accuracy": float(results[strongest])},
        "worst": None if worst is None else {"accuracy": float(worst), "attacks": attacks},
        "pgd_only": all(name in PGD_FAMILY for name in attacks),
    }


def summary_lines(results: Mapping[str, float]) -> list[str]:
    """The lines printed under the accuracy table (see :func:`robustness_summary`).

    ``strongest single attack: apgd-dlr (41.20%); worst case over 3 attacks: 40.80%`` when
    several attacks ran (only the first part for one), then :data:`PGD_ONLY_NOTE` when every
    attack was FGSM/PGD, or :func:`black_box_note` when a black-box attack beat every white-box
    one; nothing when only ``clean`` ran.
    """
    summary = robustness_summary(results)
    strongest, worst = summary["strongest"], summary["worst"]
    if strongest is None:
        return []
    line = f"strongest single attack: {strongest['attack']} ({100 * strongest['accuracy']:.2f}%)"
    if worst is not None and len(worst["attacks"]) > 1:
        count, accuracy = len(worst["attacks"]), 100 * worst["accuracy"]
        line += f"; worst case over {count} attacks: {accuracy:.2f}%"
    lines = [line, PGD_ONLY_NOTE] if summary["pgd_only"] else [line]
    masking = black_box_note(results)
    return [*lines, masking] if masking is not None else lines


def eps_text(eps: float) -> str:
    """``eps`` for a title: ``0.03137 (8/255)`` when it is k/255 for a small k, else ``0.2``."""
    k = round(eps * 255)
    # Only small k: 0.2 is 51/255 too, but nobody writes a digits radius that way.
    if 1 <= k <= 32 and abs(eps * 255 - k) < 1e-6:
        return f"{eps:.4g} ({k}/255)"
    return f"{eps:.4g}"


def table_title(
    norm: str, eps: float, n_examples: int, n_total: int, train_eps: float | None = None
) -> str:
    """The title of the final accuracy table: threat, evaluation eps, training eps and subset.

    E.g. ``Test accuracy (linf, eps=0.03137 (8/255); trained at eps=0.031; first 1000 of 10000
    test examples, in order)``; the training eps is left out when it equals the evaluation's.
    """
    parts = [f"{norm}, eps={eps_text(eps)}"]
    if train_eps is not None and train_eps != eps:
        parts.append(f"trained at eps={eps_text(train_eps)}")
    if n_examples >= n_total:
        parts.append(f"all {n_total} test examples")
    else:
        parts.append(f"first {n_examples} of {n_total} test examples, in order")
    return f"Test accuracy ({'; '.join(parts)})"


def format_table(
    results: Mapping[str, float], title: str | None = None, *, summary: bool = True
) -> str:
    """A small aligned plain-text table of ``results`` (entry name | accuracy in percent).

    With ``summary`` (the default), the lines of :func:`summary_lines` follow the table: the
    strongest single attack, the worst case, and a note when only PGD was run.
    """
    header = ("attack", "accuracy")
    rows = [(name, f"{100.0 * acc:.2f}%") for name, acc in results.items()]
    width_name = max(len(header[0]), *(len(name) for name, _ in rows)) if rows else len(header[0])
    width_acc = max(len(header[1]), *(len(acc) for _, acc in rows)) if rows else len(header[1])
    lines = [] if title is None else [title]
    lines.append(f"{header[0]:<{width_name}} | {header[1]:>{width_acc}}")
    lines.append(f"{'-' * width_name}-+-{'-' * width_acc}")
    lines.extend(f"{name:<{width_name}} | {acc:>{width_acc}}" for name, acc in rows)
    if summary:
        lines.extend(summary_lines(results))
    return "\n".join(lines)
