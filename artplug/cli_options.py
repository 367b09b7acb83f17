"""What a command plugin needs from the ``artplug`` command line, as a public API.

The core commands (:mod:`artplug.cli`) and command plugins (the ``register_commands`` hook,
e.g. the built-in ``artplug_plugins.lab_commands`` behind ``compare``, ``sweep`` and
``rerun``) share these, so that an option reads the same in every command:

- option decorators: :func:`set_option` (``--set KEY=VALUE``), :func:`quiet_option`
  (``--quiet``), :func:`max_steps_option` (``--max-steps N``), :func:`threads_option`
  (``--threads N``), and :func:`with_threads`, which turns ``--threads`` into an override;
- :func:`run_tracking_options` (``--tracking-uri``, ``--parent-run``, ``--tag``) of
  ``artplug run``, with :func:`parse_tags`: how a sweep (or a cluster job) nests a run under
  a parent run and tags it;
- :func:`plugin_set`: the :class:`~artplug.plugins.PluginSet` the CLI was built with, from a
  click context;
- :func:`load`: a recipe file with ``--set`` overrides, resolved against those plugins.

Only click and light artplug modules are imported here: command plugins import this module
when ``artplug --help`` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from artplug.errors import ArtplugError
from artplug.plugins import PluginSet

__all__ = [
    "PluginSet",
    "load",
    "max_steps_option",
    "parse_tags",
    "plugin_set",
    "quiet_option",
    "run_tracking_options",
    "set_option",
    "threads_option",
    "with_threads",
]

F = TypeVar("F", bound=Callable[..., Any])


def set_option() -> Callable[[F], F]:
    """``--set KEY=VALUE`` (repeatable), passed to the command as ``overrides``."""
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a recipe value (TOML syntax), e.g. --set optim.lr=0.05 --set loss.0.beta=3.",
    )


def quiet_option() -> Callable[[F], F]:
    """``--quiet`` / ``-q``: no progress display; warnings, errors and results still print."""
    return click.option(
        "--quiet",
        "-q",
        is_flag=True,
        help="No progress display; warnings, errors, the results and the resume hint still print.",
    )


def max_steps_option(help_text: str = "Stop after N steps (smoke test).") -> Callable[[F], F]:
    """``--max-steps N`` (N >= 1, default None), with ``help_text`` as its help."""
    return click.option("--max-steps", type=click.IntRange(min=1), default=None, help=help_text)


def threads_option() -> Callable[[F], F]:
    """``--threads N``: CPU threads of torch; turn it into an override with :func:`with_threads`."""
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="CPU threads torch may use (as --set run.threads=N); on a shared machine "
        "--threads 1 is often much faster than torch's default of one per core.",
    )


def with_threads(overrides: Sequence[str], threads: int | None) -> list[str]:
    """``overrides`` plus ``run.threads=N`` for ``--threads N`` (last, so that it wins)."""
    return [*overrides, *([f"run.threads={threads}"] if threads is not None else [])]


def run_tracking_options() -> Callable[[F], F]:
    """``--tracking-uri URI``, ``--parent-run ID`` and ``--tag KEY=VALUE`` (repeatable).

    Passed to the command as ``tracking_uri``, ``parent_run`` and ``tags``; ``artplug sweep
    --jobs N`` starts its children with them (docs/sweeps.md).
    """

    def decorate(function: F) -> F:
        function = click.option(
            "--tag",
            "tags",
            multiple=True,
            metavar="KEY=VALUE",
            help="Set a tag on the new MLflow run (repeat for several).",
        )(function)
        function = click.option(
            "--parent-run",
            default=None,
            metavar="ID",
            help="Record the run as a nested child of this MLflow run (as a sweep's children "
            "are); a child that fails before training is still recorded, as FAILED.",
        )(function)
        return click.option(
            "--tracking-uri",
            default=None,
            metavar="URI",
            help="MLflow tracking URI of the run (default: the recipe's [tracking] uri, else "
            "MLFLOW_TRACKING_URI).",
        )(function)

    return decorate


def parse_tags(specs: Sequence[str]) -> dict[str, str]:
    """``--tag KEY=VALUE`` options as a dict; a spec without ``=`` or a key is a user error."""
    tags: dict[str, str] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise ArtplugError(f"--tag {spec!r}: expected KEY=VALUE, e.g. --tag team=vision")
        tags[key.strip()] = value
    return tags


def plugin_set(ctx: click.Context) -> PluginSet:
    """The plugins the ``artplug`` group was built with (the root context's ``obj``)."""
    found: PluginSet = ctx.find_root().obj
    return found


def load(plugins: PluginSet, recipe: str, overrides: Sequence[str]) -> Any:
    """The recipe file ``recipe`` with ``overrides``, resolved against ``plugins``.

    Returns a :class:`~artplug.recipe.ResolvedRecipe`; raises
    :class:`~artplug.errors.RecipeError` listing every problem (a one-line ``Error:`` and exit
    code 2 on the command line).
    """
    # Imported here: the recipe module pulls in pydantic, the evaluation table and the models.
    from artplug.recipe import load_recipe

    return load_recipe(recipe, plugins.registries, overrides, failure_hint=plugins.failure_hint())
