"""docs/writing-plugins.md: its Python blocks run, and its example techniques meet the contracts."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import artplug
from artplug.plugins import load_plugins
from artplug.testing import CHECKERS, make_state, tiny_batch, tiny_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIP = "# not executed:"
# The example techniques of the guide: (kind, class name).
EXAMPLES = (
    ("loss", "LogitNormPenalty"),
    ("perturbation", "CarriedSign"),
    ("perturbation", "LatentSign"),
    ("schedule", "LinearWarmup"),
    ("transform", "UnitOutputs"),
    ("transform", "LastConvSite"),
)


def python_blocks() -> list[str]:
    return FENCE.findall(DOC.read_text())


@pytest.fixture(scope="module")
def doc_module() -> types.ModuleType:
    """The guide's Python blocks executed in order in one namespace (a module, for pluggy)."""
    module = types.ModuleType("writing_plugins_doc")
    for index, block in enumerate(python_blocks()):
        if block.lstrip().startswith(SKIP):
            continue
        code = compile(block, f"{DOC.name}[python block {index}]", "exec")
        exec(code, module.__dict__)
    return module


def test_skipped_blocks_say_why() -> None:
    blocks = python_blocks()
    assert blocks, "no python blocks found"
    for block in blocks:
        first = block.lstrip().splitlines()[0]
        if first.startswith("#") and "not executed" in first:
            assert first.startswith(SKIP) and first[len(SKIP) :].strip(), first


def test_no_magic_attribute_names() -> None:
    text = DOC.read_text()
    for magic in ("artplug_logit_scale", "artplug_no_weight_decay", "getattr"):
        assert magic not in text


def test_concepts_list_is_counted() -> None:
    text = DOC.read_text()
    section = text.split("## Concepts a plugin author must learn", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^\d+\. ", section, re.MULTILINE)
    words = {6: "Six", 7: "Seven", 8: "Eight", 9: "Nine", 10: "Ten"}
    assert f"{words[len(items)]} concepts" in section


def test_examples_register_and_pass_contracts(doc_module: types.ModuleType) -> None:
    plugins = load_plugins(disabled=(), extra=[("doc-examples", doc_module)], strict=True)
    for kind, class_name in EXAMPLES:
        cls = getattr(doc_module, class_name)
        entry = plugins.registries.of(kind).get(cls.name)
        assert entry.cls is cls and entry.plugin == "doc-examples"
        assert issubclass(cls.Params, artplug.Params)
        CHECKERS[kind](cls)


def test_example_loss_reads_the_logit_scale(doc_module: types.ModuleType) -> None:
    term_cls: Any = doc_module.LogitNormPenalty
    term = term_cls(term_cls.Params(alpha=0.5))
    x, y = tiny_batch()
    for scale in (1.0, 7.0):
        model = tiny_model()
        if scale != 1.0:
            artplug.set_logit_scale(model, scale)
        raw = model.eval()(x)
        out = artplug.Outputs(x=x, y=y, x_adv=x, logits_clean=None, logits_adv=raw)
        value = term(out, make_state(model, artplug.Threat("linf", 0.1)))
        logits = scale * raw
        expected = F.cross_entropy(logits, y) + 0.5 * logits.pow(2).mean()
        torch.testing.assert_close(value, expected)


def test_example_transforms_use_the_helpers(doc_module: types.ModuleType) -> None:
    head_cls: Any = doc_module.UnitOutputs
    model = head_cls(head_cls.Params(scale=16.0)).apply(tiny_model())
    assert artplug.logit_scale(model) == 16.0
    assert artplug.attack_logit_scale(model) == 16.0
    skipped = [name for name, p in model.named_parameters() if artplug.is_no_weight_decay(p)]
    assert skipped == ["offset"]
    assert head_cls.stage in artplug.TRANSFORM_STAGES

    site_cls: Any = doc_module.LastConvSite
    model = site_cls(site_cls.Params()).apply(tiny_model())
    assert [site.name for site in artplug.latent_sites(model)] == ["layer2"]


def test_example_capabilities(doc_module: types.ModuleType) -> None:
    perturbation = doc_module.CarriedSign(doc_module.CarriedSign.Params(replays=3))
    assert isinstance(perturbation, artplug.Replays) and perturbation.replays == 3
    assert isinstance(perturbation, artplug.AfterBackward)
    assert isinstance(perturbation, artplug.Stateful)
    assert isinstance(doc_module.LinearWarmup, artplug.ChecksRecipe)
    assert isinstance(doc_module.UnitOutputs, artplug.Staged)
