"""The sanity gate: cheap checks that a model's robust accuracy can be believed.

Gradient masking (obfuscated gradients, Athalye et al. 2018) makes white-box attacks fail
without making the model robust: a non-differentiable preprocessing step, a saturated softmax,
a model that only behaves in one BatchNorm mode. Such a model reports a high robust accuracy
that a slightly different attack destroys. The gate runs a few attacks whose results must be
ordered in a known way; a check that breaks the order flags the run (it never stops it).

The checks (``tolerance`` is ``[eval] sanity_tolerance``, an absolute accuracy difference).
Every check is a pure function of measured accuracies (``check_*`` below), so its threshold can
be tested on fixed numbers; :func:`run_sanity_gate` measures and calls them. The white-box PGD
entries the comparisons use (``pgd-20``, ``pgd-50``, ``pgd-20-cw``) run with :data:`RESTARTS`
seeded random starts (seeds ``seed``, ``seed + 1``, ...), an example counting as robust only if
it survives every start (:func:`attack_accuracy`): one unlucky start must not pass for masking.

``black_box_vs_white_box``
    accuracy under a black-box attack must not be lower than the white-box PGD accuracy (the
    lower of ``pgd-20`` and ``pgd-50``) by more than ``tolerance``: an attack that never sees a
    gradient cannot beat one that follows it unless the gradient is useless. The black-box
    attack is ``random-search`` (default: :func:`random_search_accuracy`, a Square-style random
    search of :data:`RANDOM_SEARCH_QUERIES` queries in torch, seconds on a CPU) or the attack
    table's ``square`` entry (5000 queries through ART: minutes even on a few hundred small
    images, since every query is a separate ART ``predict``). Value: white-box minus black-box.
``large_eps``
    ``pgd-20`` accuracy at a radius where every input can be moved onto a uniform grey image
    (L-inf 0.5; L2 ``0.5 * sqrt(input size)``) must be at most ``tolerance``. Value: that
    accuracy.
``more_iterations``
    ``pgd-50`` accuracy must not exceed ``pgd-20`` accuracy by more than ``tolerance / 2``:
    more steps of the same attack can only find more adversarial examples. Value: pgd-50
    minus pgd-20.
``fgsm_vs_pgd``
    ``fgsm`` accuracy must not be lower than the PGD accuracy (the lower of ``pgd-20`` and
    ``pgd-50``) by more than ``tolerance``: an iterative attack that is weaker than its own
    first step has gradients that stop helping after that step (broken or obfuscated gradients,
    e.g. a quantizing input layer whose gradient only exists on the data grid). Value: PGD
    minus FGSM.
``ce_vs_cw``
    ``pgd-20`` (cross-entropy) accuracy must not exceed ``pgd-20-cw`` (the same PGD on the
    Carlini-Wagner margin) by more than ``tolerance``: when the softmax saturates (large logit
    scales, cosine heads with a large ``s``) the cross-entropy's gradient underflows to zero
    while the margin's does not, and a CE-only evaluation overstates robustness. Value: CE
    minus CW.
``train_vs_eval_mode``
    robust accuracy under the same 20-step PGD (eps/4 steps, one random start, cross-entropy;
    a torch implementation, since ART always attacks in eval mode) with a copy of the model in
    train mode and in eval mode must agree within ``2 * tolerance``: BatchNorm's batch
    statistics alone move an honest model's number by a few points (4 % measured on a small
    digits CNN, 200 examples), while a model that is robust in one mode only (e.g. trained with
    BatchNorm stuck in eval mode, as ART's FBF trainer does) differs by far more. The copy keeps
    the BatchNorm running statistics of the real model untouched. For a model with dropout
    (:func:`has_dropout`) a larger difference is only a *warning* (status ``warn``; the gate
    still passes): random units dropped in train mode change the predictions and randomise the
    attack's gradients, so the two numbers differ on an honest model too. Value: the absolute
    difference.
``art_clean_matches_engine``
    clean accuracy through the ART wrapper must equal the plain torch forward's (within one
    example): otherwise ART sees a different model (a bypassed ``forward``, a wrong input
    range) and every number it produces is about that other model. Value: ART minus torch.

Results are plain :class:`CheckResult` records; :func:`gate_metrics`, :func:`gate_tags` and
:func:`gate_report` turn them into what the tracker, the console and ``eval.json`` get.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from artplug import distributed
from artplug.evaluate import _resolve_device
from artplug.kinds import Threat
from artplug.ops import ascent_step, project, random_start

CHECKS = (
    "black_box_vs_white_box",
    "large_eps",
    "more_iterations",
    "fgsm_vs_pgd",
    "ce_vs_cw",
    "train_vs_eval_mode",
    "art_clean_matches_engine",
)
"""The gate's checks, in the order they are reported."""

