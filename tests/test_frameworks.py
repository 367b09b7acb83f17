"""The frameworks of the HE paper as recipes: every digits twin runs, the interaction matrix of
docs/techniques/README.md, combinations is honoured (allowed stacks resolve and train; forbidden
ones are rejected by
`artplug validate` with the reason)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from artplug.cli import main
from artplug.engine import build
from artplug.recipe import dumps_toml, load_recipe, resolve
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
TWINS = sorted((ROOT / "recipes" / "digits").glob("*.toml"))
FAST = [
    'eval.final_attacks=["clean"]',
    "eval.test_examples=16",
    "eval.every_epochs=0",
    "eval.sanity=false",
    'tracking.backend="none"',
]

# The attack and loss stack of each base framework (docs/techniques/README.md), without and with HE
# (docs/techniques/hypersphere.md).
BASES = {
    "pgd-at": ({"use": "pgd", "steps": 2}, [{"use": "cross-entropy"}]),
    "trades": ({"use": "trades-kl", "steps": 2}, [{"use": "trades"}]),
    "alp": (
        {"use": "pgd", "steps": 2},
        [
            {"use": "cross-entropy", "id": "ce-clean", "on": "clean", "weight": 0.5},
            {"use": "cross-entropy", "id": "ce-adv", "weight": 0.5},
            {"use": "logit-pairing", "weight": 0.5},
        ],
    ),
    "free": ({"use": "free", "replays": 2}, [{"use": "cross-entropy"}]),
    "fast": ({"use": "fgsm", "random_start": True}, [{"use": "cross-entropy"}]),
    "moat": ({"use": "moat", "multi_steps": 2}, [{"use": "cross-entropy"}]),
}
HE_LOSSES = {
    "pgd-at": [{"use": "he-margin"}],
    "trades": [{"use": "he-margin", "on": "clean"}, {"use": "trades", "natural": False}],
    "alp": [
        {"use": "he-margin", "id": "he-clean", "on": "clean", "weight": 0.5},
        {"use": "he-margin", "id": "he-adv", "weight": 0.5},
        {"use": "logit-pairing", "weight": 0.5},
    ],
    "free": [{"use": "he-margin"}],
    "fast": [{"use": "he-margin"}],
    "moat": [{"use": "he-margin"}],
}


def stack(base: str, he: bool) -> dict:
    perturbation, losses = BASES[base]
    # Deep copies: the forbidden cases below edit nested tables of their stacks.
    raw = copy.deepcopy(
        digits_recipe(perturbation=perturbation, loss=HE_LOSSES[base] if he else losses)
    )
    raw["eval"] = {
        "every_epochs": 0,
        "final_attacks": ["clean"],
        "test_examples": 16,
        "sanity": False,
    }
    if he:
        raw["transform"] = [{"use": "hypersphere"}]
    if base == "moat":
        raw["schedule"] = [{"use": "moat-stages"}]
    return raw


@pytest.mark.parametrize("path", TWINS, ids=[p.stem for p in TWINS])
def test_digits_twin_runs_two_steps(plugin_set, path, tmp_path):
    recipe = load_recipe(path, plugin_set.registries, FAST)
    result = train_and_evaluate(build(recipe), run_dir=tmp_path / "run", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0


def test_every_twin_mirrors_a_cifar_recipe():
    stems = {p.stem for p in TWINS}
    frameworks = {"pgd_at", "trades", "alp", "free_at", "fast_at"}
    assert frameworks | {f"he_{s}" for s in ("pgd", "trades", "alp", "free", "fast")} <= stems
    for stem in stems:
        assert (ROOT / "recipes" / f"{stem}.toml").is_file(), stem


@pytest.mark.parametrize("he", [False, True], ids=["plain", "he"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_allowed_combination_resolves_and_trains(plugin_set, tmp_path, base, he):
    recipe = resolve(stack(base, he), plugin_set.registries)
    components = build(recipe)
    if he:
        assert components.model.artplug_logit_scale == recipe.transforms[0].params.s
    result = train_and_evaluate(components, run_dir=tmp_path / "run", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0


def _forbidden() -> list[tuple[str, dict, str]]:
    he_without_head = stack("pgd-at", he=True)
    del he_without_head["transform"]
    trades_double_natural = stack("trades", he=True)
    trades_double_natural["loss"][1]["natural"] = True
    free_trades = stack("trades", he=False)
    free_trades["perturbation"] = {"use": "free"}
    stages_without_moat = stack("pgd-at", he=False)
    stages_without_moat["schedule"] = [{"use": "moat-stages"}]
    return [
        ("he-margin-without-hypersphere", he_without_head, 'add [[transform]] use = "hypersphere"'),
        ("trades-natural-with-he-margin", trades_double_natural, "set natural = false"),
        ("free-with-trades", free_trades, "trades"),
        ("moat-stages-without-moat", stages_without_moat, 'use = "moat"'),
    ]


@pytest.mark.parametrize(("name", "raw", "reason"), _forbidden(), ids=[f[0] for f in _forbidden()])
def test_forbidden_combination_is_rejected_by_validate(tmp_path, capsys, name, raw, reason):
    path = tmp_path / f"{name}.toml"
    path.write_text(dumps_toml(raw))
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    line = next(line for line in err.splitlines() if line.startswith("Error:"))
    assert reason in line, line
