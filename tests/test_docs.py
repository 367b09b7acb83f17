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


# The design notes the technique pages replaced were never part of the repository: nothing in
# it may send a reader there. Built from two parts so that this file does not name it itself.
_EXTERNAL_SPEC = "techniques" + ".md"
_SKIP_DIRS = {".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
_TEXT_SUFFIXES = {".py", ".toml", ".md", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".json", ".rst"}


def test_technique_pages_exist_and_are_indexed():
    pages = ROOT / "docs" / "techniques"
    index = (pages / "README.md").read_text()
    for name in (
        "pgd-at", "trades", "alp", "free-at", "fast-at", "hypersphere",
        "moat", "sat", "spat", "aalp", "slat",
    ):  # fmt: skip
        assert (pages / f"{name}.md").is_file(), name
        assert f"({name}.md)" in index, name


def test_no_file_cites_the_external_design_notes():
    offenders = []
    for path in sorted(ROOT.rglob("*")):
        parts = set(path.relative_to(ROOT).parts)
        if parts & _SKIP_DIRS or any(p.endswith(".egg-info") for p in parts):
            continue
        if not path.is_file() or path.suffix not in _TEXT_SUFFIXES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if _EXTERNAL_SPEC in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, "cite docs/techniques/ instead:\n" + "\n".join(offenders)