BLACK_BOX_ATTACKS = ("random-search", "square")
"""Choices of the black-box attack: artplug's torch random search, or the table's ``square``."""
WHITE_BOX_ATTACKS = ("pgd-20", "pgd-50")
CW_ATTACK = "pgd-20-cw"
"""The margin-loss twin of ``pgd-20`` in the attack table (the ``ce_vs_cw`` check)."""
RESTARTED = ("pgd-20", "pgd-50", "pgd-20-cw")
"""Table entries the gate runs with :data:`RESTARTS` random starts (the compared PGD attacks)."""
RESTARTS = 2
"""Seeded random starts of each entry of :data:`RESTARTED`; worst case per example."""
LARGE_EPS_LINF = 0.5
RANDOM_SEARCH_QUERIES = 1000
"""Model queries (forward passes per example) of the ``random-search`` black-box attack."""
# Accuracies are ratios of counts: a difference exactly at a threshold must not fail on float
# round-off (0.55 - 0.5 > 0.05 in binary floating point).
_ROUNDING = 1e-9

Status = Literal["pass", "fail", "warn", "skip"]


@dataclass(frozen=True)
class CheckResult:
    """One check of the gate.

    ``passed`` is ``None`` for a skipped check (then ``value`` is ``None`` too); ``value`` is
    the measured quantity the check compares with its threshold; ``detail`` says in words what
    was measured and what was required. ``warning`` marks a check whose failure is reported but
    does not fail the gate (status ``warn``): ``passed`` still tells whether the threshold held.
    """

    name: str
    passed: bool | None
    value: float | None
    detail: str
    warning: bool = False

    @property
    def status(self) -> Status:
        """``pass``, ``fail``, ``warn`` (failed, but only a warning) or ``skip``."""
        if self.passed is None:
            return "skip"
        if self.passed:
            return "pass"
        return "warn" if self.warning else "fail"

    def line(self) -> str:
        """One console line: status, name, value and detail."""
        value = "-" if self.value is None else f"{self.value:+.4f}"
        return f"{self.status.upper():<4}  {self.name:<24}  {value:>8}  {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``eval.json``."""
        return {
            "name": self.name,
            "status": self.status,
            "value": self.value,
            "detail": self.detail,
        }


def large_eps(threat: Threat, input_shape: Sequence[int]) -> float:
    """A radius at which every input in [0, 1] can reach the uniform grey image (0.5 everywhere).

    L-inf: 0.5. L2: ``0.5 * sqrt(d)`` for ``d`` input values. Never smaller than the threat's
    own eps.
    """
    if threat.norm == "linf":
        radius = LARGE_EPS_LINF
    else:
        radius = 0.5 * math.sqrt(math.prod(int(d) for d in input_shape))
    return max(radius, threat.eps)


def has_dropout(model: nn.Module) -> bool:
    """True when ``model`` contains a dropout module.

    One of torch's dropout layers (``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``,
    ``nn.FeatureAlphaDropout``), or a module whose class name contains ``Dropout`` (plugins' own,
    e.g. AALP's ``GuidedDropout``). Dropout called functionally inside a ``forward`` is not seen.
    """
    return any(
        isinstance(module, nn.modules.dropout._DropoutNd) or "Dropout" in type(module).__name__
        for module in model.modules()
    )


def failed(results: Sequence[CheckResult]) -> list[str]:
    """Names of the checks that failed (warnings excluded)."""
    return [r.name for r in results if r.status == "fail"]


def warned(results: Sequence[CheckResult]) -> list[str]:
    """Names of the checks whose failure is only a warning."""
    return [r.name for r in results if r.status == "warn"]


def gate_summary(results: Sequence[CheckResult]) -> str:
    """``passed`` or ``FAILED: name, name`` (the value of the ``artplug.sanity`` tag).

    Warnings do not change it: a gate with warnings only is ``passed``.
    """
    names = failed(results)
    return f"FAILED: {', '.join(names)}" if names else "passed"


