"""Recipe validation: strictness, all errors at once, did-you-mean, overrides, resolution."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from artplug.errors import RecipeError
from artplug.recipe import (
    apply_override,
    dumps_toml,
    json_schema,
    load_recipe,
    parse_value,
    resolve,
)
from artplug.testing import digits_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.toml"))


def problems(raw, registries, **kwargs) -> list[str]:
    with pytest.raises(RecipeError) as info:
        resolve(raw, registries, source="r.toml", **kwargs)
    assert str(info.value).startswith("r.toml: ")
    return info.value.problems


def test_minimal_recipe_fills_every_default(plugin_set):
    raw = {"loss": [{"use": "cross-entropy"}]}
    recipe = resolve(raw, plugin_set.registries)
    assert recipe.perturbation.use == "none"
    assert recipe.data.dataset == "digits"
    assert recipe.losses[0].id == "cross-entropy" and recipe.losses[0].weight == 1.0
    table = recipe.to_dict()
    assert table["optim"]["lr"] == 0.1
    assert table["loss"][0] == {
        "use": "cross-entropy",
        "id": "cross-entropy",
        "weight": 1.0,
        "on": "adv",
        "label_smoothing": 0.0,
    }


def test_all_errors_reported_at_once_with_locations(plugin_set):
    raw = digits_recipe(
        optim={"lr": "fast", "momentum": 0.9},
        data={"dataset": "digits", "batchsize": 3},
        perturbation={"use": "pgd", "steps": "many"},
        loss=[{"use": "cross-entropy", "on": "both"}],
    )
    found = problems(raw, plugin_set.registries)
    joined = "\n".join(found)
    assert "optim.lr: Input should be a valid number" in joined
    assert "data.batchsize: unknown key" in joined
    assert "perturbation (pgd).steps:" in joined
    assert "loss[0] (cross-entropy).on:" in joined
    assert len(found) == 4


def test_unknown_technique_gets_did_you_mean_and_installed_list(plugin_set):
    raw = digits_recipe(perturbation={"use": "pgdd"}, loss=[{"use": "cross-entropi"}])
    found = problems(raw, plugin_set.registries)
    assert found[0].startswith("perturbation: no perturbation named 'pgdd'. Did you mean 'pgd'")
    assert "Installed: " in found[0] and "fgsm" in found[0]
    assert "loss[0]: no loss named 'cross-entropi'. Did you mean 'cross-entropy'?" in found[1]


def test_unknown_table_and_missing_loss(plugin_set):
    raw = {"optimizer": {"lr": 1}}
    found = problems(raw, plugin_set.registries)
    assert "optimizer: unknown table (did you mean 'optim'?)" in found
    assert any(p.startswith("loss: at least one [[loss]]") for p in found)


def test_duplicate_loss_ids_rejected(plugin_set):
    raw = digits_recipe(loss=[{"use": "cross-entropy"}, {"use": "cross-entropy", "on": "clean"}])
    found = problems(raw, plugin_set.registries)
    assert any("also the id of loss[0]" in p for p in found)
    raw["loss"][1]["id"] = "clean-ce"
    recipe = resolve(raw, plugin_set.registries)
    assert [s.id for s in recipe.losses] == ["cross-entropy", "clean-ce"]


def test_schedule_knobs_must_exist_and_be_disjoint(plugin_set):
    raw = digits_recipe(schedule=[{"use": "cyclic-lr"}, {"use": "cosine-lr"}])
    found = problems(raw, plugin_set.registries)
    assert any("knob 'lr_scale' is already set by schedule[0] (cyclic-lr)" in p for p in found)


def test_unknown_eval_attack(plugin_set):
    raw = digits_recipe(eval={"attacks": ["pgd20"]})
    found = problems(raw, plugin_set.registries)
    assert any(p.startswith("eval.attacks[0]: unknown attack 'pgd20'") for p in found)


def test_overrides_use_toml_values_and_paths(plugin_set):
    raw = digits_recipe()
    recipe = resolve(
        raw,
        plugin_set.registries,
        overrides=[
            "optim.lr=0.2",
            "loss.0.label_smoothing=0.1",
            "perturbation.random_start=false",
            "data.dataset=digits",
            "loss[0].weight=2",
        ],
    )
    assert recipe.optim.lr == 0.2
    assert recipe.losses[0].params.label_smoothing == 0.1
    assert recipe.losses[0].weight == 2.0
    assert recipe.perturbation.params.random_start is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr", "expected KEY=VALUE"),
        ("optimm.lr=1", "unknown table 'optimm'"),
        ("loss.3.weight=1", "has only 1 such table"),
        ("loss.x.weight=1", "expected an index"),
        ("optim.lr=[1,", "not a valid TOML value"),
    ],
)
def test_bad_overrides(plugin_set, override, message):
    found = problems(digits_recipe(), plugin_set.registries, overrides=[override])
    assert found[0].startswith(f"--set {override}: ") and message in found[0]


def test_parse_value():
    assert parse_value("0.5") == 0.5
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("true") is True
    assert parse_value("cifar10") == "cifar10"
    assert parse_value('"a b"') == "a b"


def test_apply_override_creates_tables():
    data: dict = {}
    apply_override(data, "tracking.backend=none")
    assert data == {"tracking": {"backend": "none"}}


def test_resolved_toml_round_trips(plugin_set):
    recipe = resolve(
        digits_recipe(schedule=[{"use": "piecewise-lr", "milestones": [1.0]}]),
        plugin_set.registries,
    )
    text = recipe.to_toml()
    again = resolve(tomllib.loads(text), plugin_set.registries)
    assert again.to_dict() == recipe.to_dict()


def test_dumps_toml_escapes_and_skips_none():
    text = dumps_toml({"run": {"name": 'a "quoted"\nname', "x": None, "f": 1e-5}})
    assert tomllib.loads(text) == {"run": {"name": 'a "quoted"\nname', "f": 1e-5}}


def test_file_errors(tmp_path, plugin_set):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.toml", plugin_set.registries)
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nname = \n")
    with pytest.raises(RecipeError, match=r"bad.toml: invalid TOML: .*line 2"):
        load_recipe(bad, plugin_set.registries)


def test_json_schema_includes_plugin_params(plugin_set):
    schema = json_schema(plugin_set.registries)
    variants = schema["properties"]["perturbation"]["anyOf"]
    pgd = next(v for v in variants if v["title"] == "pgd")
    assert pgd["properties"]["use"]["const"] == "pgd"
    assert "steps" in pgd["properties"] and pgd["additionalProperties"] is False
    assert "lr" in schema["properties"]["optim"]["properties"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_resolves(plugin_set, path):
    recipe = load_recipe(path, plugin_set.registries)
    assert recipe.losses
