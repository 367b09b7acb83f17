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


# A command plugin (one that implements register_commands, e.g. lab_commands) may also use
# the CLI's public option module and the back end the core commands use. Only cli_options and
# lab at module level: they are cheap, and command plugins are imported for `artplug --help`.
COMMAND_API_TOP = {"artplug.cli_options", "artplug.lab"}
COMMAND_API_LAZY = {"artplug.workflows", "artplug.tracking", "artplug.interrupt"}


def _is_command_plugin(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(
        isinstance(node, ast.FunctionDef) and node.name == "register_commands" for node in tree.body
    )


def test_plugins_import_only_the_public_root():
    for path in PLUGINS:
        found = {n for n in imports(path, False) if n.startswith("artplug.")}
        if _is_command_plugin(path):
            top = {n for n in imports(path, True) if n.startswith("artplug.")}
            assert top <= COMMAND_API_TOP, f"{path.name} imports {top - COMMAND_API_TOP} early"
            found -= COMMAND_API_TOP | COMMAND_API_LAZY
        assert not found, f"{path.name} imports {found}; use `import artplug`"


def test_the_lab_commands_plugin_is_checked_as_a_command_plugin():
    assert _is_command_plugin(ROOT / "plugins" / "lab_commands.py")
    assert not any(_is_command_plugin(p) for p in PLUGINS if p.name != "lab_commands.py")


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
        "commands = [['--help'], ['validate', sys.argv[1]], ['list'], ['list', 'pgd']]\n"
        "commands.append(['schema'])\n"
        "for args in commands:\n"
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


def test_distributed_sits_below_the_engine_and_evaluation():
    """artplug.distributed (process group, sharding, launcher) is used by engine, evaluate,
    sanity, workflows and cli, and itself needs only the error classes and the stop request:
    so any layer may call it without an import cycle, and it never imports mlflow or ART."""
    found = _core_imports("distributed.py")
    allowed = {
        "artplug.errors",
        "artplug.errors.ArtplugError",
        "artplug.interrupt",
        "artplug.interrupt.StopRequest",
        "artplug.interrupt.HANDLED_SIGNALS",
    }
    assert found <= allowed, found
    top = imports(ROOT / "artplug" / "distributed.py", True)
    assert not {n for n in top if n.split(".")[0] in ("mlflow", "art", "click")}, top