def gate_metrics(results: Sequence[CheckResult]) -> dict[str, float]:
    """``sanity/<check>`` = its value for every check that ran, and ``sanity/passed`` (1 or 0)."""
    metrics = {f"sanity/{r.name}": r.value for r in results if r.value is not None}
    metrics["sanity/passed"] = 0.0 if failed(results) else 1.0
    return metrics


def gate_tags(results: Sequence[CheckResult]) -> dict[str, str]:
    """``sanity.<check>`` = pass/fail/warn/skip, and ``artplug.sanity`` = :func:`gate_summary`."""
    tags: dict[str, str] = {f"sanity.{r.name}": r.status for r in results}
    tags["artplug.sanity"] = gate_summary(results)
    return tags


def gate_report(
    results: Sequence[CheckResult], n_examples: int, tolerance: float
) -> dict[str, Any]:
    """The ``sanity`` entry of ``eval.json``."""
    return {
        "passed": not failed(results),
        "summary": gate_summary(results),
        "warnings": warned(results),
        "n_examples": n_examples,
        "tolerance": tolerance,
        "checks": [r.to_dict() for r in results],
    }


def gate_lines(results: Sequence[CheckResult]) -> list[str]:
    """Console lines: a header, one line per check, a NOTE line for warnings, a WARNING line
    when the gate failed."""
    lines = [f"Sanity gate: {gate_summary(results)}"]
    lines += [f"  {r.line()}" for r in results]
    notes = warned(results)
    if notes:
        lines.append(
            f"NOTE: sanity check(s) {', '.join(notes)} outside their threshold, reported as a "
            "warning only (see the check's detail)"
        )
    names = failed(results)
    if names:
        lines.append(
            f"WARNING: sanity gate FAILED ({', '.join(names)}): the robust accuracies may be "
            "inflated by gradient masking; do not report them without a stronger evaluation"
        )
    return lines


# ------------------------------------------------------------------------------------------
# The checks, as pure functions of measured accuracies


def check_black_box(white: float, black: float | None, tolerance: float, label: str) -> CheckResult:
    """``black_box_vs_white_box``: black-box may not beat white-box PGD by over ``tolerance``.

    ``black`` is ``None`` when the black-box attack could not run (the check is skipped and
    ``label`` says why); otherwise ``label`` names the attack.
    """
    if black is None:
        return CheckResult("black_box_vs_white_box", None, None, label)
    gap = white - black
    return CheckResult(
        "black_box_vs_white_box",
        gap <= tolerance + _ROUNDING,
        gap,
        f"black-box {label} {_pct(black)} vs white-box PGD {_pct(white)} (the lower of "
        f"pgd-20 and pgd-50); the black-box attack may not win by more than {_pct(tolerance)}",
    )


def check_large_eps(accuracy: float, norm: str, radius: float, tolerance: float) -> CheckResult:
    """``large_eps``: ``pgd-20`` accuracy at ``radius`` must be at most ``tolerance``."""
    return CheckResult(
        "large_eps",
        accuracy <= tolerance + _ROUNDING,
        accuracy,
        f"pgd-20 accuracy at {norm} eps={radius:.4g} is {_pct(accuracy)}; "
        f"must be at most {_pct(tolerance)}",
    )


def check_more_iterations(pgd20: float, pgd50: float, tolerance: float) -> CheckResult:
    """``more_iterations``: pgd-50 may not beat pgd-20's accuracy by more than ``tolerance/2``."""
    slack = tolerance / 2
    rise = pgd50 - pgd20
    return CheckResult(
        "more_iterations",
        rise <= slack + _ROUNDING,
        rise,
        f"pgd-50 {_pct(pgd50)} vs pgd-20 {_pct(pgd20)}; "
        f"more steps may not raise accuracy by more than {_pct(slack)}",
    )


