"""Every registered technique (built-in or installed) passes the contract of its kind."""

from __future__ import annotations

import pytest

from artplug.kinds import KINDS
from artplug.plugins import load_plugins
from artplug.testing import CHECKERS

_REGISTRIES = load_plugins(disabled=(), strict=True).registries
ENTRIES = [entry for kind in KINDS for entry in _REGISTRIES.of(kind)]


@pytest.mark.parametrize("entry", ENTRIES, ids=[f"{e.kind}:{e.name}" for e in ENTRIES])
def test_contract(entry):
    CHECKERS[entry.kind](entry.cls)


def test_builtin_stack_is_complete():
    names = {f"{e.kind}:{e.name}" for e in ENTRIES}
    expected = {
        "perturbation:none",
        "perturbation:fgsm",
        "perturbation:pgd",
        "loss:cross-entropy",
        "schedule:piecewise-lr",
        "schedule:cosine-lr",
        "schedule:cyclic-lr",
        "schedule:linear-eps-warmup",
    }
    assert expected <= names
