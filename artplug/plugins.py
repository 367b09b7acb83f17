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
   name; ``register`` checks the class and records a *claim* on its name.
7. Names are settled after every plugin has made its claims, so the result never depends on the
   load order (entry points load alphabetically, which would otherwise let an outside package
   that sorts first take over a built-in name):

   - a name claimed once is registered;
   - a name claimed by artplug's built-in plugin and by outside ones goes to the built-in; the
     outside claims are dropped (their other techniques stay) and recorded as a
     :class:`NameCollision`;
   - a name claimed by two or more outside plugins goes to none of them: the registry marks it
     contested, so a recipe that uses it gets an error naming both distributions.

   Every collision is one warning line (:meth:`PluginSet.warnings`); the built-in is never the
   plugin reported as failed.
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
from artplug.registry import Registries, Registry

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

    def origin(self) -> str:
        """Who ships it, for messages: ``artplug-x 1.2.3 (plugin 'x')``, ``plugin 'file:y'``."""
        if self.builtin:
            return f"built-in plugin {self.name!r}"
        if self.distribution is None:
            return f"plugin {self.name!r}"
        version = f" {self.version}" if self.version else ""
        return f"{self.distribution}{version} (plugin {self.name!r})"

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``artplug plugins --json``."""
        return {
            "plugin": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
        }


def _join(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class NameCollision:
    """Two or more plugins registered a technique of the same kind under the same name.

    ``winner`` is the built-in plugin that keeps the name, or None when the name is contested
    between outside plugins and nobody gets it; ``ignored`` are the plugins whose technique of
    that name was not registered (their other techniques are).
    """

    kind: Kind
    name: str
    winner: PluginInfo | None
    ignored: tuple[PluginInfo, ...]

    @property
    def contested(self) -> bool:
        """Whether nobody got the name (no built-in among the claimants)."""
        return self.winner is None

    def one_line(self) -> str:
        """What happened to the name and how to resolve it, on one line."""
        label = f"{self.kind} {self.name!r}"
        if self.winner is not None:
            losers = _join([info.origin() for info in self.ignored])
            return (
                f"{label} from {losers} is not registered: built-in techniques keep their "
                f"names ({self.winner.origin()} provides it); the outside one needs a new name"
            )
        who = "distributions" if all(i.distribution for i in self.ignored) else "plugins"
        nobody = "neither" if len(self.ignored) == 2 else "none of them"
        return (
            f"{label} is contested by {who} {_join([i.origin() for i in self.ignored])}, so "
            f"{nobody} may use it; uninstall one, or block one with {DISABLE_ENV} "
            f"(e.g. {DISABLE_ENV}={self.ignored[0].name})"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``artplug plugins --json``."""
        return {
            "kind": self.kind,
            "name": self.name,
            "winner": self.winner.as_dict() if self.winner is not None else None,
            "ignored": [info.as_dict() for info in self.ignored],
            "message": self.one_line(),
        }


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
    collisions: list[NameCollision] = field(default_factory=list)

    def versions(self) -> dict[str, str]:
        """Plugin name -> distribution version, for run provenance tags."""
        return {name: info.version or "unknown" for name, info in sorted(self.plugins.items())}

    def warnings(self) -> list[str]:
        """Every load problem as one line, each once: failed plugins, then name collisions.

        The one place the CLI takes its start-up warnings from (printed once per command by
        :func:`report_warnings`).
        """
        lines = [f.one_line() for f in self.failures]
        lines += [c.one_line() for c in self.collisions]
        return list(dict.fromkeys(lines))

    def failure_hint(self) -> str:
        """A note naming failed plugins, appended to 'unknown technique' errors.

        Only the plugin names: the full reason is in :meth:`warnings` (printed once at start-up),
        and this note is repeated for every unknown name of a recipe.
        """
        if not self.failures:
            return ""
        names = _join(list(dict.fromkeys(repr(f.name) for f in self.failures)))
        return f" (note: plugin {names} failed to load; 'artplug plugins' shows why)"


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
        registry = result.registries.of(kind)
        # name -> {plugin name: class}: every claim first, settled after all plugins have spoken,
        # so which plugin gets a name never depends on the order the plugins were loaded in.
        claims: dict[str, dict[str, type[Any]]] = {}
        caller = getattr(pm.hook, HOOK_OF_KIND[kind])
        # Call implementations one by one (instead of pm.hook.x(...)) so every registration is
        # attributed to its plugin.
        for impl in caller.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(
                cls: type[Any],
                _plugin: str = plugin_name,
                _kind: Kind = kind,
                _registry: Registry = registry,
                _claims: dict[str, dict[str, type[Any]]] = claims,
            ) -> None:
                name = _registry.check(cls, plugin=_plugin)
                by_plugin = _claims.setdefault(name, {})
                if _plugin in by_plugin:
                    raise PluginError(f"plugin {_plugin!r} registers {_kind} {name!r} twice")
                by_plugin[_plugin] = cls

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
        _settle(kind, claims, result, strict)
    global _active_registries
    _active_registries = result.registries
    return result


