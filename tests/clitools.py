"""Running the CLI in-process from tests: one helper shared by the CLI-level test files."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from artplug.cli import main
from artplug.recipe import dumps_toml
from artplug.testing import digits_recipe


def run_main(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``artplug ARGS`` through :func:`artplug.cli.main`: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code or 0  # type: ignore[assignment]
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_recipe(path: Path, **sections) -> Path:
    """Write :func:`artplug.testing.digits_recipe` with ``sections`` to ``path``."""
    path.write_text(dumps_toml(digits_recipe(**sections)))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers and rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def call(args: Sequence[str], stderr: io.StringIO | None = None) -> tuple[int, str, str]:
    """``artplug ARGS`` in-process with stdout and stderr redirected (no capsys needed):
    (exit code, stdout, stderr). ``stderr`` lets a test pass a stream of its own (e.g. one
    that claims to be a terminal)."""
    out, err = io.StringIO(), stderr if stderr is not None else io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()
