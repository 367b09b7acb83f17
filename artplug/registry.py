"""Name-to-class registries, one per technique kind, with shape checks at registration."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from artplug.errors import PluginError, did_you_mean
from artplug.kinds import KINDS, REQUIRED_METHODS, TRANSFORM_STAGES, Kind

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]*$")


class Register(Protocol):
    """The callable handed to every ``register_*`` hook: ``register(TechniqueClass)``."""

    def __call__(self, cls: type[Any]) -> None: ...


@dataclass(frozen=True)
class Entry:
    """A registered technique class and the plugin that provided it."""

    kind: Kind
    name: str
    cls: type[Any]
    plugin: str

    @property
    def description(self) -> str:
        """The first line of the class docstring."""
        return (inspect.getdoc(self.cls) or "").strip().splitlines()[0]

    @property
    def paper(self) -> str:
        """The class's optional ``paper`` attribute: the publication it implements, or ``""``."""
        paper = getattr(self.cls, "paper", "")
        return paper if isinstance(paper, str) else ""


class Registry:
    """All techniques of one kind, keyed by their ``name``."""

    def __init__(self, kind: Kind) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown technique kind {kind!r}")
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        # Names that two outside plugins both registered: usable by neither, and looking one up
        # explains the collision instead of saying "unknown".
        self._contested: dict[str, str] = {}

    def check(self, cls: type[Any], plugin: str = "<unknown>") -> str:
        """Check the shape of technique class ``cls`` and return its name.

        Raises :class:`PluginError` naming ``plugin``, the class and what is wrong. Does not
        register anything: the plugin loader checks every class first and settles name
        collisions afterwards (see :func:`artplug.plugins.load_plugins`).
        """
        where = f"plugin {plugin!r}"
        if not inspect.isclass(cls):
            raise PluginError(f"{where}: register() takes a {self.kind} class, got {cls!r}")
        label = f"{where}, {self.kind} class {cls.__qualname__}"
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise PluginError(
                f"{label}: 'name' must be a lowercase kebab-case string, got {name!r}"
            )
        params = getattr(cls, "Params", None)
        if not (inspect.isclass(params) and issubclass(params, BaseModel)):
            raise PluginError(f"{label}: needs a nested pydantic model 'Params'")
        if params.model_config.get("extra") != "forbid":
            raise PluginError(
                f"{label}: Params must set model_config = ConfigDict(extra='forbid') so "
                "misspelled recipe keys are errors"
            )
        if not (inspect.getdoc(cls) or "").strip():
            raise PluginError(f"{label}: needs a docstring (its first line is shown by 'list')")
        paper = getattr(cls, "paper", "")
        if not isinstance(paper, str):
            raise PluginError(f"{label}: 'paper' must be a string (the publication), got {paper!r}")
        for method in REQUIRED_METHODS[self.kind]:
            if not callable(getattr(cls, method, None)):
                raise PluginError(f"{label}: missing method {method}()")
        if self.kind == "transform":
            stage = getattr(cls, "stage", None)
            if stage is not None and stage not in TRANSFORM_STAGES:
                raise PluginError(
                    f"{label}: stage {stage!r} is not one of {', '.join(TRANSFORM_STAGES)}"
                )
        if self.kind == "loss":
            needs = getattr(cls, "needs", None)
            # needs may be set per instance (it can depend on Params); a class value must be valid.
            if needs is not None and not set(needs) <= {"clean", "adv"}:
                raise PluginError(f"{label}: needs must be a subset of {{'clean', 'adv'}}")
        return name

    def add(self, cls: type[Any], plugin: str = "<unknown>") -> None:
        """Register ``cls`` after checking its shape; raise PluginError naming what is wrong.

        A name that is already registered (or contested) raises :class:`PluginError` naming both
        plugins. The plugin loader does not rely on this: it settles collisions by the rules of
        :func:`artplug.plugins.load_plugins` before calling ``add``.
        """
        name = self.check(cls, plugin)
        if name in self._contested:
            raise PluginError(self._contested[name])
        previous = self._entries.get(name)
        if previous is not None:
            raise PluginError(
                f"{self.kind} {name!r} is registered by both plugin {previous.plugin!r} and "
                f"plugin {plugin!r}; block one with ARTPLUG_DISABLE_PLUGINS"
            )
        self._entries[name] = Entry(self.kind, name, cls, plugin)

    def contest(self, name: str, message: str) -> None:
        """Mark ``name`` as contested: nobody may use it, and looking it up gives ``message``.

        ``message`` says which plugins collide and how to resolve it (see
        :class:`artplug.plugins.NameCollision`).
        """
        self._entries.pop(name, None)
        self._contested[name] = message

    def contested(self) -> dict[str, str]:
        """Contested name -> the message that explains the collision, sorted by name."""
        return dict(sorted(self._contested.items()))

    def get(self, name: str) -> Entry:
        """The entry called ``name``; KeyError with a did-you-mean message otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """'no <kind> named X. Did you mean Y? Installed: ...' for an unknown name.

        For a contested name, the message of the collision instead (which plugins registered it
        and how to resolve it).
        """
        if name in self._contested:
            return self._contested[name]
        hint = did_you_mean(name, self._entries, n=3, cutoff=0.5, sentence=True)
        installed = ", ".join(sorted(self._entries)) or "(none)"
        return f"no {self.kind} named {name!r}.{hint} Installed: {installed}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)


@dataclass
class Registries:
    """The four registries of a process, filled by the plugin manager."""

    perturbation: Registry
    loss: Registry
    transform: Registry
    schedule: Registry

    @classmethod
    def empty(cls) -> Registries:
        """Four empty registries."""
        return cls(*(Registry(kind) for kind in KINDS))

    def of(self, kind: Kind) -> Registry:
        """The registry of ``kind``."""
        registry: Registry = getattr(self, kind)
        return registry
