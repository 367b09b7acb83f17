"""The import rules of DESIGN §9, checked on the source (module-level imports)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted((ROOT / "artplug").glob("*.py"))
PLUGINS = sorted((ROOT / "plugins").glob("*.py"))


def imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_never_imports_builtin_plugins():
    for path in CORE:
        assert not any(n.startswith("artplug_plugins") for n in imports(path, False)), path.name


def test_plugins_import_only_the_public_root():
    for path in PLUGINS:
        bad = {n for n in imports(path, False) if n.startswith("artplug.")}
        assert not bad, f"{path.name} imports {bad}; use `import artplug`"


# tracking.py logs runs; lab.py reads them back (compare, sweep, rerun). Both import mlflow only
# inside functions (checked by test_help_and_validate_import_neither_art_nor_mlflow).
MLFLOW_MODULES = {"tracking.py", "lab.py"}


def test_only_tracking_and_lab_import_mlflow_and_engine_not_cli():
    for path in CORE:
        found = imports(path, False)
        if path.name not in MLFLOW_MODULES:
            assert not any(n.split(".")[0] == "mlflow" for n in found), path.name
        else:
            top = imports(path, True)
            assert not any(n.split(".")[0] == "mlflow" for n in top), path.name
    assert "artplug.cli" not in imports(ROOT / "artplug" / "engine.py", False)


def test_art_is_imported_lazily():
    for path in CORE:
        assert not any(n.split(".")[0] == "art" for n in imports(path, True)), path.name


def test_help_and_validate_import_neither_art_nor_mlflow():
    recipe = ROOT / "recipes" / "quickstart.toml"
    code = (
        "import sys\n"
        "from artplug.cli import main\n"
        "for args in (['--help'], ['validate', sys.argv[1]], ['list'], ['schema']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, (args, exc.code)\n"
        "heavy = sorted(m for m in ('art', 'mlflow') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _core_imports(name: str) -> set[str]:
    """Every artplug module ``artplug/<name>`` imports, ``from artplug import x`` as artplug.x."""
    tree = ast.parse((ROOT / "artplug" / name).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in found if n.startswith("artplug.")}


def test_workflow_layer_boundaries():
    """DESIGN §10: cli -> workflows -> engine / evaluate / tracking -> kinds / registry."""
    for name in ("engine.py", "costs.py", "selection.py", "evaluate.py", "tracking.py"):
        found = _core_imports(name)
        assert "artplug.workflows" not in found, f"{name} imports the workflow layer"
        assert "artplug.cli" not in found, f"{name} imports the CLI"
    assert "artplug.cli" not in _core_imports("workflows.py")
    # Cost accounting is below the loop: it knows nothing of selection or the engine.
    assert not {"artplug.engine", "artplug.selection"} & _core_imports("costs.py")
    # The CLI parses options; training and evaluation go through the workflow layer.
    assert not {"artplug.engine", "artplug.costs", "artplug.selection"} & _core_imports("cli.py")
