"""User-fixable errors.

Anything derived from :class:`ArtplugError` is a problem the user can fix (a recipe, a flag, a
path, a plugin package). The CLI prints it as one ``Error: ...`` line and exits with
:attr:`ArtplugError.exit_code`; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class ArtplugError(Exception):
    """Base class of every error a user can fix; printed on one line without a traceback."""

    exit_code: int = 2

    def one_line(self) -> str:
        """The message as a single line (newlines folded to ``; ``)."""
        return "; ".join(part.strip() for part in str(self).splitlines() if part.strip())


class RecipeError(ArtplugError):
    """A recipe (or a ``--set`` override) is invalid.

    Carries every problem found, so the user fixes them all in one pass.
    """

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


class PluginError(ArtplugError):
    """A plugin package is broken: duplicate technique name, malformed class, unknown hook."""


class DataError(ArtplugError):
    """A dataset could not be found or read; the message says where it looked and how to fix it."""


class CheckpointError(ArtplugError):
    """A checkpoint file is missing, unreadable or does not match the recipe."""


class DivergenceError(ArtplugError):
    """Training diverged: a non-finite loss or non-finite weights (exit code 3).

    Raised at the logging cadence (the window read that is already the step's one host sync) and
    at the end of every epoch. ``step`` is the global step at which it was seen, ``terms`` the
    recipe ids of the loss terms whose window average was not finite, ``checkpoint`` the last
    checkpoint whose training was all finite (``None`` when none was written yet).
    """

    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        step: int,
        terms: Sequence[str] = (),
        checkpoint: str | None = None,
    ) -> None:
        self.step = step
        self.terms = list(terms)
        self.checkpoint = checkpoint
        super().__init__(message)


class ResumeError(ArtplugError):
    """``artplug resume`` refused to continue: the run is finished or the checkpoint is old.

    Continuing would overwrite the results of the run folder; ``--fork`` starts a new run.
    """


def did_you_mean(
    name: str, choices: Iterable[str], *, n: int = 2, cutoff: float = 0.6, sentence: bool = False
) -> str:
    """The did-you-mean hint for an unknown ``name``: ``" (did you mean 'a' or 'b'?)"``.

    At most ``n`` of ``choices`` that are close to ``name`` (:func:`difflib.get_close_matches`
    with ``cutoff``); ``""`` when none is. ``sentence=True`` gives ``" Did you mean 'a'?"`` for
    a message made of sentences. The one helper every unknown-name message uses.
    """
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)
    if not close:
        return ""
    names = " or ".join(repr(c) for c in close)
    return f" Did you mean {names}?" if sentence else f" (did you mean {names}?)"
