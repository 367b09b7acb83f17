"""Timing helpers shared by the benchmark scripts (imported as ``_common`` from their folder)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

NOISY_SPREAD = 1.15
"""Slowest / fastest run of one contender above which the timings are flagged as noisy."""


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timers measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """``(seconds, result)`` of ``fn(*args)``, ``device`` synchronised at both ends."""
    synchronize(device)
    started = time.perf_counter()
    result = fn(*args)
    synchronize(device)
    return time.perf_counter() - started, result


def noisy_contenders(times: Mapping[str, list[float]]) -> list[str]:
    """The contenders whose slowest run exceeds :data:`NOISY_SPREAD` times their fastest."""
    return [name for name, runs in times.items() if max(runs) > NOISY_SPREAD * min(runs)]


def load_average() -> str:
    """The 1-minute load average: other processes on the machine skew every timing."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # not available on this platform
        return "n/a"
