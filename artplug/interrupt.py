"""Stopping a run cleanly on SIGTERM or SIGINT.

``timeout``, ``docker stop``, Kubernetes and Slurm send SIGTERM; a terminal sends SIGINT. While
a run is in progress :func:`stop_on_signals` installs one handler for both that only *records*
the request in a :class:`StopRequest`: the training loop polls it between optimizer steps, writes
a checkpoint of the last completed step and raises :class:`RunInterrupted`. A second signal (or
a first one outside the training loop, where there is no step boundary to wait for) raises
:class:`RunInterrupted` at once.

:class:`RunInterrupted` is a :class:`KeyboardInterrupt`, so code that already cleans up after
Ctrl-C (marking an MLflow run KILLED, a sweep's parent run) does the same for SIGTERM. Its
``exit_code`` is the shell convention ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code_of(signum: int) -> int:
    """The shell's exit status for a process ended by signal ``signum`` (128 + number)."""
    return 128 + int(signum)


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``checkpoint`` is where it can be resumed from.

    ``checkpoint`` and ``step`` are ``None`` when the run stopped before writing one (e.g. a
    second signal, or a signal before training started).
    """

    def __init__(
        self, signum: int, checkpoint: Path | None = None, step: int | None = None
    ) -> None:
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.step = step
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM."""
        return exit_code_of(self.signum)

    @property
    def signal_name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return signal.Signals(self.signum).name


class StopRequest:
    """A stop asked for by a signal, polled by the training loop between optimizer steps.

    ``deferring`` says whether the code now running can stop at a step boundary (the training
    loop sets it with :meth:`deferred`); when it is false a signal interrupts at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False

    @property
    def requested(self) -> bool:
        """True once a signal asked the run to stop."""
        return self.signum is not None

    def request(self, signum: int) -> None:
        """Record a stop request (the handler calls this; tests may too)."""
        self.signum = int(signum)

    def interrupted(
        self, checkpoint: Path | None = None, step: int | None = None
    ) -> RunInterrupted:
        """The exception that ends the run for the recorded signal."""
        return RunInterrupted(self.signum or signal.SIGINT, checkpoint, step)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside the block a first signal only sets the flag (the loop stops at a step)."""
        before = self.deferring
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = before

    def _handle(self, signum: int, frame: object) -> None:
        # The local record, not `requested`: a subclass may make that a collective
        # (artplug.distributed.AgreedStop), which a signal handler must never run.
        if self.signum is not None or not self.deferring:
            # A second signal, or nothing polls the flag right now: stop here and now.
            self.request(signum)
            raise RunInterrupted(signum)
        self.request(signum)


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """Route SIGINT and SIGTERM to ``stop`` inside the block; the old handlers come back after.

    Python runs signal handlers only in the main thread and only the main thread may install
    them, so elsewhere (a run started from a worker thread) this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, stop._handle)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            # getsignal gives None for a handler not installed from Python; leave that one.
            if handler is not None:
                signal.signal(signum, handler)
