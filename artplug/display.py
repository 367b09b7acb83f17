"""Progress display: one live status line on a terminal, plain timestamped lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Display:
    """Shows training progress without flooding logs.

    On a terminal the status line is redrawn in place; when the output is a file or a pipe (CI,
    ``nohup``), a plain line is printed at most every ``plain_interval_s`` seconds, plus one
    line per epoch and per evaluation.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
        plain_interval_s: float = 10.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.plain_interval_s = plain_interval_s
        self._last_plain = 0.0
        self._live_width = 0

    def status(self, text: str) -> None:
        """Update the status line (rate-limited when not on a terminal)."""
        if not self.enabled:
            return
        if self.live:
            padded = text.ljust(self._live_width)
            self._live_width = len(text)
            self.stream.write("\r" + padded)
            self.stream.flush()
            return
        now = time.monotonic()
        if now - self._last_plain >= self.plain_interval_s:
            self._last_plain = now
            self._plain(text)

    def line(self, text: str) -> None:
        """Print a permanent line (epoch summaries, evaluation results)."""
        if not self.enabled:
            return
        if self.live and self._live_width:
            self.stream.write("\r" + " " * self._live_width + "\r")
            self._live_width = 0
        self._plain(text)

    def _plain(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
