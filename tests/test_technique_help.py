"""Per-technique help (`artplug list NAME`), the generated reference page and unknown-key hints."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from clitools import run_main

import artplug
from artplug.docgen import (
    COMMAND,
    REFERENCE,
    describe,
    find,
    hand_written_pages,
    render_reference,
    render_text,
)
from artplug.errors import RecipeError
from artplug.kinds import KINDS
from artplug.plugins import load_plugins
from artplug.recipe import load_recipe, resolve
from artplug.testing import digits_recipe
from artplug.workflows import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
_PLUGINS = load_plugins(disabled=(), strict=True)
BUILTIN = [
    entry
    for kind in KINDS
    for entry in _PLUGINS.registries.of(kind)
    if _PLUGINS.plugins[entry.plugin].builtin
]


def _builtin_names(plugin_set) -> list[str]:
    return [name for name, info in plugin_set.plugins.items() if info.builtin]


def test_reference_page_is_up_to_date(plugin_set):
    index = (ROOT / "docs" / "techniques" / "README.md").read_text(encoding="utf-8")
    expected = render_reference(plugin_set.registries, _builtin_names(plugin_set), index)
    committed = (ROOT / REFERENCE).read_text(encoding="utf-8")
    assert committed == expected, f"{REFERENCE} is out of date; run: {COMMAND}"


def test_reference_covers_every_builtin_technique_and_is_linked():
    text = (ROOT / REFERENCE).read_text(encoding="utf-8")
    for entry in BUILTIN:
        assert f"\n### `{entry.name}`\n" in text, entry.name
    index = (ROOT / "docs" / "techniques" / "README.md").read_text(encoding="utf-8")
    assert "(reference.md)" in index


@pytest.mark.parametrize("entry", BUILTIN, ids=lambda e: f"{e.kind}-{e.name}")
def test_every_param_is_described_and_the_example_validates(entry, plugin_set, tmp_path):
    doc = describe(entry, plugin_set.registries)
    assert doc.params == () or all(p.meaning for p in doc.params), [
        p.key for p in doc.params if not p.meaning
    ]
    assert [p.key for p in doc.params if "." not in p.key] == list(entry.cls.Params.model_fields)
    if entry.name != "none":
        assert doc.paper, f"{entry.name}: add a paper attribute"
    # The example is a whole recipe: artplug validate (resolution and a CPU build of the model
    # with its transforms) must accept it as printed, and it must hold the technique's table
    # with every parameter that has a default.
    path = tmp_path / "example.toml"
    path.write_text(doc.example)
    resolved = load_recipe(path, plugin_set.registries)
    validate_recipe(resolved)
    raw = tomllib.loads(doc.example)
    tables = raw[entry.kind] if entry.kind != "perturbation" else [raw["perturbation"]]
    own = next(t for t in tables if t["use"] == entry.name)
    for name, info in entry.cls.Params.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if default is not None:
            assert own[name] == default, name


def test_help_shows_params_types_defaults_rules_and_example(capsys):
    code, out, err = run_main(["list", "pgd"], capsys)
    assert code == 0, err
    assert out.startswith("pgd (perturbation, plugin pgd_at): Projected gradient descent")
    assert "Paper: A. Madry" in out
    assert "  steps = 10  (integer, >= 1)\n      gradient steps per restart\n" in out
    assert "  step_size = not set  (float, > 0, optional)\n" in out
    assert '  model_mode = "eval"  ("eval" | "train")\n' in out
    assert '  [perturbation]\n  use = "pgd"\n  steps = 10\n' in out
    # A requirement found by validating the technique alone, and the example that meets it.
    code, out, _ = run_main(["list", "he-margin"], capsys)
    assert code == 0
    assert 'he-margin is defined on cosine logits; add [[transform]] use = "hypersphere"' in out
    example = out.split("accepts it as it is):\n\n", 1)[1]
    assert example.index('use = "hypersphere"') < example.index('use = "he-margin"')
    # A combination rule that another technique checks: the trades loss about he-margin.
    assert "with loss trades → trades: with he-margin, set natural = false" in out


def test_probed_rules_are_real_validator_problems(plugin_set):
    """Every rule the help gives for free is what the validator says for that combination."""
    doc = describe(plugin_set.registries.of("perturbation").get("free"), plugin_set.registries)
    rule = next(r for r in doc.rules if r.startswith("with loss trades → "))
    raw = digits_recipe(
        perturbation={"use": "free"}, loss=[{"use": "cross-entropy"}, {"use": "trades"}]
    )
    with pytest.raises(RecipeError) as info:
        resolve(raw, plugin_set.registries)
    reason = rule.split(" → free: ", 1)[1]
    assert any(p.endswith(reason) for p in info.value.problems)
    # ... and a combination that validates gives no rule.
    assert not any(r.startswith("with loss he-margin") for r in doc.rules)


def test_stage_and_knobs_are_reported(plugin_set):
    head = describe(plugin_set.registries.of("transform").get("hypersphere"), plugin_set.registries)
    assert any(c.startswith("stage 'head'") for c in head.capabilities)
    assert any("hypersphere is listed 2 times" in r for r in head.rules)
    cyclic = describe(plugin_set.registries.of("schedule").get("cyclic-lr"), plugin_set.registries)
    assert any("`lr_scale`, `momentum`" in c for c in cyclic.capabilities)
    assert any("knob 'lr_scale' is already set" in r for r in cyclic.rules)


def test_list_kind_still_lists_and_unknown_name_suggests(capsys):
    code, out, _ = run_main(["list", "loss"], capsys)
    assert code == 0 and out.startswith("Loss terms") and "  trades  " in out
    code, out, err = run_main(["list", "tradez"], capsys)
    assert code == 2 and not out
    assert err.startswith("Error: no technique named 'tradez'. Did you mean 'trades'")
    assert "Traceback" not in err


def test_a_name_in_two_kinds_is_explained_in_each():
    registries = load_plugins(disabled=(), strict=True).registries

    class Twin:
        """A schedule that shares its name with a loss term."""

        name = "trades"

        class Params(artplug.Params):
            """No parameters."""

        def __init__(self, params):
            self.params = params

        def knobs(self):
            return frozenset()

        def values(self, progress):
            return {}

    registries.schedule.add(Twin, "test")
    assert [e.kind for e in find(registries, "trades")] == ["loss", "schedule"]
    text = render_text(describe(registries.schedule.get("trades"), registries))
    assert text.startswith("trades (schedule, plugin test): A schedule that shares")
    assert "  (none)" in text


def test_hand_written_pages_come_from_the_index_table():
    index = "| page | paper | plugins |\n|---|---|---|\n| [x.md](x.md) | P | `a`, `b-c` |\n"
    assert hand_written_pages(index) == {"a": "x.md", "b-c": "x.md"}


# --------------------------------------------------------------------------------------------
# Did-you-mean on unknown keys


def _problems(raw, registries) -> list[str]:
    with pytest.raises(RecipeError) as info:
        resolve(raw, registries, source="r.toml")
    return info.value.problems


def test_unknown_keys_get_a_did_you_mean(plugin_set):
    raw = digits_recipe(
        data={"dataset": "digits", "batchsize": 3},
        eval={"every_epoch": 1},
        perturbation={"use": "pgd", "stpes": 3},
        loss=[{"use": "trades", "betta": 2.0, "weigth": 1.0}],
    )
    raw["tracking"] = {"backend": "none", "zzz": 1}
    raw["optimm"] = {}
    found = "\n".join(_problems(raw, plugin_set.registries))
    assert "data.batchsize: unknown key (did you mean 'batch_size'?)" in found
    assert "eval.every_epoch: unknown key (did you mean 'every_epochs'?)" in found
    assert "perturbation (pgd).stpes: unknown key (did you mean 'steps'" in found
    assert "loss[0] (trades).betta: unknown key (did you mean 'beta'?)" in found
    # The engine's own keys of a technique table are candidates too.
    assert "loss[0] (trades).weigth: unknown key (did you mean 'weight'?)" in found
    assert "optimm: unknown table (did you mean 'optim'?)" in found
    # Nothing close: the keys allowed there are listed instead.
    assert "tracking.zzz: unknown key (allowed here: backend, experiment, uri, log_model)" in found


def test_unknown_key_of_a_nested_table_suggests_its_own_keys(plugin_set):
    raw = digits_recipe(perturbation={"use": "moat", "single_attack": "slat", "slat": {"alpah": 1}})
    found = "\n".join(_problems(raw, plugin_set.registries))
    assert "perturbation (moat).slat.alpah: unknown key (did you mean 'alpha'?)" in found


def test_no_keys_at_all_says_so(plugin_set):
    raw = digits_recipe(loss=[{"use": "logit-pairing", "lam": 1.0}, {"use": "cross-entropy"}])
    found = "\n".join(_problems(raw, plugin_set.registries))
    assert (
        "loss[0] (logit-pairing).lam: unknown key (allowed here: id, weight; "
        "'artplug list logit-pairing' explains them)"
    ) in found