def check_fgsm_vs_pgd(fgsm: float, pgd: float, tolerance: float) -> CheckResult:
    """``fgsm_vs_pgd``: FGSM accuracy may not be below PGD's by more than ``tolerance``.

    ``pgd`` is the lower of the pgd-20 and pgd-50 accuracies: PGD's first steps can already
    go where FGSM's one step goes, so it losing to FGSM means its gradients stop helping.
    """
    gap = pgd - fgsm
    return CheckResult(
        "fgsm_vs_pgd",
        gap <= tolerance + _ROUNDING,
        gap,
        f"fgsm {_pct(fgsm)} vs PGD {_pct(pgd)} (the lower of pgd-20 and pgd-50); one step "
        f"may not beat the iterative attack by more than {_pct(tolerance)}",
    )


def check_ce_vs_cw(ce: float, cw: float, tolerance: float) -> CheckResult:
    """``ce_vs_cw``: pgd-20 (cross-entropy) may not beat pgd-20-cw (margin) by over ``tolerance``.

    A saturated softmax hides the gradient from the cross-entropy, not from the margin.
    """
    gap = ce - cw
    return CheckResult(
        "ce_vs_cw",
        gap <= tolerance + _ROUNDING,
        gap,
        f"pgd-20 (cross-entropy) {_pct(ce)} vs {CW_ATTACK} (CW margin) {_pct(cw)}; the "
        f"margin loss may not win by more than {_pct(tolerance)}",
    )


def check_train_vs_eval(
    in_train: float, in_eval: float, tolerance: float, *, dropout: bool = False
) -> CheckResult:
    """``train_vs_eval_mode``: the two modes' PGD accuracies within ``2 * tolerance``.

    With ``dropout`` (the model has dropout: train mode is random) a larger difference is a
    warning, not a failure.
    """
    diff = abs(in_train - in_eval)
    slack = 2 * tolerance
    detail = (
        f"PGD-20 (torch) accuracy in train mode {_pct(in_train)} vs eval mode {_pct(in_eval)}; "
        f"may differ by at most {_pct(slack)}"
    )
    if dropout:
        detail += " (the model has dropout: a larger difference is only a warning)"
    return CheckResult(
        "train_vs_eval_mode", diff <= slack + _ROUNDING, diff, detail, warning=dropout
    )


def check_art_clean(art: float, engine: float, n: int) -> CheckResult:
    """``art_clean_matches_engine``: ART's clean accuracy within one of ``n`` examples."""
    delta = art - engine
    one_example = 1.0 / max(n, 1)
    return CheckResult(
        "art_clean_matches_engine",
        abs(delta) <= one_example + _ROUNDING,
        delta,
        f"clean accuracy via ART {_pct(art)} vs torch forward {_pct(engine)} "
        f"on {n} examples; may differ by at most one example",
    )


# ------------------------------------------------------------------------------------------
# The gate


