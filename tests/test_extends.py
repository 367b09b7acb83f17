"""Recipe inheritance: ``extends``, ``unset``, merge rules, chains, cycles and error locations."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from clitools import run_main

from artplug.errors import RecipeError
from artplug.recipe import _find_line, load_recipe, read_recipe, resolve
from artplug.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]
TWINS = sorted((ROOT / "recipes" / "digits").glob("*.toml"))
# The resolved digits twins as they were before they extended their CIFAR parents (written
# from the standalone files): the conversion must not have changed a single value.
FROZEN = json.loads((ROOT / "tests" / "data" / "digits_twins_resolved.json").read_text())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, registries, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registries, overrides, check_out_dir=False)
    return info.value.problems


BASE = """\
# base
[run]
name = "base"
epochs = 3

[optim]
lr = 0.1
momentum = 0.9

[threat]
eps = 0.1

[perturbation]
use = "pgd"
steps = 3
step_size = 0.02

[[loss]]
use = "cross-entropy"
id = "ce-clean"
on = "clean"
weight = 0.5

[[loss]]
use = "cross-entropy"
weight = 0.5

[[schedule]]
use = "piecewise-lr"
milestones = [2.0]

[tracking]
backend = "none"
"""


# --------------------------------------------------------------------------------------------
# The digits twins


def test_twins_are_frozen_and_all_covered():
    assert sorted(FROZEN) == [p.name for p in TWINS]


@pytest.mark.parametrize("path", TWINS, ids=lambda p: p.stem)
def test_twin_resolves_exactly_as_before_and_extends_its_parent(path, plugin_set):
    recipe = load_recipe(path, plugin_set.registries, check_out_dir=False)
    resolved = recipe.to_dict()
    chain = resolved.pop("extends_chain")
    assert resolved == FROZEN[path.name]
    # The chain is the twin and its CIFAR parent of the same name, nothing else.
    assert [Path(name).resolve() for name in chain] == [path, ROOT / "recipes" / path.name]
    raw = tomllib.loads(path.read_text())
    assert raw["extends"] == f"../{path.name}"
    # The header's evidence lines stay first in the file.
    assert path.read_text().startswith(f"# Digits twin of recipes/{path.name} ")


def test_a_twin_follows_a_change_of_its_parent(plugin_set, tmp_path):
    """The point of extending: a parent parameter the twin does not override reaches it."""
    parent_text = (ROOT / "recipes" / "trades.toml").read_text()
    assert "beta = 6.0" in parent_text
    write(tmp_path / "trades.toml", parent_text.replace("beta = 6.0", "beta = 4.5"))
    twin = write(
        tmp_path / "digits" / "trades.toml", (ROOT / "recipes/digits/trades.toml").read_text()
    )
    recipe = load_recipe(twin, plugin_set.registries, check_out_dir=False)
    assert recipe.losses[0].params.beta == 4.5  # type: ignore[attr-defined]
    assert recipe.data.dataset == "digits" and recipe.threat.eps == 0.2


# --------------------------------------------------------------------------------------------
# Merge rules


def test_tables_merge_by_key_and_arrays_of_tables_are_replaced_whole(plugin_set, tmp_path):
    write(tmp_path / "base.toml", BASE)
    child = write(
        tmp_path / "sub" / "child.toml",
        'extends = "../base.toml"\n\n[optim]\nlr = 0.05\n\n[[loss]]\nuse = "trades"\nbeta = 3.0\n',
    )
    recipe = load_recipe(child, plugin_set.registries, check_out_dir=False)
    assert recipe.optim.lr == 0.05 and recipe.optim.momentum == 0.9  # merged key by key
    assert recipe.run.epochs == 3 and recipe.perturbation.params.steps == 3  # type: ignore[attr-defined]
    # One [[loss]] replaces both inherited ones: never merged by position.
    assert [(t.use, t.id, t.weight) for t in recipe.losses] == [("trades", "trades", 1.0)]
    assert [s.use for s in recipe.schedules] == ["piecewise-lr"]  # untouched lists stay
    assert recipe.extends_chain == (str(child), str(tmp_path / "base.toml"))


def test_another_attack_replaces_the_perturbation_table_whole(plugin_set, tmp_path):
    write(tmp_path / "base.toml", BASE)
    same = write(tmp_path / "same.toml", 'extends = "base.toml"\n[perturbation]\nsteps = 5\n')
    recipe = load_recipe(same, plugin_set.registries, check_out_dir=False)
    assert recipe.perturbation.params.steps == 5  # type: ignore[attr-defined]
    assert recipe.perturbation.params.step_size == 0.02  # type: ignore[attr-defined]
    # fgsm has no 'steps': merged key by key this would be an unknown key.
    other = write(tmp_path / "other.toml", 'extends = "base.toml"\n[perturbation]\nuse = "fgsm"\n')
    recipe = load_recipe(other, plugin_set.registries, check_out_dir=False)
    assert recipe.perturbation.use == "fgsm" and recipe.perturbation.params.step_size is None  # type: ignore[attr-defined]


def test_chains_resolve_paths_relative_to_each_file(plugin_set, tmp_path):
    write(tmp_path / "c.toml", BASE)
    write(tmp_path / "one" / "b.toml", 'extends = "../c.toml"\n[run]\nepochs = 7\nname = "b"\n')
    a = write(tmp_path / "one" / "two" / "a.toml", 'extends = "../b.toml"\n[run]\nname = "a"\n')
    recipe = load_recipe(a, plugin_set.registries, check_out_dir=False)
    assert (recipe.run.name, recipe.run.epochs, recipe.optim.lr) == ("a", 7, 0.1)
    assert recipe.extends_chain == (
        str(a),
        str(tmp_path / "one" / "b.toml"),
        str(tmp_path / "c.toml"),
    )


def test_nested_tables_merge_too(plugin_set, tmp_path):
    write(
        tmp_path / "m.toml",
        BASE.replace(
            '[perturbation]\nuse = "pgd"\nsteps = 3\nstep_size = 0.02\n',
            '[perturbation]\nuse = "moat"\nsingle_attack = "slat"\n\n'
            "[perturbation.slat]\nalpha = 0.5\nlatent_eps = 0.01\n",
        )
        + '\n[[transform]]\nuse = "latent-sites"\n',
    )
    child = write(tmp_path / "c.toml", 'extends = "m.toml"\n[perturbation.slat]\nalpha = 0.7\n')
    recipe = load_recipe(child, plugin_set.registries, check_out_dir=False)
    slat = recipe.perturbation.params.slat  # type: ignore[attr-defined]
    assert (slat.alpha, slat.latent_eps) == (0.7, 0.01)


# --------------------------------------------------------------------------------------------
# unset


def test_unset_removes_inherited_keys_and_tables(plugin_set, tmp_path):
    write(tmp_path / "base.toml", BASE)
    child = write(
        tmp_path / "child.toml",
        'extends = "base.toml"\nunset = ["perturbation.step_size", "schedule", "optim"]\n'
        "[optim]\nnesterov = true\n",
    )
    recipe = load_recipe(child, plugin_set.registries, check_out_dir=False)
    assert recipe.perturbation.params.step_size is None  # type: ignore[attr-defined]
    assert recipe.schedules == ()
    # The whole inherited [optim] is gone before the file's own [optim] applies.
    assert (recipe.optim.lr, recipe.optim.nesterov) == (0.1, True)
    assert recipe.optim.momentum == 0.9  # the default, equal to the base here
    read = read_recipe(child)
    assert ("optim", "nesterov") in read.origins and ("optim", "lr") not in read.origins


def test_bad_unset_entries_are_errors_with_file_line_and_hint(plugin_set, tmp_path):
    write(tmp_path / "base.toml", BASE)
    child = write(
        tmp_path / "child.toml", '# x\nextends = "base.toml"\nunset = ["optim.lrr", "loss.0"]\n'
    )
    found = problems_of(child, plugin_set.registries)
    assert found[0].startswith("unset (line 3): 'optim.lrr' is not set by ")
    assert "(did you mean 'optim.lr'" in found[0]
    assert found[1].startswith("unset (line 3): 'loss.0' is not set")
    top = write(tmp_path / "top.toml", 'unset = ["run.epochs"]\n' + BASE)
    assert (
        "only a recipe that extends another can unset keys"
        in problems_of(top, plugin_set.registries)[0]
    )
    typed = write(tmp_path / "typed.toml", 'extends = "base.toml"\nunset = "run.epochs"\n')
    assert "must be a list of dotted keys" in problems_of(typed, plugin_set.registries)[0]


# --------------------------------------------------------------------------------------------
# Broken chains


def test_cycles_are_errors(plugin_set, tmp_path):
    write(tmp_path / "a.toml", 'extends = "sub/b.toml"\n')
    write(tmp_path / "sub" / "b.toml", '\nextends = "../a.toml"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.toml", plugin_set.registries)
    message = str(info.value)
    assert "extends (line 2): recipes extend each other in a cycle" in message
    a, b = tmp_path / "a.toml", tmp_path / "sub" / "b.toml"
    assert f"{a} -> {b} -> {a}" in message
    itself = write(tmp_path / "self.toml", 'extends = "self.toml"\n')
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(itself, plugin_set.registries)


def test_missing_or_bad_parent_names_the_file(plugin_set, tmp_path):
    child = write(tmp_path / "child.toml", 'extends = "nope.toml"\n[run]\nepochs = 1\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(child, plugin_set.registries)
    assert str(info.value).startswith(f"{child}: extends (line 1): 'nope.toml' is not found")
    write(tmp_path / "broken.toml", "[run\n")
    child = write(tmp_path / "child2.toml", 'extends = "broken.toml"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(child, plugin_set.registries)
    assert str(info.value).startswith(
        f"{tmp_path / 'broken.toml'} (extended by {child}): invalid TOML"
    )
    typed = write(tmp_path / "typed.toml", "extends = 3\n")
    with pytest.raises(RecipeError, match="must be the path of the recipe this one extends"):
        load_recipe(typed, plugin_set.registries)


def test_extends_outside_a_file_is_refused(plugin_set):
    with pytest.raises(RecipeError) as info:
        resolve({"extends": "x.toml", "loss": [{"use": "cross-entropy"}]}, plugin_set.registries)
    assert "extends: only a recipe file can use extends" in str(info.value)
    with pytest.raises(RecipeError, match="extends_chain: must be a list of file names"):
        resolve({"extends_chain": "x", "loss": [{"use": "cross-entropy"}]}, plugin_set.registries)
    with pytest.raises(RecipeError, match=r"extend: unknown table \(did you mean 'extends'"):
        resolve({"extend": "x.toml", "loss": [{"use": "cross-entropy"}]}, plugin_set.registries)


# --------------------------------------------------------------------------------------------
# Where a bad value came from


def test_problems_name_the_file_and_line_that_set_the_value(plugin_set, tmp_path):
    base = write(
        tmp_path / "base.toml",
        BASE.replace("lr = 0.1", "lr = -1.0").replace(
            'use = "cross-entropy"\nweight = 0.5',
            'use = "cross-entropy"\nweight = 0.5\nonn = "adv"',
        ),
    )
    child = write(
        tmp_path / "sub" / "child.toml",
        'extends = "../base.toml"\n\n[optim]\nmomentum = 2.0\n\n[perturbation]\nsteps = 0\n',
    )
    found = problems_of(child, plugin_set.registries)
    base_lines = base.read_text().splitlines()
    lr_line = base_lines.index("lr = -1.0") + 1
    onn_line = base_lines.index('onn = "adv"') + 1
    shown = str(base)
    assert f"optim.lr: Input should be greater than 0 (set in {shown}:{lr_line})" in found
    assert any(
        p.startswith("optim.momentum: Input should be less than 1")
        and p.endswith(f"(set in {child}:4)")
        for p in found
    )
    assert any(
        p.startswith("perturbation (pgd).steps:") and p.endswith(f"{child}:7)") for p in found
    )
    # The second [[loss]] of the base, not the first.
    assert any(
        p.startswith("loss[1] (cross-entropy).onn: unknown key (did you mean 'on'?)")
        and p.endswith(f"(set in {shown}:{onn_line})")
        for p in found
    )
    # A value given with --set is said to come from there.
    found = problems_of(child, plugin_set.registries, ["optim.momentum=3.0"])
    assert any(p.startswith("optim.momentum:") and p.endswith("(set by --set)") for p in found)


def test_validate_prints_the_merged_recipe_and_its_chain(capsys, tmp_path):
    write(tmp_path / "base.toml", BASE)
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[run]\nname = "child"\n')
    code, out, err = run_main(["validate", str(child)], capsys)
    assert code == 0, err
    data = tomllib.loads(out)
    assert data["extends_chain"] == [str(child), str(tmp_path / "base.toml")]
    assert data["run"]["name"] == "child" and data["run"]["epochs"] == 3
    assert [t["id"] for t in data["loss"]] == ["ce-clean", "cross-entropy"]
    # The resolved recipe is itself a valid recipe (what resume and rerun read back), and the
    # chain is one of the MLflow params a tracked run logs.
    resolved_file = write(tmp_path / "resolved.toml", out)
    code, again, err = run_main(["validate", str(resolved_file)], capsys)
    assert code == 0, err
    assert tomllib.loads(again) == data
    assert json.loads(flatten(data)["extends_chain"]) == data["extends_chain"]


def test_a_recipe_that_extends_nothing_has_no_chain(plugin_set):
    recipe = load_recipe(ROOT / "recipes" / "quickstart.toml", plugin_set.registries)
    assert recipe.extends_chain == () and "extends_chain" not in recipe.to_dict()


def test_find_line_scans_tables_arrays_and_dotted_keys():
    text = (
        "top = 1\nrun.epochs = 2\n[optim]\nlr = 0.1  # x\n[[loss]]\nuse = 'a'\n"
        "[[loss]]\nuse = 'b'\nbeta = 1\n[perturbation]\nslat = { alpha = 1 }\n"
        "[perturbation.spat]\ngamma = 2\n"
    )
    assert _find_line(text, ("top",)) == 1
    assert _find_line(text, ("run", "epochs")) == 2
    assert _find_line(text, ("optim", "lr")) == 4
    assert _find_line(text, ("optim", "nesterov")) == 3  # not set: the table's header
    assert _find_line(text, ("loss", "use"), 1) == 8
    assert _find_line(text, ("loss", "beta"), 1) == 9
    assert _find_line(text, ("loss", "beta"), 0) == 5
    assert _find_line(text, ("perturbation", "slat", "alpha")) == 11  # inside an inline table
    assert _find_line(text, ("perturbation", "spat", "gamma")) == 13
    assert _find_line(text, ("eval", "eps")) is None


def _regenerate() -> None:
    """Rewrite the frozen twins from the current recipes (after checking a wanted change)."""
    from artplug.plugins import load_plugins

    registries = load_plugins().registries
    frozen = {}
    for path in TWINS:
        resolved = load_recipe(path, registries, check_out_dir=False).to_dict()
        resolved.pop("extends_chain", None)
        frozen[path.name] = resolved
    target = ROOT / "tests" / "data" / "digits_twins_resolved.json"
    target.write_text(json.dumps(frozen, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":  # python tests/test_extends.py: regenerate the frozen twins
    _regenerate()
