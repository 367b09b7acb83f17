"""Technique names: a built-in always keeps its name, two outside plugins that collide both lose.

Outside plugins are real (fake) distributions on ``sys.path``, found through
``importlib.metadata`` exactly as an installed package would be (see ``make_distribution``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from clitools import run_main
from test_plugin_loading import make_distribution

from artplug.cli import make_cli
from artplug.errors import PluginError, RecipeError
from artplug.plugins import load_plugins
from artplug.recipe import load_recipe, resolve
from artplug.testing import digits_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"


def _loss_module(technique: str, cls: str, extra: str = "") -> str:
    """Source of a plugin module registering loss ``technique`` (and ``extra``, if given)."""
    classes = [(technique, cls)] + ([(extra, cls + "Extra")] if extra else [])
    body = [
        "import torch.nn.functional as F",
        "from pydantic import BaseModel, ConfigDict",
        "import artplug",
        "",
    ]
    for name, class_name in classes:
        body += [
            f"class {class_name}:",
            f'    """{class_name}: an outside loss called {name}."""',
            f'    name = "{name}"',
            '    needs = frozenset({"adv"})',
            "    class Params(BaseModel):",
            '        model_config = ConfigDict(extra="forbid", frozen=True)',
            "    def __init__(self, params):",
            "        self.params = params",
            "    def __call__(self, out, state):",
            "        return F.cross_entropy(out.logits_adv, out.y)",
            "",
        ]
    body += ["@artplug.hookimpl", "def register_loss_terms(register):"]
    body += [f"    register({class_name})" for _, class_name in classes]
    return "\n".join(body) + "\n"


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on ``sys.path`` for fake distributions; their modules are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ARTPLUG_DISABLE_PLUGINS", raising=False)
    before = set(sys.modules)
    yield tmp_path
    for module in set(sys.modules) - before:
        if module.startswith("artplug_fake_"):
            sys.modules.pop(module, None)


@pytest.fixture
def impostor(outside: Path) -> Path:
    """``artplug-impostor 1.2.3``: entry point ``ce_impostor`` (sorts before the built-in
    ``pgd_at``) registering a loss ``cross-entropy`` and a loss ``impostor-extra``."""
    source = _loss_module("cross-entropy", "Impostor", extra="impostor-extra")
    make_distribution(
        outside, "artplug-impostor", "artplug_fake_impostor", source, hook="ce_impostor"
    )
    return outside


@pytest.fixture
def rivals(outside: Path) -> Path:
    """Two outside distributions, ``artplug-alpha`` and ``artplug-beta``, both registering
    ``my-loss``; alpha also registers ``alpha-only``."""
    alpha = _loss_module("my-loss", "AlphaLoss", extra="alpha-only")
    make_distribution(outside, "artplug-alpha", "artplug_fake_alpha", alpha, hook="alpha")
    beta = _loss_module("my-loss", "BetaLoss")
    make_distribution(outside, "artplug-beta", "artplug_fake_beta", beta, hook="beta")
    return outside


# (a) an outside plugin cannot take over a built-in name, whatever the load order


def test_builtin_wins_over_an_outside_plugin_that_loads_first(impostor):
    plugins = load_plugins(disabled=())
    entry = plugins.registries.loss.get("cross-entropy")
    assert entry.plugin == "pgd_at"
    assert entry.cls.__module__ == "artplug_plugins.pgd_at"
    assert entry.cls.__name__ == "CrossEntropy"
    # The outside plugin's other technique is still registered; only the conflict is dropped.
    assert plugins.registries.loss.get("impostor-extra").plugin == "ce_impostor"
    # The built-in is never the one reported as failed.
    assert not plugins.failures
    (line,) = plugins.warnings()
    assert "loss 'cross-entropy'" in line and "artplug-impostor 1.2.3" in line
    assert "\n" not in line


def test_quickstart_resolves_to_the_builtin_cross_entropy(impostor):
    plugins = load_plugins(disabled=())
    recipe = load_recipe(QUICKSTART, plugins.registries)
    (loss,) = recipe.losses
    cls = plugins.registries.loss.get(loss.use).cls
    assert cls.__module__ == "artplug_plugins.pgd_at"


def test_strict_loading_raises_on_a_shadowing_plugin(impostor):
    with pytest.raises(PluginError, match=r"cross-entropy.*artplug-impostor"):
        load_plugins(disabled=(), strict=True)


def test_blocking_the_builtin_lets_the_outside_technique_in(impostor):
    plugins = load_plugins(disabled=("pgd_at",))
    assert plugins.registries.loss.get("cross-entropy").plugin == "ce_impostor"
    assert not plugins.collisions and not plugins.warnings()


# (b) two outside plugins that register the same name both lose it


def test_two_outside_plugins_with_one_name_both_lose_it(rivals):
    plugins = load_plugins(disabled=())
    assert "my-loss" not in plugins.registries.loss
    assert plugins.registries.loss.get("alpha-only").plugin == "alpha"  # the rest stays usable
    assert not plugins.failures
    (line,) = plugins.warnings()
    assert "loss 'my-loss'" in line
    assert "artplug-alpha 1.2.3" in line and "artplug-beta 1.2.3" in line
    with pytest.raises(KeyError, match="contested"):
        plugins.registries.loss.get("my-loss")

    with pytest.raises(RecipeError) as caught:
        resolve(digits_recipe(loss=[{"use": "my-loss"}]), plugins.registries)
    message = caught.value.one_line()
    assert "artplug-alpha" in message and "artplug-beta" in message
    assert "ARTPLUG_DISABLE_PLUGINS" in message and "uninstall" in message


def test_blocking_one_rival_settles_the_name(rivals):
    plugins = load_plugins(disabled=("alpha",))
    assert plugins.registries.loss.get("my-loss").plugin == "beta"
    assert not plugins.warnings()


def test_strict_loading_raises_on_a_contested_name(rivals):
    with pytest.raises(PluginError, match=r"my-loss.*artplug-alpha.*artplug-beta"):
        load_plugins(disabled=(), strict=True)


# (c) `artplug plugins` (and `artplug list`) show the collision


def test_plugins_command_lists_collisions(impostor, rivals):
    plugins = load_plugins(disabled=())
    runner = CliRunner()
    text = runner.invoke(make_cli(plugins), ["plugins"])
    assert text.exit_code == 0, text.output
    section = text.output.split("Name collisions:", 1)[1]
    assert "loss 'cross-entropy'" in section and "artplug-impostor 1.2.3" in section
    assert "loss 'my-loss'" in section and "artplug-alpha" in section and "artplug-beta" in section
    # The built-in still lists its technique; the impostor lists only what it really registered.
    assert "pgd_at (built-in" in text.output
    impostor_line = next(ln for ln in text.output.splitlines() if ln.startswith("ce_impostor "))
    assert "impostor-extra" in impostor_line and "cross-entropy" not in impostor_line

    data = json.loads(runner.invoke(make_cli(plugins), ["plugins", "--json"]).output)
    by_name = {c["name"]: c for c in data["collisions"]}
    assert by_name["cross-entropy"]["kind"] == "loss"
    assert by_name["cross-entropy"]["winner"]["plugin"] == "pgd_at"
    assert [c["distribution"] for c in by_name["cross-entropy"]["ignored"]] == ["artplug-impostor"]
    assert by_name["my-loss"]["winner"] is None
    assert {c["distribution"] for c in by_name["my-loss"]["ignored"]} == {
        "artplug-alpha",
        "artplug-beta",
    }

    listing = runner.invoke(make_cli(plugins), ["list", "loss"])
    assert listing.exit_code == 0
    assert "my-loss" in listing.output and "contested" in listing.output


# (d) the warning is printed once per command


@pytest.mark.parametrize("args", [["validate", str(QUICKSTART)], ["list"], ["plugins"]])
def test_collision_warning_is_printed_once_per_command(impostor, capsys, args):
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "cross-entropy" in line]
    assert len(warnings) == 1, err
    assert warnings[0].startswith("Warning: ") and "artplug-impostor 1.2.3" in warnings[0]
    assert "pgd_at" not in err or "failed" not in err  # the built-in is never reported as failed


def test_contested_name_in_a_recipe_is_a_one_line_error(rivals, tmp_path, capsys):
    recipe = tmp_path / "contested.toml"
    recipe.write_text(QUICKSTART.read_text().replace('use = "cross-entropy"', 'use = "my-loss"'))
    code, _, err = run_main(["validate", str(recipe)], capsys)
    assert code == 2
    warnings = [line for line in err.splitlines() if line.startswith("Warning:")]
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(warnings) == 1 and len(errors) == 1, err
    assert "artplug-alpha" in errors[0] and "artplug-beta" in errors[0]
    assert "ARTPLUG_DISABLE_PLUGINS" in errors[0]