def attack_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    attacks: Sequence[str],
    *,
    restarts: int = 1,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Accuracy under each entry of the attack table, entries of :data:`RESTARTED` restarted.

    The table runs each entry with one random start. An entry of :data:`RESTARTED` is run again
    with seeds ``seed + 1``, ..., ``seed + restarts - 1`` (the table seeds every entry, so a new
    seed is a new random start) and an example counts as robust only if it survives every run:
    the accuracy of a ``restarts``-start attack. Other entries (``clean``, ``fgsm``: nothing
    random; a black-box ``square``: minutes per run) run once.
    """
    from artplug.evaluate import evaluate_detailed

    _, robust = evaluate_detailed(
        model, x, y, threat, attacks, batch_size=batch_size, seed=seed, device=device
    )
    again = [name for name in robust if name in RESTARTED]
    for k in range(1, restarts if again else 1):
        _, more = evaluate_detailed(
            model, x, y, threat, again, batch_size=batch_size, seed=seed + k, device=device
        )
        for name in again:
            robust[name] = robust[name] & more[name]
    # Counts over n, as the table computes them (a float32 mean is off in the 8th digit).
    return {name: int(robust[name].sum()) / max(len(x), 1) for name in attacks}


def run_sanity_gate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
    tolerance: float = 0.05,
    black_box: str = "random-search",
    restarts: int = RESTARTS,
    on_check: Callable[[str], None] | None = None,
) -> list[CheckResult]:
    """Run every check of the gate on ``(x, y)`` (pixel space [0, 1], class indices).

    ``black_box`` is one of :data:`BLACK_BOX_ATTACKS`; ``restarts`` (>= 1) is the number of
    seeded random starts of the compared PGD entries (:data:`RESTARTED`). ``model`` is left as
    it was (modes, parameters, BatchNorm statistics). ``on_check(name)`` is called before each
    check starts (for a progress display). Returns one :class:`CheckResult` per entry of
    :data:`CHECKS`, in that order.
    """
    from artplug.evaluate import ATTACKS

    if black_box not in BLACK_BOX_ATTACKS:
        raise ValueError(f"black_box must be one of {BLACK_BOX_ATTACKS}, got {black_box!r}")
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1, got {restarts}")
    dev = _resolve_device(model, device)
    announce = on_check if on_check is not None else (lambda name: None)
    n = len(x)
    table_black_box = black_box == "square" and "square" in ATTACKS
    attacks = ["clean", "fgsm", *WHITE_BOX_ATTACKS, CW_ATTACK] + (
        ["square"] if table_black_box else []
    )

    def table(on_threat: Threat, names: Sequence[str], starts: int) -> dict[str, float]:
        return attack_accuracy(
            model,
            x,
            y,
            on_threat,
            names,
            restarts=starts,
            batch_size=batch_size,
            seed=seed,
            device=dev,
        )

    announce("black_box_vs_white_box")
    acc = table(threat, attacks, restarts)
    white = min(acc[name] for name in WHITE_BOX_ATTACKS)
    results: dict[str, CheckResult] = {}
    black: float | None = None
    label = black_box
    if table_black_box:
        black = acc["square"]
    elif black_box == "square":
        label = "square not in the attack table"
    elif x.dim() != 4:
        label = f"random-search needs image inputs (N, C, H, W), got shape {tuple(x.shape)}"
    else:
        xs, ys = _part(x, y)
        black = distributed.mean_over_ranks(
            random_search_accuracy(
                model, xs, ys, threat, batch_size=batch_size, seed=seed, device=dev
            ),
            len(xs),
            n,
        )
        label = f"random-search ({RANDOM_SEARCH_QUERIES} queries)"
    results["black_box_vs_white_box"] = check_black_box(white, black, tolerance, label)

    announce("large_eps")
    radius = large_eps(threat, x.shape[1:])
    # Not a comparison of attacks: one start is enough to reach the grey image.
    big = table(Threat(threat.norm, radius), ["pgd-20"], 1)["pgd-20"]
    results["large_eps"] = check_large_eps(big, threat.norm, radius, tolerance)

    announce("more_iterations")
    results["more_iterations"] = check_more_iterations(acc["pgd-20"], acc["pgd-50"], tolerance)

    announce("fgsm_vs_pgd")
    results["fgsm_vs_pgd"] = check_fgsm_vs_pgd(acc["fgsm"], white, tolerance)

    announce("ce_vs_cw")
    results["ce_vs_cw"] = check_ce_vs_cw(acc["pgd-20"], acc[CW_ATTACK], tolerance)

    announce("train_vs_eval_mode")
    in_eval = mode_pgd_accuracy(
        model, x, y, threat, train_mode=False, batch_size=batch_size, seed=seed, device=dev
    )
    in_train = mode_pgd_accuracy(
        model, x, y, threat, train_mode=True, batch_size=batch_size, seed=seed, device=dev
    )
    results["train_vs_eval_mode"] = check_train_vs_eval(
        in_train, in_eval, tolerance, dropout=has_dropout(model)
    )

    announce("art_clean_matches_engine")
    xs, ys = _part(x, y)
    engine_clean = distributed.mean_over_ranks(
        clean_accuracy(model, xs, ys, batch_size=batch_size, device=dev), len(xs), n
    )
    results["art_clean_matches_engine"] = check_art_clean(acc["clean"], engine_clean, n)
    return [results[name] for name in CHECKS]


def _part(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's part of the examples in a distributed run (all of them otherwise).

    The attack table shards itself (:func:`artplug.evaluate.evaluate_detailed`); the gate's
    own eval-mode measures (random search, clean accuracy) use this part and combine the
    counts with :func:`artplug.distributed.mean_over_ranks`. The train-mode PGD check is not
    sharded: with synchronised BatchNorm every rank must run the same number of batches.
    """
    part = distributed.eval_part(len(x))
    return (x, y) if part is None else (x[part], y[part])


def _pct(value: float) -> str:
    return f"{100.0 * value:.1f}%"


