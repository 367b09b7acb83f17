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
- numpy and torch are seeded with ``seed`` before each entry, and their global random states are
  restored afterwards, so an evaluation in the middle of training neither depends on nor changes
  the training's random stream.

Importing this module must not import ART or mlflow (``artplug validate`` reads :data:`ATTACKS`
and must stay light): ART is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from artplug.kinds import Threat

ATTACK_TABLE_VERSION: int = 1
"""Version of the attack table; bump it whenever an existing entry changes what it computes."""

AttackFactory = Callable[[Any, Threat, int], Any]
"""``(classifier, threat, batch_size) -> ART evasion attack``, or ``None`` for "no attack".

``classifier`` is an ART ``PyTorchClassifier``; typed ``Any`` because ART is imported lazily.
"""


@dataclass(frozen=True)
class AttackEntry:
    """One row of the evaluation table: a one-line description and how to build the attack.

    ``factory`` imports ART itself when called, so defining entries costs no ART import.
    """

    description: str
    factory: AttackFactory


def _art_norm(threat: Threat) -> float:
    """ART's name for the threat's norm (``np.inf`` or ``2``)."""
    if threat.norm == "linf":
        return float(np.inf)
    if threat.norm == "l2":
        return 2.0
    raise ValueError(f"unsupported threat norm {threat.norm!r}; expected 'linf' or 'l2'")


def _no_attack(classifier: Any, threat: Threat, batch_size: int) -> None:
    """The ``clean`` entry: no attack."""
    return None


def _fgsm(classifier: Any, threat: Threat, batch_size: int) -> Any:
    """One gradient step of size eps from the clean input (FGSM for linf, FGM for l2)."""
    from art.attacks.evasion import FastGradientMethod

    eps = float(threat.eps)
    # With minimal=False ART steps by ``eps`` and ignores ``eps_step``; it must still be > 0.
    return FastGradientMethod(
        classifier,
        norm=_art_norm(threat),
        eps=eps,
        eps_step=eps,
        targeted=False,
        num_random_init=0,
        batch_size=batch_size,
    )


def _pgd(max_iter: int) -> AttackFactory:
    """Factory for PGD with ``max_iter`` steps of size eps/4 and one uniform random start."""

    def factory(classifier: Any, threat: Threat, batch_size: int) -> Any:
        # The PyTorch implementation directly (not the ProjectedGradientDescent dispatcher): the
        # whole attack loop then runs as torch tensors on the classifier's device.
        from art.attacks.evasion import ProjectedGradientDescentPyTorch

        eps = float(threat.eps)
        return ProjectedGradientDescentPyTorch(
            classifier,
            norm=_art_norm(threat),
            eps=eps,
            eps_step=eps / 4,
            max_iter=max_iter,
            targeted=False,
            num_random_init=1,
            batch_size=batch_size,
            random_eps=False,
            verbose=False,
        )

    return factory


ATTACK_ENTRIES: Mapping[str, AttackEntry] = {
    "clean": AttackEntry("no attack: accuracy on the clean inputs", _no_attack),
    "fgsm": AttackEntry(
        "one gradient step of size eps (sign for linf, L2-normalised for l2), no random start",
        _fgsm,
    ),
    "pgd-20": AttackEntry(
        "ART PGD (PyTorch), 20 steps of eps/4, 1 uniform random start, cross-entropy",
        _pgd(20),
    ),
    "pgd-50": AttackEntry(
        "ART PGD (PyTorch), 50 steps of eps/4, 1 uniform random start, cross-entropy",
        _pgd(50),
    ),
}
"""The evaluation table: entry name -> :class:`AttackEntry` (new rows: see the module docstring)."""

ATTACKS: dict[str, str] = {name: entry.description for name, entry in ATTACK_ENTRIES.items()}
"""Entry name -> one-line description; available without importing ART."""


def _check_names(attacks: Sequence[str]) -> list[str]:
    """The requested names without duplicates, in order; ValueError on an unknown name."""
    if isinstance(attacks, str):
        # A bare string is a Sequence[str] too; iterating it would look up single letters.
        attacks = [attacks]
    unknown = [name for name in attacks if name not in ATTACK_ENTRIES]
    if unknown:
        raise ValueError(
            f"unknown evaluation attack(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(ATTACK_ENTRIES)}"
        )
    return list(dict.fromkeys(attacks))


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


