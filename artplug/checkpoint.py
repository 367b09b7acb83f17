"""Checkpoints: written atomically after every epoch, readable with a clear error when broken."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artplug.errors import CheckpointError

FORMAT_VERSION = 1


def rng_states() -> dict[str, Any]:
    """The state of every random generator a run uses (Python, NumPy, torch CPU and CUDA)."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo :func:`rng_states`; CUDA states are restored only when CUDA is present."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` with ``torch.save`` so that ``path`` is never half-written.

    The data goes to a temporary file in the same folder, is flushed to disk, and then renamed
    over ``path``; a crash or Ctrl-C at any moment leaves either the old or the new checkpoint.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`; CheckpointError on anything wrong."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: checkpoint not found")
    try:
        # weights_only=False: the payload holds RNG states and plain recipe data we wrote ourselves.
        payload = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"{file}: not a readable checkpoint ({type(exc).__name__}); "
            "pass a checkpoint-*.pt file from a run folder"
        ) from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{file}: not an artplug checkpoint")
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: written by a newer artplug (format {payload['format_version']}); upgrade"
        )
    return payload