def _batches(x: Tensor, y: Tensor, size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(x), size):
        yield x[start : start + size], y[start : start + size]


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Restore every module's training flag on exit."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def clean_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> float:
    """Accuracy of a plain torch forward in eval mode (what the engine computes)."""
    dev = _resolve_device(model, device)
    correct = 0
    with _restored(model), torch.no_grad():
        model.eval()
        for xb, yb in _batches(x, y, batch_size):
            logits = model(xb.to(dev, torch.float32))
            correct += int((logits.argmax(1) == yb.to(dev)).sum())
    return correct / max(len(x), 1)


def mode_pgd_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    train_mode: bool,
    steps: int = 20,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
) -> float:
    """Robust accuracy under a torch PGD run, and judged, with a copy of ``model`` in one mode.

    The attack mirrors the table's ``pgd-20``: ``steps`` steps of eps/4 from one uniform random
    start, cross-entropy. An example counts only if the clean and the adversarial input are
    both classified correctly (in the same mode). The copy means that BatchNorm running
    statistics updated by train-mode forwards never reach ``model``.
    """
    dev = _resolve_device(model, device)
    twin = copy.deepcopy(model).to(dev)
    for param in twin.parameters():
        param.requires_grad_(False)
    twin.train(train_mode)
    step_size = threat.eps / 4
    correct = 0
    cuda = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for xb, yb in _batches(x, y, batch_size):
            xb = xb.to(dev, torch.float32)
            yb = yb.to(dev)
            with torch.no_grad():
                clean_ok = twin(xb).argmax(1) == yb
            x_adv = random_start(xb, threat) if threat.eps > 0 else xb
            for _ in range(steps if threat.eps > 0 else 0):
                x_adv = x_adv.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = F.cross_entropy(twin(x_adv), yb, reduction="sum")
                    grad = (
                        torch.autograd.grad(loss, x_adv)[0]
                        if loss.requires_grad
                        else torch.zeros_like(x_adv)
                    )
                x_adv = project(
                    x_adv.detach() + ascent_step(grad, step_size, threat.norm), xb, threat
                )
            with torch.no_grad():
                adv_ok = twin(x_adv.detach()).argmax(1) == yb
            correct += int((clean_ok & adv_ok).sum())
    return correct / max(len(x), 1)


FAST_AT_STEPS = 5
"""PGD steps of FastAT's early-stopping check (``attack_pgd(..., 5, 1)`` in ``train_fgsm.py``)."""


def fast_at_pgd_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    steps: int = FAST_AT_STEPS,
    seed: int = 0,
    device: torch.device | None = None,
) -> float:
    """PGD accuracy of ``model`` on one batch ``(x, y)`` as FastAT's early stop measures it.

    Wong et al. 2020 (``locuslab/fast_adversarial``, ``CIFAR10/train_fgsm.py`` and
    ``utils.attack_pgd``), after each epoch: with the model in *train* mode (BatchNorm on the
    batch's statistics, dropout active), one uniform random start in the ball, ``steps`` (5)
    sign steps on the batch-mean cross-entropy, each step moving only the examples still
    classified correctly, projected onto the ball and [0, 1]; then the fraction of the batch
    classified correctly at the final inputs, by a train-mode forward. The step is eps/4 (the
    reference's 2/255 at its eps = 8/255; scaled so the attack means the same at any radius).
    The whole ``(x, y)`` is one batch, as in the reference. Unlike the reference, it attacks a
    copy (the reference's train-mode forwards also move the model's BatchNorm running
    statistics) and runs on a private random stream seeded with ``seed`` (the training's
    stream is neither used nor advanced).
    """
    dev = _resolve_device(model, device)
    twin = copy.deepcopy(model).to(dev)
    for param in twin.parameters():
        param.requires_grad_(False)
    twin.train()
    xb = x.to(dev, torch.float32)
    yb = y.to(dev)
    step_size = threat.eps / 4
    cuda = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        x_adv = random_start(xb, threat) if threat.eps > 0 else xb
        for _ in range(steps if threat.eps > 0 else 0):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = twin(x_adv)
                # The reference stops an example's steps once it is misclassified (and the
                # whole attack once none is left), but every forward sees the full batch.
                active = logits.argmax(1) == yb
                if not bool(active.any()):
                    break
                loss = F.cross_entropy(logits, yb)
                grad = (
                    torch.autograd.grad(loss, x_adv)[0]
                    if loss.requires_grad
                    else torch.zeros_like(x_adv)
                )
            stepped = project(
                x_adv.detach() + ascent_step(grad, step_size, threat.norm), xb, threat
            )
            mask = active.view(-1, *([1] * (xb.dim() - 1)))
            x_adv = torch.where(mask, stepped, x_adv.detach())
        with torch.no_grad():
            correct = twin(x_adv.detach()).argmax(1) == yb
    return float(correct.float().mean()) if len(yb) else 0.0


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j`` per example: positive while the example is classified right."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.amax(1)


