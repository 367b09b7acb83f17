"""The sanity gate: cheap checks that a model's robust accuracy can be believed.

Gradient masking (obfuscated gradients, Athalye et al. 2018) makes white-box attacks fail
without making the model robust: a non-differentiable preprocessing step, a saturated softmax,
a model that only behaves in one BatchNorm mode. Such a model reports a high robust accuracy
that a slightly different attack destroys. The gate runs a few attacks whose results must be
ordered in a known way; a check that breaks the order flags the run (it never stops it).

The checks (``tolerance`` is ``[eval] sanity_tolerance``, an absolute accuracy difference):

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
``train_vs_eval_mode``
    robust accuracy under the same 20-step PGD (eps/4 steps, one random start, cross-entropy;
    a torch implementation, since ART always attacks in eval mode) with a copy of the model in
    train mode and in eval mode must agree within ``2 * tolerance``: BatchNorm's batch
    statistics alone move an honest model's number by a few points (4 % measured on a small
    digits CNN, 200 examples), while a model that is robust in one mode only (e.g. trained with
    BatchNorm stuck in eval mode, as ART's FBF trainer does) differs by far more. The copy keeps
    the BatchNorm running statistics of the real model untouched. Value: the absolute
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

from artplug.evaluate import _resolve_device
from artplug.kinds import Threat
from artplug.ops import ascent_step, project, random_start

CHECKS = (
    "black_box_vs_white_box",
    "large_eps",
    "more_iterations",
    "train_vs_eval_mode",
    "art_clean_matches_engine",
)
"""The gate's checks, in the order they are reported."""

BLACK_BOX_ATTACKS = ("random-search", "square")
"""Choices of the black-box attack: artplug's torch random search, or the table's ``square``."""
WHITE_BOX_ATTACKS = ("pgd-20", "pgd-50")
LARGE_EPS_LINF = 0.5
RANDOM_SEARCH_QUERIES = 1000
"""Model queries (forward passes per example) of the ``random-search`` black-box attack."""
# Accuracies are ratios of counts: a difference exactly at a threshold must not fail on float
# round-off (0.55 - 0.5 > 0.05 in binary floating point).
_ROUNDING = 1e-9

Status = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class CheckResult:
    """One check of the gate.

    ``passed`` is ``None`` for a skipped check (then ``value`` is ``None`` too); ``value`` is
    the measured quantity the check compares with its threshold; ``detail`` says in words what
    was measured and what was required.
    """

    name: str
    passed: bool | None
    value: float | None
    detail: str

    @property
    def status(self) -> Status:
        """``pass``, ``fail`` or ``skip``."""
        if self.passed is None:
            return "skip"
        return "pass" if self.passed else "fail"

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


def failed(results: Sequence[CheckResult]) -> list[str]:
    """Names of the checks that failed."""
    return [r.name for r in results if r.passed is False]


def gate_summary(results: Sequence[CheckResult]) -> str:
    """``passed`` or ``FAILED: name, name`` (the value of the ``artplug.sanity`` tag)."""
    names = failed(results)
    return f"FAILED: {', '.join(names)}" if names else "passed"


def gate_metrics(results: Sequence[CheckResult]) -> dict[str, float]:
    """``sanity/<check>`` = its value for every check that ran, and ``sanity/passed`` (1 or 0)."""
    metrics = {f"sanity/{r.name}": r.value for r in results if r.value is not None}
    metrics["sanity/passed"] = 0.0 if failed(results) else 1.0
    return metrics


def gate_tags(results: Sequence[CheckResult]) -> dict[str, str]:
    """``sanity.<check>`` = pass/fail/skip, and ``artplug.sanity`` = :func:`gate_summary`."""
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
        "n_examples": n_examples,
        "tolerance": tolerance,
        "checks": [r.to_dict() for r in results],
    }


def gate_lines(results: Sequence[CheckResult]) -> list[str]:
    """Console lines: a header, one line per check, and a WARNING line when the gate failed."""
    lines = [f"Sanity gate: {gate_summary(results)}"]
    lines += [f"  {r.line()}" for r in results]
    names = failed(results)
    if names:
        lines.append(
            f"WARNING: sanity gate FAILED ({', '.join(names)}): the robust accuracies may be "
            "inflated by gradient masking; do not report them without a stronger evaluation"
        )
    return lines


