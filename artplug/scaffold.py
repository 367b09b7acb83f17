"""``artplug new-plugin``: write a working plugin package skeleton for one technique kind.

The skeleton is what docs/writing-plugins.md describes: a ``pyproject.toml`` with the
``artplug`` entry point, one module with a technique class (``Params``, docstring, a simple
but real behaviour), tests that run artplug's contract checks (:mod:`artplug.testing`), a
formula check and one training step through the engine, and a README. It passes its own tests
right after ``pip install -e``.

Names: technique ``NAME`` (kebab-case, e.g. ``my-loss``) lives in distribution
``artplug-NAME``, import package ``artplug_NAME`` (underscores) and entry point ``NAME``
(underscores), so it never shadows a built-in plugin's entry-point name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from artplug.errors import ArtplugError
from artplug.kinds import KINDS, RECIPE_TABLE, Kind
from artplug.plugins import HOOK_OF_KIND

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
"""A technique name: lowercase kebab-case, as :class:`artplug.registry.Registry` requires."""


@dataclass(frozen=True)
class Names:
    """The names one skeleton uses, all derived from the technique name."""

    technique: str
    kind: Kind

    @property
    def distribution(self) -> str:
        """The pip distribution name, ``artplug-<technique>``."""
        return f"artplug-{self.technique}"

    @property
    def module(self) -> str:
        """The import package, ``artplug_<technique with underscores>``."""
        return "artplug_" + self.technique.replace("-", "_")

    @property
    def entry_point(self) -> str:
        """The entry-point (plugin) name, shown by ``artplug plugins``."""
        return self.technique.replace("-", "_")

    @property
    def cls(self) -> str:
        """The technique class name (CamelCase of the technique name)."""
        return "".join(part.capitalize() for part in self.technique.split("-"))


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid technique name, else raise :class:`ArtplugError`."""
    if not NAME_PATTERN.match(name):
        raise ArtplugError(
            f"plugin name {name!r} must be lowercase kebab-case (letters, digits, '-'), "
            "starting with a letter, e.g. 'my-loss'"
        )
    return name


def new_plugin(name: str, kind: Kind, parent: Path) -> Path:
    """Write the skeleton of technique ``name`` of ``kind`` into ``parent/artplug-<name>``.

    Returns the package folder. Raises :class:`ArtplugError` for a bad name or kind, or when
    the folder exists already (nothing is overwritten).
    """
    if kind not in KINDS:
        raise ArtplugError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    names = Names(check_name(name), kind)
    root = parent / names.distribution
    if root.exists():
        raise ArtplugError(f"{root} exists already; pick another name or --dir")
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{names.module}/__init__.py": MODULE_HEAD + TECHNIQUES[kind] + MODULE_TAIL[kind],
        "tests/conftest.py": CONFTEST,
        f"tests/test_{names.entry_point}.py": TEST_HEAD + TESTS[kind],
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_fill(template, names))
    return root


def _fill(template: str, names: Names) -> str:
    # Plain token replacement: the templates are Python/TOML full of braces, so str.format
    # would need every brace doubled.
    for token, value in (
        ("__TECHNIQUE__", names.technique),
        ("__KIND__", names.kind),
        ("__DIST__", names.distribution),
        ("__MODULE__", names.module),
        ("__ENTRY__", names.entry_point),
        ("__TESTED__", names.cls + ("Transform" if names.kind == "transform" else "")),
        ("__CLASS__", names.cls),
        ("__IMPORTS__", IMPORTS[names.kind]),
        ("__TEST_IMPORTS__", TEST_IMPORTS[names.kind]),
        ("__TEST_HELPERS__", TEST_HELPERS[names.kind]),
        ("__CHECKER__", CHECKER[names.kind]),
        ("__REGISTRY_HOOK__", HOOK_OF_KIND[names.kind]),
        ("__RECIPE_KEY__", RECIPE_TABLE[names.kind]),
    ):
        template = template.replace(token, value)
    return template


CHECKER: dict[Kind, str] = {
    "perturbation": "check_perturbation",
    "loss": "check_loss_term",
    "transform": "check_model_transform",
    "schedule": "check_schedule",
}
PYPROJECT = """\
[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "__DIST__"
version = "0.1.0"
description = "The __TECHNIQUE__ __KIND__ for artplug"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["artplug", "torch", "pydantic>=2"]

[project.optional-dependencies]
test = ["pytest>=8"]

# artplug finds plugins through this entry-point group; the key is the plugin's name in
# `artplug plugins` and ARTPLUG_DISABLE_PLUGINS.
[project.entry-points.artplug]
__ENTRY__ = "__MODULE__"

[tool.setuptools]
packages = ["__MODULE__"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

README = """\
# __DIST__

