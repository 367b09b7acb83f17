"""Docs that cannot drift: every hook, recipe key and built-in technique is documented."""

from __future__ import annotations

import inspect
from pathlib import Path

from artplug import hookspecs
from artplug.kinds import KINDS
from artplug.recipe import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_every_hookspec_is_documented_with_its_signature():
    text = (ROOT / "docs" / "writing-plugins.md").read_text()
    specs = [
        f
        for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("register_")
    ]
    assert len(specs) == 5
    for spec in specs:
        params = ", ".join(inspect.signature(spec).parameters)
        assert f"`{spec.__name__}({params})`" in text, spec.__name__
        assert spec.__doc__ and ":param" in spec.__doc__


def test_every_recipe_key_is_documented():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for section, model in SECTIONS.items():
        assert f"`[{section}]`" in text
        for key in model.model_fields:
            assert f"| `{key}` |" in text, f"[{section}] {key}"


def test_every_builtin_technique_is_in_the_readme(plugin_set):
    text = (ROOT / "README.md").read_text()
    for kind in KINDS:
        for entry in plugin_set.registries.of(kind):
            if plugin_set.plugins[entry.plugin].builtin:
                assert f"`{entry.name}`" in text, entry.name