# ------------------------------------------------------------------------------------------
# The gate


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
    on_check: Callable[[str], None] | None = None,
) -> list[CheckResult]:
    """Run every check of the gate on ``(x, y)`` (pixel space [0, 1], class indices).

    ``black_box`` is one of :data:`BLACK_BOX_ATTACKS`. ``model`` is left as it was (modes,
    parameters, BatchNorm statistics). ``on_check(name)`` is called before each check starts
    (for a progress display). Returns one :class:`CheckResult` per entry of :data:`CHECKS`, in
    that order.
    """
    from artplug.evaluate import ATTACKS, evaluate

    if black_box not in BLACK_BOX_ATTACKS:
        raise ValueError(f"black_box must be one of {BLACK_BOX_ATTACKS}, got {black_box!r}")
    dev = _resolve_device(model, device)
    announce = on_check if on_check is not None else (lambda name: None)
    n = len(x)
    table_black_box = black_box == "square" and "square" in ATTACKS
    attacks = ["clean", *WHITE_BOX_ATTACKS] + (["square"] if table_black_box else [])

    def table(on_threat: Threat, names: Sequence[str]) -> dict[str, float]:
        return evaluate(model, x, y, on_threat, names, batch_size=batch_size, seed=seed, device=dev)

    announce("black_box_vs_white_box")
    acc = table(threat, attacks)
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
        black = random_search_accuracy(
            model, x, y, threat, batch_size=batch_size, seed=seed, device=dev
        )
        label = f"random-search ({RANDOM_SEARCH_QUERIES} queries)"
    if black is None:
        results["black_box_vs_white_box"] = CheckResult("black_box_vs_white_box", None, None, label)
    else:
        gap = white - black
        results["black_box_vs_white_box"] = CheckResult(
            "black_box_vs_white_box",
            gap <= tolerance + _ROUNDING,
            gap,
            f"black-box {label} {_pct(black)} vs white-box PGD {_pct(white)} (the lower of "
            f"pgd-20 and pgd-50); the black-box attack may not win by more than {_pct(tolerance)}",
        )

    announce("large_eps")
    radius = large_eps(threat, x.shape[1:])
    big = table(Threat(threat.norm, radius), ["pgd-20"])["pgd-20"]
    results["large_eps"] = CheckResult(
        "large_eps",
        big <= tolerance + _ROUNDING,
        big,
        f"pgd-20 accuracy at {threat.norm} eps={radius:.4g} is {_pct(big)}; "
        f"must be at most {_pct(tolerance)}",
    )

    announce("more_iterations")
    slack = tolerance / 2
    rise = acc["pgd-50"] - acc["pgd-20"]
    results["more_iterations"] = CheckResult(
        "more_iterations",
        rise <= slack + _ROUNDING,
        rise,
        f"pgd-50 {_pct(acc['pgd-50'])} vs pgd-20 {_pct(acc['pgd-20'])}; "
        f"more steps may not raise accuracy by more than {_pct(slack)}",
    )

    announce("train_vs_eval_mode")
    in_eval = mode_pgd_accuracy(
        model, x, y, threat, train_mode=False, batch_size=batch_size, seed=seed, device=dev
    )
    in_train = mode_pgd_accuracy(
        model, x, y, threat, train_mode=True, batch_size=batch_size, seed=seed, device=dev
    )
    diff = abs(in_train - in_eval)
    mode_slack = 2 * tolerance
    results["train_vs_eval_mode"] = CheckResult(
        "train_vs_eval_mode",
        diff <= mode_slack + _ROUNDING,
        diff,
        f"PGD-20 (torch) accuracy in train mode {_pct(in_train)} vs eval mode {_pct(in_eval)}; "
        f"may differ by at most {_pct(mode_slack)}",
    )

    announce("art_clean_matches_engine")
    engine_clean = clean_accuracy(model, x, y, batch_size=batch_size, device=dev)
    art_clean = acc["clean"]
    delta = art_clean - engine_clean
    one_example = 1.0 / max(n, 1)
    results["art_clean_matches_engine"] = CheckResult(
        "art_clean_matches_engine",
        abs(delta) <= one_example + _ROUNDING,
        delta,
        f"clean accuracy via ART {_pct(art_clean)} vs torch forward {_pct(engine_clean)} "
        f"on {n} examples; may differ by at most one example",
    )
    return [results[name] for name in CHECKS]


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
