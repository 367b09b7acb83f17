"""Progress display: one live status line on a terminal, plain timestamped lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    """``0:07``, ``12:30``, ``1:02:03``: a duration as minutes and seconds, hours when needed."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def duration(seconds: float) -> str:
    """A wall time for people: ``7.4s`` under a minute, else :func:`clock` (``3:12``)."""
    return f"{seconds:.1f}s" if seconds < 59.95 else clock(seconds)


class Display:
    """Shows training progress without flooding logs.

    On a terminal the status line is redrawn in place; when the output is a file or a pipe (CI,
    ``nohup``), a plain line is printed at most every ``plain_interval_s`` seconds, plus one
    line per epoch and per evaluation.

    ``quiet`` (``--quiet``) keeps the status line and the routine lines (:meth:`line`) off, but
    still prints warnings (:meth:`warn`); ``enabled=False`` prints nothing at all (a
    distributed run's ranks other than 0, the Python API without output).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
        quiet: bool = False,
        plain_interval_s: float = 10.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.quiet = quiet
        self.live = (
            enabled and not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        )
        self.plain_interval_s = plain_interval_s
        self._last_plain = 0.0
        self._live_width = 0

    def status(self, text: str) -> None:
        """Update the status line (rate-limited when not on a terminal)."""
        if not self.enabled or self.quiet:
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
        if not self.enabled or self.quiet:
            return
        self.clear()
        self._plain(text)

    def warn(self, message: str) -> None:
        """Print ``WARNING: message``, also under ``quiet``: a warning is not progress."""
        if not self.enabled:
            return
        self.clear()
        self._plain(f"WARNING: {message}")

    def clear(self) -> None:
        """Erase the live status line, so that what is printed next starts on a clean line.

        Call it before printing anything to the terminal by other means (a results table on
        stdout, a hint on stderr): the status line sits on the same terminal line otherwise.
        """
        if self.live and self._live_width:
            self.stream.write("\r" + " " * self._live_width + "\r")
            self.stream.flush()
            self._live_width = 0

    def _plain(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