class _Plain(nn.Module):
    """A plain ``nn.Module`` around the model.

    ART's model wrapper runs an ``nn.Sequential`` child by child, which skips an overridden
    ``forward`` and forward hooks on the top module; behind this wrapper ART always calls the
    model's own ``forward``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


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
    """Restore numpy's and torch's global random states on exit.

    Not only the attacks' seeding touches them: every ART ``predict`` iterates a torch
    ``DataLoader``, which draws a base seed from torch's global generator.
    """
    np_state = np.random.get_state()
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        np.random.set_state(np_state)


def _seed(seed: int) -> None:
    """Seed the global generators the attacks draw from (inside :func:`_own_rng`)."""
    # ART draws its random starts from numpy's global generator (art.utils.random_sphere).
    np.random.seed(seed)
    torch.manual_seed(seed)


def _classifier(model: nn.Module, x: Tensor, device: torch.device) -> Any:
    """Wrap ``model`` (already in eval mode) in an ART ``PyTorchClassifier`` on ``device``."""
    from art.estimators.classification import PyTorchClassifier

    model.to(device)  # ART would move it too; the probe forward below needs it there first
    with torch.no_grad():
        out = model(x[:1].to(device=device, dtype=torch.float32))
    if out.dim() != 2:
        raise ValueError(
            f"the model must return logits of shape (N, classes), got {tuple(out.shape)}"
        )
    is_cuda = device.type == "cuda"
    # ART picks ``cuda:{current_device()}`` at construction; make that the requested GPU.
    with torch.cuda.device(device) if is_cuda else nullcontext():
        return PyTorchClassifier(
            model=_Plain(model),
            loss=nn.CrossEntropyLoss(),
            input_shape=tuple(x.shape[1:]),
            nb_classes=int(out.shape[1]),
            clip_values=(0.0, 1.0),
            # None, not ART's default (0, 1): normalization lives inside the model, and the
            # default would still insert an identity standardisation op into every call.
            preprocessing=None,
            device_type="gpu" if is_cuda else "cpu",
        )


def _predict(classifier: Any, x_np: np.ndarray, batch_size: int) -> np.ndarray:
    """Predicted class indices, in one batched pass."""
    return np.asarray(classifier.predict(x_np, batch_size=batch_size)).argmax(axis=1)


def _run_entry(
    classifier: Any,
    name: str,
    threat: Threat,
    x_np: np.ndarray,
    y_np: np.ndarray,
    clean_correct: np.ndarray,
    *,
    batch_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Run one entry on the clean-correct examples.

    Returns ``(idx, x_sub, correct)``: the indices that were attacked, their adversarial inputs
    (``None`` when nothing was attacked) and the mask of robustly classified examples.
    """
    attack = None
    if threat.eps > 0:
        attack = ATTACK_ENTRIES[name].factory(classifier, threat, batch_size)
    idx = np.flatnonzero(clean_correct)
    if attack is None or idx.size == 0:
        return idx[:0], None, clean_correct
    _seed(seed)
    # Index labels are fine here: ART turns numpy index labels into one-hot itself (only the
    # torch-tensor path of loss_gradient chokes on index labels).
    x_sub = np.asarray(attack.generate(x=x_np[idx], y=y_np[idx]), dtype=np.float32)
    # ART's PGD already predicts the clean and adversarial inputs once, to log a success rate
    # (an eagerly evaluated logger.info argument that no setting turns off); the accuracy needs
    # one more predict, on the attacked subset only.
    correct = clean_correct.copy()
    correct[idx] = _predict(classifier, x_sub, batch_size) == y_np[idx]
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
    docstring), as is everything for ``clean`` or ``eps == 0``. The model's modes, parameter
    flags and ``.grad`` are restored as in :func:`evaluate`.
    """
    (name,) = _check_names([name])
    _check_inputs(x, y, threat)
    dev = _resolve_device(model, device)
    x_np, y_np = _to_numpy(x, y)
    with _attack_mode(model), _own_rng(dev):
        classifier = _classifier(model, x, dev)
        clean_correct = _predict(classifier, x_np, batch_size) == y_np
        idx, x_sub, _ = _run_entry(
            classifier,
            name,
            threat,
            x_np,
            y_np,
            clean_correct,
            batch_size=batch_size,
            seed=seed,
        )
    x_adv = x.detach().clone()
    if x_sub is not None:
        where = torch.from_numpy(idx).to(x.device)
        x_adv[where] = torch.from_numpy(x_sub).to(device=x.device, dtype=x.dtype)
    return x_adv


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
) -> dict[str, float]:
    """Accuracy in [0, 1] of ``model`` on ``(x, y)`` under each requested entry of the table.

    ``x`` holds inputs in [0, 1] (any device; normalization is inside the model) and ``y`` the
    class indices. ``attacks`` names entries of :data:`ATTACKS`; the result has one key per
    name, in the requested order. ``batch_size`` is used for every ART attack and prediction
    (ART's own default, 32, wastes the accelerator). ``device`` defaults to where the model's
    parameters are; ART moves the model there. ``on_attack(name)`` is called before each entry
    starts (for a progress display).

    The model runs in eval mode; afterwards every module's training flag, every parameter's
    ``requires_grad`` and ``.grad`` are as they were. Results are reproducible for a given
    ``seed``. Raises ``ValueError`` for an unknown entry name (listing the known ones) or for
    malformed inputs.
    """
    names = _check_names(attacks)
    _check_inputs(x, y, threat)
    results: dict[str, float] = {}
    if not names:
        return results
    dev = _resolve_device(model, device)
    x_np, y_np = _to_numpy(x, y)
    with _attack_mode(model), _own_rng(dev):
        classifier = _classifier(model, x, dev)
        # Clean predictions are needed by every entry (misclassified examples are not attacked),
        # so they are computed once and double as the ``clean`` result.
        clean_correct: np.ndarray | None = None
        for name in names:
            if on_attack is not None:
                on_attack(name)
            if clean_correct is None:
                clean_correct = _predict(classifier, x_np, batch_size) == y_np
            _, _, correct = _run_entry(
                classifier,
                name,
                threat,
                x_np,
                y_np,
                clean_correct,
                batch_size=batch_size,
                seed=seed,
            )
            results[name] = float(correct.mean())
    return results


def format_table(results: Mapping[str, float], title: str | None = None) -> str:
    """A small aligned plain-text table of ``results`` (entry name | accuracy in percent)."""
    header = ("attack", "accuracy")
    rows = [(name, f"{100.0 * acc:.2f}%") for name, acc in results.items()]
    width_name = max(len(header[0]), *(len(name) for name, _ in rows)) if rows else len(header[0])
    width_acc = max(len(header[1]), *(len(acc) for _, acc in rows)) if rows else len(header[1])
    lines = [] if title is None else [title]
    lines.append(f"{header[0]:<{width_name}} | {header[1]:>{width_acc}}")
    lines.append(f"{'-' * width_name}-+-{'-' * width_acc}")
    lines.extend(f"{name:<{width_name}} | {acc:>{width_acc}}" for name, acc in rows)
    return "\n".join(lines)
