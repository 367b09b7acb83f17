"""The five pluggy hook specifications of artplug.

Every hook is a *registration* hook: it is called once per process, lets a plugin offer
technique classes (or CLI commands), and is never called during training. Shared rules:

- **Called** exactly once per process, after every plugin is loaded; the four technique hooks
  run before any recipe is resolved, ``register_commands`` when the CLI is built.
- **Result**: collect-all; none is ``firstresult``, historic or a wrapper; return values are
  ignored.
- **Order** is irrelevant: registries are keyed by technique name, and names are settled after
  every plugin has registered: a built-in technique keeps its name against outside plugins, a
  name two outside plugins both register is usable by neither, and each collision is one
  warning naming the distributions (see :func:`artplug.plugins.load_plugins`). Do not use
  ``tryfirst`` or ``trylast``.
- **Arguments** have no default value in implementations (pluggy does not pass arguments that
  have defaults).
- **Side effects**: none beyond registering: no CUDA initialisation, no downloads, no file I/O.
  These hooks run for every CLI invocation, ``--help`` included.

Evolving the hooks: arguments may be added, never renamed or removed; every change gets a
"Hooks" line in the CHANGELOG.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from artplug.registry import Register

hookspec = pluggy.HookspecMarker("artplug")


@hookspec
def register_perturbations(register: Register) -> None:
    """Offer perturbation-generator classes, selected by ``[perturbation] use = "<name>"``.

    :param register: call it once per class, ``register(MyPerturbation)``, passing the class,
        not an instance. The class must satisfy :class:`artplug.Perturbation`: a kebab-case
        ``name``, a nested pydantic ``Params`` model with ``extra="forbid"``, a class docstring
        whose first line describes it, and a ``generate(model, x, y, state)`` method.

    Called once per process, after every plugin is loaded and before any recipe is resolved.
    Collect-all; the return value is ignored. A name another plugin also registers is settled
    by the collision rules of the module docstring (a built-in wins; two outside plugins both
    lose it); a malformed class, or one name registered twice by the same plugin, raises
    :class:`~artplug.errors.PluginError` naming the plugin, the class and what is wrong.
    """


@hookspec
def register_loss_terms(register: Register) -> None:
    """Offer loss-term classes, selected by ``[[loss]] use = "<name>"``.

    :param register: call it once per class, ``register(MyTerm)``, passing the class. The class
        must satisfy :class:`artplug.LossTerm`: ``name``, ``Params``, a docstring, ``needs``
        (a subset of ``{"clean", "adv"}``) and ``__call__(out, state) -> Tensor``.

    Called once per process, after every plugin is loaded and before any recipe is resolved.
    Collect-all; the return value is ignored. Duplicate names and malformed classes raise
    :class:`~artplug.errors.PluginError`.
    """


@hookspec
def register_model_transforms(register: Register) -> None:
    """Offer model-transform classes, selected by ``[[transform]] use = "<name>"``.

    :param register: call it once per class, ``register(MyTransform)``, passing the class. The
        class must satisfy :class:`artplug.ModelTransform`: ``name``, ``Params``, a docstring and
        ``apply(model) -> nn.Module``.

    Called once per process, after every plugin is loaded and before any recipe is resolved.
    Collect-all; the return value is ignored. Duplicate names and malformed classes raise
    :class:`~artplug.errors.PluginError`.
    """


@hookspec
def register_schedules(register: Register) -> None:
    """Offer training-schedule classes, selected by ``[[schedule]] use = "<name>"``.

    :param register: call it once per class, ``register(MySchedule)``, passing the class. The
        class must satisfy :class:`artplug.Schedule`: ``name``, ``Params``, a docstring,
        ``knobs()`` and a pure ``values(progress)``.

    Called once per process, after every plugin is loaded and before any recipe is resolved.
    Collect-all; the return value is ignored. Duplicate names and malformed classes raise
    :class:`~artplug.errors.PluginError`.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``artplug`` command line.

    :param cli: the top-level :class:`click.Group`; use ``@cli.command()`` or
        ``cli.add_command(cmd)``. Adding a command whose name is already taken raises
        :class:`~artplug.errors.PluginError` instead of silently replacing it.

    Called once per process when the CLI is built, after the technique hooks. Collect-all; the
    return value is ignored. Import heavy packages (torch, ART, MLflow) inside the command body,
    not at module level, so ``artplug --help`` stays fast.
    """