def _window_side(progress: float, height: int, width: int) -> int:
    """Side of the square window at ``progress`` (0..1) through the query budget.

    The window starts at 80 % of the image area and its area halves each time the search
    passes one of a fixed set of fractions of the budget (more at the start, where large
    windows make fast progress), never below one pixel.
    """
    halvings = sum(progress >= f for f in (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8))
    area = 0.8 * 0.5**halvings * height * width
    return max(1, min(height - 1, width - 1, round(math.sqrt(area))))


def random_search_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: Threat,
    *,
    queries: int = RANDOM_SEARCH_QUERIES,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
) -> float:
    """Robust accuracy under a black-box random search that only reads the model's logits.

    In the style of the Square attack (Andriushchenko et al. 2020): start from a perturbation
    of vertical stripes (L-inf: +-eps per column and channel; L2: a random direction of length
    eps), then repeatedly redraw the perturbation inside one random square window (L-inf: +-eps
    per channel; L2: Gaussian noise, projected back onto the ball) and keep the change when it
    lowers the margin ``z_y - max_{j != y} z_j``. An example stops being queried as soon as it
    is misclassified. The window shrinks as the budget is spent (:func:`_window_side`). Each
    query is one forward pass of the still-correct examples in eval mode; nothing is
    differentiated, so gradient masking cannot slow it down. Image inputs ``(N, C, H, W)`` only.
    """
    dev = _resolve_device(model, device)
    correct = 0
    eps = float(threat.eps)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    def signs(*shape: int) -> Tensor:
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(dev, torch.float32)

    with _restored(model), torch.no_grad():
        model.eval()
        for xb, yb in _batches(x, y, batch_size):
            xb = xb.to(dev, torch.float32)
            yb = yb.to(dev)
            n, channels, height, width = xb.shape
            clean_ok = model(xb).argmax(1) == yb
            if eps <= 0:
                correct += int(clean_ok.sum())
                continue
            if threat.norm == "linf":
                delta = eps * signs(n, channels, 1, width).expand(-1, -1, height, -1)
            else:
                delta = torch.randn(n, channels, height, width, generator=generator).to(dev)
            x_adv = project(xb + delta, xb, threat)
            margin = _margin(model(x_adv), yb)
            rows = torch.arange(height, device=dev).view(1, 1, height, 1)
            cols = torch.arange(width, device=dev).view(1, 1, 1, width)
            for query in range(1, queries):
                active = torch.nonzero(margin > 0).squeeze(1)
                if active.numel() == 0:
                    break
                side = _window_side(query / queries, height, width)
                m = active.numel()
                top = (draw(m) * (height - side + 1)).long().clamp(max=height - side)
                left = (draw(m) * (width - side + 1)).long().clamp(max=width - side)
                inside = (
                    (rows >= top.view(-1, 1, 1, 1))
                    & (rows < (top + side).view(-1, 1, 1, 1))
                    & (cols >= left.view(-1, 1, 1, 1))
                    & (cols < (left + side).view(-1, 1, 1, 1))
                )
                base, current = xb[active], x_adv[active]
                if threat.norm == "linf":
                    fresh = base + eps * signs(m, channels, 1, 1)
                else:
                    noise = torch.randn(m, channels, height, width, generator=generator).to(dev)
                    fresh = current + eps * noise / math.sqrt(side * side * channels)
                candidate = project(torch.where(inside, fresh, current), base, threat)
                new_margin = _margin(model(candidate), yb[active])
                better = new_margin < margin[active]
                keep = active[better]
                x_adv[keep] = candidate[better]
                margin[keep] = new_margin[better]
            adv_ok = model(x_adv).argmax(1) == yb
            correct += int((clean_ok & adv_ok).sum())
    return correct / max(len(x), 1)
