"""Plugin discovery: one pluggy manager per process, four registries filled from it.

Loading sequence (see DESIGN §2):

1. ``PluginManager("artplug")`` with the hookspecs of :mod:`artplug.hookspecs`.
2. Names in ``ARTPLUG_DISABLE_PLUGINS`` (comma-separated entry-point names, built-ins included)
   are blocked.
3. Every entry point of the group ``artplug`` is loaded: artplug's own built-in techniques come
   through this same path. A plugin that fails to import is recorded in
   :attr:`PluginSet.failures` and reported on one line; it never breaks the CLI.
4. Extra plugin objects (tests, ``--plugins-dir``) are registered the same way.
5. ``pm.check_pending()`` turns a misspelled hook name into an error.
6. Each ``register_*`` hook implementation is called once with a ``register`` bound to its plugin
   name, so a duplicate technique name is reported with both plugins.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from artplug import hookspecs
from artplug.errors import PluginError
from artplug.kinds import KINDS, Kind
from artplug.registry import Registries

ENTRY_POINT_GROUP = "artplug"
DISABLE_ENV = "ARTPLUG_DISABLE_PLUGINS"
BUILTIN_DISTRIBUTION = "artplug"

HOOK_OF_KIND: dict[Kind, str] = {
    "perturbation": "register_perturbations",
    "loss": "register_loss_terms",
    "transform": "register_model_transforms",
    "schedule": "register_schedules",
}


@dataclass(frozen=True)
class PluginInfo:
    """A registered plugin: its name, the distribution that ships it and that one's version."""

    name: str
    distribution: str | None
    version: str | None

    @property
    def builtin(self) -> bool:
        """Whether artplug itself ships this plugin."""
        return self.distribution == BUILTIN_DISTRIBUTION


@dataclass(frozen=True)
class LoadFailure:
    """An entry point that could not be imported or registered."""

    name: str
    distribution: str | None
    error: str

    def one_line(self) -> str:
        """``plugin 'x' (dist y) failed to load: ImportError: ...`` on one line."""
        dist = f" (from {self.distribution})" if self.distribution else ""
        return f"plugin {self.name!r}{dist} failed to load: {self.error}"


@dataclass
class PluginSet:
    """The result of loading plugins: the manager, the registries and what went wrong."""

    pm: pluggy.PluginManager
    registries: Registries
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)
    blocked: frozenset[str] = frozenset()

    def versions(self) -> dict[str, str]:
        """Plugin name -> distribution version, for run provenance tags."""
        return {name: info.version or "unknown" for name, info in sorted(self.plugins.items())}

    def failure_hint(self) -> str:
        """A sentence naming failed plugins, appended to 'unknown technique' errors."""
        if not self.failures:
            return ""
        return " (note: " + "; ".join(f.one_line() for f in self.failures) + ")"


def disabled_from_env() -> frozenset[str]:
    """Plugin names listed in ``ARTPLUG_DISABLE_PLUGINS``."""
    raw = os.environ.get(DISABLE_ENV, "")
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_plugins_dir(directory: Path) -> list[tuple[str, ModuleType]]:
    """Import every ``*.py`` file in ``directory`` as plugin ``file:<stem>``."""
    if not directory.is_dir():
        raise PluginError(f"--plugins-dir {directory}: not a directory")
    loaded = []
    for path in sorted(directory.glob("*.py")):
        module_name = f"artplug_dir_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"{path}: cannot be imported as a plugin module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        loaded.append((f"file:{path.stem}", module))
    return loaded


def _register(
    pm: pluggy.PluginManager,
    plugin: object,
    name: str,
    dist: str | None,
    result: PluginSet,
    strict: bool,
) -> bool:
    # pluggy validates implementations of known hooks at registration (argument names).
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        if strict:
            raise PluginError(f"plugin {name!r}: {exc}") from exc
        result.failures.append(LoadFailure(name, dist, str(exc)))
        return False
    return True


def load_plugins(
    *,
    entry_points: bool = True,
    extra: Sequence[tuple[str, object]] = (),
    plugins_dir: Path | None = None,
    disabled: Iterable[str] | None = None,
    strict: bool = False,
) -> PluginSet:
    """Build a fresh plugin manager and fill the four registries.

    :param entry_points: load the ``artplug`` entry-point group (built-ins included).
    :param extra: further ``(name, plugin object)`` pairs to register (tests, embedding apps).
    :param plugins_dir: a folder whose ``*.py`` files are registered as ``file:<stem>``.
    :param disabled: plugin names to block; defaults to ``ARTPLUG_DISABLE_PLUGINS``.
    :param strict: raise :class:`PluginError` at the first broken plugin instead of recording it.

    A plugin that fails to import, implements an unknown hook, or registers a malformed or
    duplicate technique is recorded in ``failures`` (one line each) and the rest stay usable,
    so the CLI never breaks because of one bad package.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    blocked = frozenset(disabled_from_env() if disabled is None else disabled)
    for name in blocked:
        pm.set_blocked(name)
    result = PluginSet(pm=pm, registries=Registries.empty(), blocked=blocked)

    if entry_points:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if pm.is_blocked(ep.name):
                continue
            if pm.get_plugin(ep.name) is not None:
                continue  # the same distribution found twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not break the CLI
                result.failures.append(LoadFailure(ep.name, dist, _error_text(exc)))
                continue
            if _register(pm, plugin, ep.name, dist, result, strict):
                result.plugins[ep.name] = PluginInfo(ep.name, dist, version)

    pairs: list[tuple[str, object]] = list(extra)
    if plugins_dir is not None:
        pairs.extend(load_plugins_dir(plugins_dir))
    for name, plugin in pairs:
        if pm.is_blocked(name):
            continue
        if _register(pm, plugin, name, None, result, strict):
            result.plugins[name] = PluginInfo(name, None, None)

    # A misspelled hook name must not pass silently: the offending plugin is unregistered and
    # reported (or raised, when strict), the others stay usable.
    while True:
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or str(exc.plugin)
            error = PluginError(f"plugin {name!r}: {exc}")
            if strict:
                raise error from exc
            pm.unregister(exc.plugin)
            info = result.plugins.pop(name, None)
            result.failures.append(LoadFailure(name, info.distribution if info else None, str(exc)))

    for kind in KINDS:
        caller = getattr(pm.hook, HOOK_OF_KIND[kind])
        # Call implementations one by one (instead of pm.hook.x(...)) so every registration is
        # attributed to its plugin; duplicate names are then reported with both plugin names.
        for impl in caller.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(cls: type[Any], _plugin: str = plugin_name, _kind: Kind = kind) -> None:
                result.registries.of(_kind).add(cls, plugin=_plugin)

            try:
                impl.function(register=register)
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, PluginError)
                    else PluginError(
                        f"plugin {plugin_name!r}: {HOOK_OF_KIND[kind]} raised {_error_text(exc)}"
                    )
                )
                if strict:
                    raise error from exc
                info = result.plugins.get(plugin_name)
                result.failures.append(
                    LoadFailure(plugin_name, info.distribution if info else None, str(error))
                )
    return result


def report_failures(plugin_set: PluginSet, stream: Any = None) -> None:
    """Print one warning line per plugin that failed to load."""
    out = stream if stream is not None else sys.stderr
    for failure in plugin_set.failures:
        print(f"Warning: {failure.one_line()}", file=out)
