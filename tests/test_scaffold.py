"""`artplug new-plugin`: the skeleton of every kind passes its own tests.

The fast tests run the generated tests in-process without installing anything: the skeleton's
folder goes on sys.path and its plugin module is registered with ``load_plugins(extra=...)``
(the helper the plugin-loading tests use to inject plugins), and that plugin set is handed to
the generated tests as their ``plugin_set`` fixture. The ``slow`` test really runs
``pip install -e`` and pytest on a skeleton, as a plugin author would.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from artplug.cli import make_cli
from artplug.errors import ArtplugError
from artplug.kinds import KINDS
from artplug.plugins import load_plugins
from artplug.scaffold import Names, new_plugin


def _run_generated_tests(root: Path, names: Names, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Import the skeleton from ``root`` and call each of its test functions; their names."""
    monkeypatch.syspath_prepend(str(root))
    try:
        module = importlib.import_module(names.module)
        plugin_set = load_plugins(disabled=(), extra=[(names.entry_point, module)], strict=True)
        path = root / "tests" / f"test_{names.entry_point}.py"
        spec = importlib.util.spec_from_file_location(f"generated_{names.entry_point}", path)
        assert spec is not None and spec.loader is not None
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)
        ran = []
        for name, function in inspect.getmembers(tests, inspect.isfunction):
            if name.startswith("test_") and function.__module__ == tests.__name__:
                parameters = inspect.signature(function).parameters
                function(**({"plugin_set": plugin_set} if "plugin_set" in parameters else {}))
                ran.append(name)
        return ran
    finally:
        sys.modules.pop(names.module, None)


@pytest.mark.parametrize("kind", KINDS)
def test_skeleton_passes_its_own_tests(kind, tmp_path, monkeypatch):
    names = Names(f"demo-{kind}", kind)
    root = new_plugin(names.technique, kind, tmp_path)
    assert root == tmp_path / f"artplug-demo-{kind}"
    pyproject = (root / "pyproject.toml").read_text()
    assert "[project.entry-points.artplug]\ndemo_" in pyproject
    assert f'demo_{kind} = "artplug_demo_{kind}"' in pyproject
    assert (root / "README.md").read_text().startswith(f"# artplug-demo-{kind}")
    assert (root / "tests" / "conftest.py").exists()
    ran = _run_generated_tests(root, names, monkeypatch)
    assert set(ran) == {
        "test_contract",
        "test_registered",
        "test_formula",
        "test_one_training_step",
    }


def test_cli_writes_a_skeleton_and_refuses_bad_or_taken_names(tmp_path):
    cli = make_cli(load_plugins(disabled=()))
    runner = CliRunner()
    result = runner.invoke(cli, ["new-plugin", "my-loss", "--kind", "loss", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "artplug-my-loss" / "artplug_my_loss" / "__init__.py").exists()
    assert "pip install -e" in result.output
    again = runner.invoke(cli, ["new-plugin", "my-loss", "--kind", "loss", "--dir", str(tmp_path)])
    # make_cli leaves user errors to main(), which prints them on one line.
    assert isinstance(again.exception, ArtplugError) and "exists already" in str(again.exception)
    taken = runner.invoke(cli, ["new-plugin", "pgd", "--kind", "perturbation", "--dir", "x"])
    assert isinstance(taken.exception, ArtplugError)
    assert "taken by plugin 'pgd_at'" in str(taken.exception)
    with pytest.raises(ArtplugError, match="kebab-case"):
        new_plugin("My_Loss", "loss", tmp_path)


@pytest.mark.slow
def test_skeleton_after_pip_install(tmp_path):
    """What a plugin author does: new-plugin, pip install -e, pytest (then uninstall)."""
    root = new_plugin("scaffold-probe", "loss", tmp_path)
    pip = [sys.executable, "-m", "pip"]
    # No build isolation: the venv's setuptools builds it, so no index is needed.
    install = [*pip, "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(root)]
    subprocess.run(install, check=True)
    try:
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root)],
            cwd=root,
            capture_output=True,
            text=True,
        )
        assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
        assert "4 passed" in tests.stdout
    finally:
        subprocess.run([*pip, "uninstall", "-y", "-q", "artplug-scaffold-probe"], check=True)
