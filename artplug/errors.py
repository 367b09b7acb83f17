"""User-fixable errors.

Anything derived from :class:`ArtplugError` is a problem the user can fix (a recipe, a flag, a
path, a plugin package). The CLI prints it as one ``Error: ...`` line and exits with
:attr:`ArtplugError.exit_code`; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


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
