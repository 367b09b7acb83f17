"""Cost accounting: network passes per training example, time and peak memory, per epoch.

:class:`PassCounter` counts passes from outside the step (model hooks, no host sync);
:class:`CostLedger` turns an epoch's counts into ``cost/*`` metrics, run totals and the
``cost`` entry of ``eval.json``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from artplug import phase


class PassCounter:
    """Counts the network passes of training steps, in example rows, from outside the step.

    A forward hook on the top-level model adds each forward's batch size to ``forward_rows``,
    and to ``attack_rows`` too when the forward runs inside ``Perturbation.generate`` (phase
    ``"attack"``). When the output requires grad, a tensor hook on it adds the same rows to
    ``backward_rows`` each time a gradient flows back through it: the weight update's
    ``loss.backward()`` and an attack's ``torch.autograd.grad`` alike, while a forward whose
    output no loss uses (or that ran under ``no_grad``) costs no backward. Forwards in phase
    ``"eval"`` (validation, evaluation, anything outside the training step) are not counted.
    ``examples`` is the number of training rows the step loop drew (``train_epoch`` adds them),
    once per minibatch however many FreeAT replays reuse it.

    Only the top-level model's passes count: a plugin that calls a submodule directly (part
    of the network) adds nothing. Nothing here reads a device tensor, so counting costs no
    host sync.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero every count."""
        self.examples = 0
        self.forward_rows = 0
        self.backward_rows = 0
        self.attack_rows = 0

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        """Count ``model``'s passes inside the ``with`` block (the hook is removed after)."""
        handle = model.register_forward_hook(self._on_forward)
        try:
            yield
        finally:
            handle.remove()

    def _on_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        current = phase.current_phase()
        if current == "eval" or not isinstance(output, Tensor) or output.dim() == 0:
            return
        rows = int(output.shape[0])
        self.forward_rows += rows
        if current == "attack":
            self.attack_rows += rows
        if output.requires_grad:
            # A tensor hook, not a module backward hook: module full-backward hooks wrap the
            # module's inputs and outputs and break in-place ops and torch.func transforms.
            output.register_hook(functools.partial(self._on_backward, rows))

    def _on_backward(self, rows: int, grad: Tensor) -> None:
        self.backward_rows += rows


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA ``device`` (process RSS has no reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory in MiB: CUDA memory allocated by tensors on a CUDA ``device`` since the last
    :func:`reset_peak_memory`, else the whole process's maximum resident set size since it
    started (it never goes down); ``None`` where neither can be read (no ``resource`` module).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


PEAK_MEMORY_SOURCES = {
    "cuda": "torch.cuda.max_memory_allocated, reset every epoch",
    "other": "process max resident set size (resource.getrusage), process-wide, since start",
}


class CostLedger:
    """The training cost of a run, epoch by epoch: metrics, run totals and ``eval.json``'s entry.

    Per epoch (:meth:`record_epoch`, logged at the epoch's last step):

    - ``cost/forward_per_example``, ``cost/backward_per_example``: full-network forward and
      backward passes (:class:`PassCounter` rows) divided by the epoch's training examples.
      PGD-k with cross-entropy on the adversarial batch costs ``k + 1`` of each;
    - ``cost/attack_steps``: forward passes inside the attack per minibatch, averaged over the
      epoch (attack rows / training examples; ``k`` for PGD-k, 0 without an attack);
    - ``cost/examples_per_s``, ``cost/epoch_s``: training throughput and time (the steps only;
      validation and checkpoints are not included);
    - ``cost/peak_memory_mb``: see :func:`peak_memory_mb` (omitted where it cannot be read).

    Run totals (:meth:`totals`): ``cost/total_forward_per_example`` and
    ``cost/total_backward_per_example`` (sums of the per-epoch values: the passes one training
    example went through over the whole run, on average) and ``cost/train_s`` (sum of
    ``cost/epoch_s``). The ledger travels in checkpoints, so a resumed run keeps its totals.

    In a distributed run of ``world_size`` processes each one counts its own slices, all of the
    same size: the passes per example are the same, and the examples (and so the throughput)
    are ``world_size`` times this process's.
    """

    def __init__(self, device: torch.device, world_size: int = 1) -> None:
        self.device = device
        self.world_size = world_size
        self.epochs: list[dict[str, float]] = []

    def record_epoch(
        self, epoch: int, counter: PassCounter, seconds: float, peak_mb: float | None
    ) -> dict[str, float]:
        """Store epoch ``epoch`` (1-based) and return its ``cost/*`` metrics."""
        examples = counter.examples
        per_example = 1.0 / examples if examples else 0.0
        examples *= self.world_size
        entry = {
            "epoch": float(epoch),
            "examples": float(examples),
            "forward_per_example": counter.forward_rows * per_example,
            "backward_per_example": counter.backward_rows * per_example,
            "attack_steps": counter.attack_rows * per_example,
            "examples_per_s": examples / seconds if seconds > 0 else 0.0,
            "epoch_s": seconds,
        }
        if peak_mb is not None:
            entry["peak_memory_mb"] = peak_mb
        # A resumed run re-trains the epoch after its last checkpoint: the new record wins.
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch] + [entry]
        return {f"cost/{k}": v for k, v in entry.items() if k not in ("epoch", "examples")}

    def totals(self) -> dict[str, float]:
        """The run totals as metrics (see the class docstring)."""
        return {
            "cost/total_forward_per_example": sum(e["forward_per_example"] for e in self.epochs),
            "cost/total_backward_per_example": sum(e["backward_per_example"] for e in self.epochs),
            "cost/train_s": sum(e["epoch_s"] for e in self.epochs),
        }

    def report(self) -> dict[str, Any]:
        """The ``cost`` entry of ``eval.json``: totals, peak memory and every epoch's record."""
        peaks = [e["peak_memory_mb"] for e in self.epochs if "peak_memory_mb" in e]
        source = "cuda" if self.device.type == "cuda" else "other"
        return {
            **{k.removeprefix("cost/"): v for k, v in self.totals().items()},
            "peak_memory_mb": max(peaks) if peaks else None,
            "peak_memory_source": PEAK_MEMORY_SOURCES[source],
            "epochs": self.state_dict(),
        }

    def state_dict(self) -> list[dict[str, float]]:
        """Plain data for checkpoints."""
        return [dict(e) for e in self.epochs]

    def load_state_dict(self, state: list[dict[str, float]] | None) -> None:
        """Undo :meth:`state_dict` (``None``: a checkpoint from before cost accounting)."""
        self.epochs = [dict(e) for e in state or []]


_COUNTS = ("examples", "forward_rows", "backward_rows", "attack_rows")


def counter_state(counter: PassCounter) -> dict[str, int]:
    """The counts of ``counter`` as plain data (a mid-epoch checkpoint)."""
    return {name: int(getattr(counter, name)) for name in _COUNTS}


def load_counter(counter: PassCounter, state: Mapping[str, Any]) -> None:
    """Undo :func:`counter_state`."""
    for name in _COUNTS:
        setattr(counter, name, int(state.get(name, 0)))
