"""The interaction matrix of docs/techniques/README.md, combinations for the issue-4 techniques
(SAT, SPAT, AALP, SLAT).

Every allowed stack is resolved, built and trained for two steps on digits; every forbidden one
is rejected by `artplug validate` with its reason in the error line. The style follows
tests/test_frameworks.py, which covers the base frameworks with and without HE.

Transform order everywhere (docs/techniques/README.md, rule 3): smooth-activation -> latent-sites
-> guided-dropout ->
hypersphere.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from artplug.cli import main
from artplug.engine import build
from artplug.recipe import dumps_toml, resolve
from artplug.testing import digits_recipe
from artplug.workflows import train_and_evaluate

Table = dict[str, Any]

SMOOTH: Table = {"use": "smooth-activation"}
SITES: Table = {"use": "latent-sites"}
DROPOUT: Table = {"use": "guided-dropout"}
HEAD: Table = {"use": "hypersphere"}
CE: list[Table] = [{"use": "cross-entropy"}]
HE: list[Table] = [{"use": "he-margin"}]
ALP_LOSSES: list[Table] = [
    {"use": "cross-entropy", "id": "ce-clean", "on": "clean", "weight": 0.5},
    {"use": "cross-entropy", "id": "ce-adv", "weight": 0.5},
    {"use": "logit-pairing", "weight": 0.5},
]
AALP: list[Table] = [{"use": "adaptive-logit-pairing"}]
# ALP+HE's cosine margin inside AALP's cross-entropies (needs the hypersphere head).
AALP_HE: list[Table] = [{"use": "adaptive-logit-pairing", "margin": 0.3}]
SPAT_2: Table = {"use": "spat", "steps": 2}
SLAT: Table = {"use": "slat", "model_mode": "train"}  # train mode: the SLAT code


def moat(**params: Any) -> Table:
    return {"use": "moat", "multi_steps": 2, **params}


def stages(*order: str) -> list[Table]:
    """moat-stages that runs ``order[0]`` at step 0 and ``order[1]`` at step 1.

    The first stage lasts 0.01 epochs, shorter than one step of digits (19 steps per epoch,
    any split under 100 steps per epoch works), so a two-step run visits both stages.
    """
    lengths = {"clean": 1.0, "single": 1.0, "multi": 1.0}
    lengths[order[0]] = 0.01
    rest = [s for s in ("clean", "single", "multi") if s not in order]
    return [
        {
            "use": "moat-stages",
            "order": [*order, *rest],
            "clean_epochs": lengths["clean"],
            "single_step_epochs": lengths["single"],
            "multi_step_epochs": lengths["multi"],
        }
    ]


def recipe(
    perturbation: Table,
    loss: list[Table],
    transforms: list[Table] | None = None,
    schedule: list[Table] | None = None,
) -> dict[str, Any]:
    """A digits recipe with the evaluation cut to the minimum (test_frameworks' FAST)."""
    raw = digits_recipe(perturbation=perturbation)
    raw["loss"] = loss
    raw["transform"] = transforms or []
    raw["schedule"] = schedule or []
    # Deep copy: the module-level tables above are shared by many recipes.
    raw = copy.deepcopy(raw)
    raw["eval"] = {
        "every_epochs": 0,
        "final_attacks": ["clean"],
        "test_examples": 16,
        "sanity": False,
    }
    return raw


# The base frameworks of test_frameworks (2-step attacks), plus SLAT and MOAT: (perturbation,
# losses, transforms that go after SAT, schedules).
BASES: dict[str, tuple[Table, list[Table], list[Table], list[Table]]] = {
    "pgd-ce": ({"use": "pgd", "steps": 2}, CE, [], []),
    "trades": ({"use": "trades-kl", "steps": 2}, [{"use": "trades"}], [], []),
    "pgd-alp": ({"use": "pgd", "steps": 2}, ALP_LOSSES, [], []),
    "free": ({"use": "free", "replays": 2}, CE, [], []),
    "fgsm-rs": ({"use": "fgsm", "random_start": True}, CE, [], []),
    "moat": (moat(), CE, [], stages("single", "multi")),
    "slat": (SLAT, CE, [SITES], []),
}

# name -> (raw recipe, the moat stage codes the two steps must run, or None when not moat)
ALLOWED: dict[str, tuple[dict[str, Any], list[float] | None]] = {
    **{
        f"smooth+{base}": (
            recipe(p, losses, [SMOOTH, *transforms], schedule),
            [1.0, 2.0] if base == "moat" else None,
        )
        for base, (p, losses, transforms, schedule) in BASES.items()
    },
    "spat+ce": (recipe(SPAT_2, CE), None),
    "spat+trades": (recipe({**SPAT_2, "loss": "kl"}, [{"use": "trades"}]), None),
    "spat+alp": (recipe(SPAT_2, ALP_LOSSES), None),
    # FastAT-like: one masked step of 1.25 eps from a uniform random start.
    "spat-1-step": (recipe({"use": "spat", "steps": 1, "step_size": 0.125}, CE), None),
    "spat+he": (recipe(SPAT_2, HE, [HEAD]), None),
    "moat-multi-spat": (
        recipe(moat(multi_attack="spat", spat={"steps": 2}), CE, schedule=stages("multi", "clean")),
        [2.0, 0.0],
    ),
    "aalp+pgd": (recipe({"use": "pgd", "steps": 2}, AALP, [DROPOUT]), None),
    "aalp+moat": (recipe(moat(), AALP, [DROPOUT], stages("single", "multi")), [1.0, 2.0]),
    "aalp+smooth+he": (
        recipe({"use": "pgd", "steps": 2}, AALP_HE, [SMOOTH, DROPOUT, HEAD]),
        None,
    ),
    "slat+he": (recipe(SLAT, HE, [SITES, HEAD]), None),
    "moat-single-slat": (
        recipe(
            moat(single_attack="slat", model_mode="train"),
            CE,
            [SITES],
            stages("single", "clean"),
        ),
        [1.0, 0.0],
    ),
    # Both delegations at once: SPAT needs an eval-mode attack, so SLAT runs in eval mode here.
    "moat-slat-and-spat": (
        recipe(
            moat(single_attack="slat", multi_attack="spat", spat={"steps": 2}),
            CE,
            [SITES],
            stages("single", "multi"),
        ),
        [1.0, 2.0],
    ),
    "full-order+slat": (recipe(SLAT, AALP_HE, [SMOOTH, SITES, DROPOUT, HEAD]), None),
}


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_allowed_stack_resolves_and_trains(plugin_set, tmp_path: Path, name: str) -> None:
    raw, expected_stages = ALLOWED[name]
    resolved = resolve(raw, plugin_set.registries)
    assert [t.use for t in resolved.transforms] == [t["use"] for t in raw["transform"]]
    result = train_and_evaluate(build(resolved), run_dir=tmp_path / "run", max_steps=2)
    assert 0.0 <= result.final["clean"] <= 1.0
    if expected_stages is not None:
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        knob = [json.loads(line).get("knob/perturbation.stage") for line in lines]
        assert [v for v in knob if v is not None] == expected_stages


def _forbidden() -> list[tuple[str, dict[str, Any], str]]:
    spat_train = recipe({**SPAT_2, "model_mode": "train"}, CE)
    return [
        (
            "slat+trades",
            recipe(SLAT, [{"use": "trades"}], [SITES]),
            "cannot be combined with the trades loss",
        ),
        (
            "latent-sites-after-hypersphere",
            recipe(SLAT, HE, [HEAD, SITES]),
            "latent-sites must come before 'hypersphere'",
        ),
        (
            "smooth-activation-not-first",
            recipe({"use": "pgd", "steps": 2}, HE, [HEAD, SMOOTH]),
            "smooth-activation must come before 'hypersphere'",
        ),
        ("spat-train-mode", spat_train, 'spat needs [perturbation] model_mode = "eval"'),
        (
            "aalp+logit-pairing",
            recipe({"use": "pgd", "steps": 2}, [*AALP, {"use": "logit-pairing"}]),
            "do not stack it with the logit-pairing loss",
        ),
        (
            "he-margin-without-hypersphere",
            recipe({"use": "pgd", "steps": 2}, HE),
            'add [[transform]] use = "hypersphere"',
        ),
        (
            "moat-slat-without-latent-sites",
            recipe(moat(single_attack="slat"), CE),
            'single_attack = "slat" perturbs latent feature maps; add [[transform]] '
            'use = "latent-sites"',
        ),
        (
            "moat-fgsm-rs-with-latent-sites",
            recipe(moat(), CE, [SITES]),
            "latent-sites transform is filled only by the slat attack",
        ),
        (
            "moat-slat+trades",
            recipe(moat(single_attack="slat"), [{"use": "trades"}], [SITES]),
            'single_attack = "slat" cannot be combined with the trades loss',
        ),
        (
            "moat-spat-train-mode",
            recipe(moat(multi_attack="spat", model_mode="train"), CE),
            'multi_attack = "spat" (its parameters: the spat sub-table): spat needs',
        ),
        (
            "guided-dropout-after-hypersphere",
            recipe({"use": "pgd", "steps": 2}, AALP, [HEAD, DROPOUT]),
            "guided-dropout must come before 'hypersphere'",
        ),
        (
            "latent-sites-after-guided-dropout",
            recipe(SLAT, CE, [DROPOUT, SITES]),
            "latent-sites must come before 'guided-dropout'",
        ),
    ]


FORBIDDEN = _forbidden()


@pytest.mark.parametrize(("name", "raw", "reason"), FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_forbidden_stack_is_rejected_by_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, raw: dict, reason: str
) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(dumps_toml(raw))
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("Error:"), err
    # One line per problem; the reason must be on one of them (not split across lines).
    assert any(reason in line for line in err.splitlines()), err
