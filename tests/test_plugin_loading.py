"""Plugin discovery: built-ins via entry points, a real third-party distribution, failures."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict

import artplug
from artplug.cli import make_cli
from artplug.engine import build
from artplug.errors import PluginError
from artplug.plugins import load_plugins
from artplug.recipe import resolve
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate

BUILTIN_PLUGINS = {"pgd_at", "fgsm", "schedules"}

THIRD_PARTY_MODULE = '''
"""A third-party artplug plugin made by the test: a loss term and a schedule."""
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

import artplug


class MarginPenalty:
    """Cross-entropy on adversarial logits plus a penalty on the logit norm."""

    name = "margin-penalty"
    needs = frozenset({"adv"})

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        alpha: float = 0.01

    def __init__(self, params):
        self.params = params
        self.calls = 0

    def __call__(self, out, state):
        self.calls += 1
        penalty = out.logits_adv.pow(2).mean()
        return F.cross_entropy(out.logits_adv, out.y) + self.params.alpha * penalty


@artplug.hookimpl
def register_loss_terms(register):
    register(MarginPenalty)
'''


def make_distribution(root: Path, name: str, module: str, source: str, hook: str = "") -> None:
    """Write ``<module>.py`` and a ``<name>-1.2.3.dist-info`` with an artplug entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (dist_info / "entry_points.txt").write_text(f"[artplug]\n{hook or module} = {module}\n")


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_distribution(tmp_path, "artplug-margin", "artplug_margin", THIRD_PARTY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("artplug_margin", None)


def test_builtins_come_through_entry_points(plugin_set):
    assert BUILTIN_PLUGINS <= set(plugin_set.plugins)
    for name in BUILTIN_PLUGINS:
        info = plugin_set.plugins[name]
        assert info.builtin and info.distribution == "artplug"
    assert "pgd" in plugin_set.registries.perturbation
    assert plugin_set.registries.perturbation.get("pgd").plugin == "pgd_at"


def test_third_party_plugin_is_discovered_and_used_from_a_recipe(third_party, tmp_path):
    plugins = load_plugins(disabled=(), strict=True)
    assert plugins.plugins["artplug_margin"].distribution == "artplug-margin"
    assert plugins.plugins["artplug_margin"].version == "1.2.3"
    entry = plugins.registries.loss.get("margin-penalty")
    assert entry.plugin == "artplug_margin"

    raw = digits_recipe(loss=[{"use": "margin-penalty", "alpha": 0.5}])
    recipe = resolve(raw, plugins.registries)
    assert recipe.losses[0].params.alpha == 0.5
    components = build(recipe)
    term = components.losses[0].term
    train_and_evaluate(components, run_dir=tmp_path / "run", max_steps=2)
    assert term.calls == 2  # the third-party term really drove the training steps


def test_third_party_plugin_in_cli_list_and_plugins(third_party):
    plugins = load_plugins(disabled=(), strict=True)
    runner = CliRunner()
    listing = runner.invoke(make_cli(plugins), ["list", "loss"])
    assert listing.exit_code == 0
    assert "margin-penalty" in listing.output and "[artplug_margin]" in listing.output
    report = runner.invoke(make_cli(plugins), ["plugins", "--json"])
    data = json.loads(report.output)
    row = next(r for r in data["plugins"] if r["name"] == "artplug_margin")
    assert row == {
        "name": "artplug_margin",
        "distribution": "artplug-margin",
        "version": "1.2.3",
        "builtin": False,
        "techniques": ["loss:margin-penalty"],
    }


def test_disable_env_blocks_builtins(monkeypatch):
    monkeypatch.setenv("ARTPLUG_DISABLE_PLUGINS", "fgsm, schedules")
    plugins = load_plugins()
    assert "fgsm" not in plugins.registries.perturbation
    assert "cosine-lr" not in plugins.registries.schedule
    assert {"fgsm", "schedules"} <= plugins.blocked
    assert "pgd" in plugins.registries.perturbation


def test_import_failure_is_recorded_not_fatal(tmp_path, monkeypatch):
    make_distribution(tmp_path, "artplug-broken", "artplug_broken", "import not_a_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins(disabled=())
    (failure,) = [f for f in plugins.failures if f.name == "artplug_broken"]
    assert failure.distribution == "artplug-broken"
    assert "ModuleNotFoundError" in failure.one_line() and "\n" not in failure.one_line()
    assert "pgd" in plugins.registries.perturbation  # the rest still works
    result = CliRunner().invoke(make_cli(plugins), ["plugins"])
    assert result.exit_code == 0 and "FAILED plugin 'artplug_broken'" in result.output


def test_misspelled_hook_is_caught_by_check_pending(tmp_path, monkeypatch):
    source = """
        import artplug

        @artplug.hookimpl
        def register_loss_term(register):
            pass
    """
    make_distribution(tmp_path, "artplug-typo", "artplug_typo", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins(disabled=())
    (failure,) = [f for f in plugins.failures if f.name == "artplug_typo"]
    assert "register_loss_term" in failure.error
    with pytest.raises(PluginError, match="register_loss_term"):
        load_plugins(disabled=(), strict=True)


class _Duplicate:
    """A second technique called pgd."""

    name = "pgd"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, params):
        self.params = params

    def generate(self, model, x, y, state):
        return x.detach()


class _DuplicatePlugin:
    @staticmethod
    @artplug.hookimpl
    def register_perturbations(register):
        register(_Duplicate)


def test_duplicate_name_names_both_plugins():
    with pytest.raises(PluginError, match=r"'pgd_at'.*'dupe'|'dupe'.*'pgd_at'"):
        load_plugins(disabled=(), extra=[("dupe", _DuplicatePlugin())], strict=True)
    lenient = load_plugins(disabled=(), extra=[("dupe", _DuplicatePlugin())])
    # A collision is not a load failure: the built-in keeps the name, the outside class is
    # dropped and the collision is reported (tests/test_plugin_names.py has the full rules).
    assert not lenient.failures
    assert lenient.registries.perturbation.get("pgd").plugin == "pgd_at"
    (collision,) = lenient.collisions
    assert collision.winner is not None and collision.winner.name == "pgd_at"
    assert [info.name for info in collision.ignored] == ["dupe"]


def test_plugins_dir(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "extra_loss.py").write_text(textwrap.dedent(THIRD_PARTY_MODULE))
    plugins = load_plugins(disabled=(), plugins_dir=folder, strict=True)
    assert plugins.registries.loss.get("margin-penalty").plugin == "file:extra_loss"