The `__TECHNIQUE__` __KIND__ for [artplug](https://github.com/artplug/artplug), generated by
`artplug new-plugin __TECHNIQUE__ --kind __KIND__`. Replace the placeholder behaviour in
`__MODULE__/__init__.py` with your technique and its formula test in `tests/`.

```bash
pip install -e ".[test]"
pytest                     # artplug's contract checks, a formula check, one training step
artplug plugins            # lists __ENTRY__ (__DIST__ 0.1.0): __KIND__:__TECHNIQUE__
```

Use it in a recipe:

```toml
__RECIPE_KEY__
use = "__TECHNIQUE__"
```

See artplug's docs/writing-plugins.md for the contract of a __KIND__.
"""

MODULE_HEAD = '''\
"""The __TECHNIQUE__ __KIND__ for artplug (skeleton from ``artplug new-plugin``).

Replace the placeholder behaviour with your technique; keep ``name``, ``Params`` and the
registration hook at the bottom. The contract is in artplug's docs/writing-plugins.md.
"""

from __future__ import annotations

__IMPORTS__
from pydantic import BaseModel, ConfigDict, Field

import artplug

'''
# Each skeleton imports only what its technique uses, so it passes a linter as generated.
IMPORTS: dict[Kind, str] = {
    "loss": "import torch.nn.functional as F\nfrom torch import Tensor\n",
    "perturbation": "import torch\nimport torch.nn.functional as F\nfrom torch import Tensor, nn\n",
    "transform": "from torch import Tensor, nn\n",
    "schedule": "",
}

TECHNIQUES: dict[Kind, str] = {
    "loss": '''
class __CLASS__:
    """Cross-entropy on adversarial logits, times ``scale`` (placeholder: edit me)."""

    name = "__TECHNIQUE__"
    # The forward passes the engine runs before calling the term: "clean" and/or "adv".
    needs = frozenset({"adv"})

    class Params(BaseModel):
        """The recipe keys of this loss term's ``[[loss]]`` table."""

        model_config = ConfigDict(extra="forbid", frozen=True)
        scale: float = Field(1.0, ge=0.0)

    def __init__(self, params: Params) -> None:
        self.params = params

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> Tensor:
        """A finite, differentiable 0-dim tensor; never call backward() here."""
        assert out.logits_adv is not None  # guaranteed by needs = {"adv"}
        logits = artplug.full_precision(out.logits_adv)
        return self.params.scale * F.cross_entropy(logits, out.y)
''',
    "perturbation": '''
class __CLASS__:
    """One signed-gradient step from a random start in the threat ball (placeholder: edit me)."""

    name = "__TECHNIQUE__"

    class Params(BaseModel):
        """The recipe keys of this perturbation's ``[perturbation]`` table."""

        model_config = ConfigDict(extra="forbid", frozen=True)
        step_fraction: float = Field(1.25, gt=0.0, description="step size as a fraction of eps")

    def __init__(self, params: Params) -> None:
        self.params = params

    def generate(self, model: nn.Module, x: Tensor, y: Tensor, state: artplug.StepState) -> Tensor:
        """A detached batch in [0, 1] inside ``state.threat``'s ball; no ``.grad`` on weights."""
        threat = state.threat
        x_adv = artplug.random_start(x, threat).requires_grad_(True)
        loss = F.cross_entropy(artplug.full_precision(model(x_adv)), y)
        # Gradient with respect to the input only, so no parameter gets a .grad.
        (grad,) = torch.autograd.grad(loss, x_adv)
        step = artplug.ascent_step(grad, self.params.step_fraction * threat.eps, threat.norm)
        return artplug.project(x_adv.detach() + step, x, threat).detach()
''',
    "transform": '''
class __CLASS__(nn.Module):
    """Divides the model's logits by a fixed temperature (placeholder: edit me)."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped model's logits divided by the temperature (shape unchanged)."""
        return self.model(x) / self.temperature


class __CLASS__Transform:
    """Wraps the network so its logits are divided by ``temperature`` (placeholder: edit me)."""

    name = "__TECHNIQUE__"

    class Params(BaseModel):
        """The recipe keys of this transform's ``[[transform]]`` table."""

        model_config = ConfigDict(extra="forbid", frozen=True)
        temperature: float = Field(1.0, gt=0.0)

    def __init__(self, params: Params) -> None:
        self.params = params

    def apply(self, model: nn.Module) -> nn.Module:
        """Called once, before the optimizer exists: new parameters would be trained too."""
        return __CLASS__(model, self.params.temperature)
''',
    "schedule": '''
class __CLASS__:
    """Linear learning-rate warm-up over the first ``warmup_epochs`` (placeholder: edit me)."""

    name = "__TECHNIQUE__"

    class Params(BaseModel):
        """The recipe keys of this schedule's ``[[schedule]]`` table."""

        model_config = ConfigDict(extra="forbid", frozen=True)
        warmup_epochs: float = Field(1.0, gt=0.0)

    def __init__(self, params: Params) -> None:
        self.params = params

    def knobs(self) -> frozenset[str]:
        """The knobs this schedule sets (``lr_scale`` multiplies ``[optim] lr``)."""
        return frozenset({"lr_scale"})

    def values(self, progress: artplug.Progress) -> dict[str, float]:
        """A pure function of ``progress``: resuming a run needs no schedule state."""
        return {"lr_scale": min(1.0, (progress.epoch_float + 1e-3) / self.params.warmup_epochs)}
''',
}

_REGISTER = '''

@artplug.hookimpl
def __REGISTRY_HOOK__(register: artplug.Register) -> None:
    """Register this package's technique with artplug (called once per process)."""
    register(__REGISTERED__)
'''
MODULE_TAIL: dict[Kind, str] = {
    kind: _REGISTER.replace(
        "__REGISTERED__", "__CLASS__Transform" if kind == "transform" else "__CLASS__"
    )
    for kind in KINDS
}

TEST_IMPORTS: dict[Kind, str] = {
    "loss": "import torch\nimport torch.nn.functional as F\n",
    "perturbation": "import torch\n",
    "transform": "import torch\n",
    "schedule": "",
}
TEST_HELPERS: dict[Kind, str] = {
    "loss": "digits_recipe, make_state, tiny_batch, tiny_model",
    "perturbation": "digits_recipe, make_state, tiny_batch, tiny_model",
    "transform": "digits_recipe, tiny_batch, tiny_model",
    "schedule": "digits_recipe",
}

CONFTEST = '''\
"""artplug's test fixtures (``plugin_set``: the installed plugins, loaded strictly)."""

pytest_plugins = ["artplug.testing"]
'''

TEST_HEAD = '''\
"""Tests of the __TECHNIQUE__ __KIND__: artplug's contract checks, a formula check, and one
training step through artplug's engine with the technique picked by name from a recipe."""

from __future__ import annotations

__TEST_IMPORTS__
import artplug
from artplug.engine import build, train_step
from artplug.recipe import resolve
from artplug.testing import __CHECKER__, __TEST_HELPERS__

from __MODULE__ import __TESTED__


def _one_step(plugin_set, **sections) -> None:
    """Resolve a tiny digits recipe with ``sections`` and run one optimizer step."""
    components = build(resolve(digits_recipe(**sections), plugin_set.registries))
    x, y = next(iter(components.train_loader))
    train_step(components, x, y, artplug.Progress(0, 0, 10, 100))

'''

TESTS: dict[Kind, str] = {
    "loss": """
def test_contract():
    __CHECKER__(__CLASS__)


def test_registered(plugin_set):
    assert plugin_set.registries.loss.get("__TECHNIQUE__").cls is __CLASS__


def test_formula():
    model = tiny_model()
    x, y = tiny_batch()
    logits = model(x)
    out = artplug.Outputs(x, y, x, None, logits)
    term = __CLASS__(__CLASS__.Params(scale=2.0))
    value = term(out, make_state(model, artplug.Threat("linf", 0.1)))
    torch.testing.assert_close(value, 2.0 * F.cross_entropy(logits, y))


def test_one_training_step(plugin_set):
    _one_step(plugin_set, loss=[{"use": "__TECHNIQUE__"}])
""",
    "perturbation": """
def test_contract():
    __CHECKER__(__CLASS__)


def test_registered(plugin_set):
    assert plugin_set.registries.perturbation.get("__TECHNIQUE__").cls is __CLASS__


def test_formula():
    # With a step of 2 eps from anywhere in the L-inf ball, every pixel ends on the ball's edge
    # or on the [0, 1] boundary.
    model = tiny_model().eval()
    x, y = tiny_batch()
    threat = artplug.Threat("linf", 0.1)
    attack = __CLASS__(__CLASS__.Params(step_fraction=2.0))
    delta = (attack.generate(model, x, y, make_state(model, threat)) - x).abs()
    at_edge = torch.isclose(delta, torch.tensor(0.1), atol=1e-6)
    clipped = (x + delta >= 1 - 1e-6) | (x - delta <= 1e-6)
    assert (at_edge | clipped).all()


def test_one_training_step(plugin_set):
    _one_step(plugin_set, perturbation={"use": "__TECHNIQUE__"})
""",
    "transform": """
def test_contract():
    __CHECKER__(__CLASS__Transform)


def test_registered(plugin_set):
    entry = plugin_set.registries.transform.get("__TECHNIQUE__")
    assert entry.cls is __CLASS__Transform


def test_formula():
    model = tiny_model().eval()
    x, _ = tiny_batch()
    params = __CLASS__Transform.Params(temperature=2.0)
    wrapped = __CLASS__Transform(params).apply(model)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x) / 2.0)


def test_one_training_step(plugin_set):
    _one_step(plugin_set, transform=[{"use": "__TECHNIQUE__"}])
""",
    "schedule": """
def test_contract():
    __CHECKER__(__CLASS__)


def test_registered(plugin_set):
    assert plugin_set.registries.schedule.get("__TECHNIQUE__").cls is __CLASS__


def test_formula():
    schedule = __CLASS__(__CLASS__.Params(warmup_epochs=2.0))
    half = schedule.values(artplug.Progress(epoch=0, step=10, steps_per_epoch=10, total_steps=100))
    done = schedule.values(artplug.Progress(epoch=3, step=30, steps_per_epoch=10, total_steps=100))
    assert 0.4 < half["lr_scale"] < 0.6 and done["lr_scale"] == 1.0


def test_one_training_step(plugin_set):
    _one_step(plugin_set, schedule=[{"use": "__TECHNIQUE__"}])
""",
}