# The registries of the most recently loaded plugin set: the one the running command resolves
# recipes against. Only :func:`technique` reads it, for techniques that delegate to another
# technique by name (moat's SPAT stage) without importing that plugin's module.
_active_registries: Registries | None = None


def technique(kind: Kind, name: str) -> type[Any]:
    """The technique class registered as ``name`` in ``kind``, from the loaded plugins.

    For a technique that delegates part of its work to another registered technique (moat runs
    the ``spat`` perturbation as its multi-step stage): it looks the class up by name, the way
    a recipe does, instead of importing the other plugin's module, so disabling that plugin
    really removes it. Raises ``KeyError`` with the registry's did-you-mean message when the
    name is not registered. When nothing has loaded plugins yet (a technique built directly in
    a notebook or a test), the installed plugins are loaded once, as a command would.
    """
    registries = _active_registries
    if registries is None:
        registries = load_plugins().registries
    registry = registries.of(kind)
    if name not in registry:
        raise KeyError(registry.unknown_message(name))
    return registry.get(name).cls


def _settle(
    kind: Kind, claims: dict[str, dict[str, type[Any]]], result: PluginSet, strict: bool
) -> None:
    """Register each claimed name of ``kind`` by the collision rules (module docstring, step 7)."""
    registry = result.registries.of(kind)
    for name in sorted(claims):
        by_plugin = claims[name]
        if len(by_plugin) == 1:
            ((plugin, cls),) = by_plugin.items()
            registry.add(cls, plugin=plugin)
            continue
        infos = {p: result.plugins.get(p) or PluginInfo(p, None, None) for p in sorted(by_plugin)}
        builtins = [p for p, info in infos.items() if info.builtin]
        # Exactly one built-in claimant keeps the name. Two built-ins colliding would be a bug
        # in artplug itself: treat it like outside plugins colliding (nobody gets the name).
        winner = builtins[0] if len(builtins) == 1 else None
        collision = NameCollision(
            kind,
            name,
            infos[winner] if winner is not None else None,
            tuple(info for p, info in infos.items() if p != winner),
        )
        if strict:
            raise PluginError(collision.one_line())
        result.collisions.append(collision)
        if winner is not None:
            registry.add(by_plugin[winner], plugin=winner)
        else:
            registry.contest(name, collision.one_line())


def report_warnings(plugin_set: PluginSet, stream: Any = None) -> None:
    """Print :meth:`PluginSet.warnings`, one ``Warning: ...`` line each (stderr by default).

    ``artplug``'s ``main()`` calls it once per command, right after :func:`load_plugins`: the
    one place load problems are printed, so each appears once.
    """
    out = stream if stream is not None else sys.stderr
    for line in plugin_set.warnings():
        print(f"Warning: {line}", file=out)
