"""Bad input gets one ``Error:`` line and exit code 2, never a traceback.

The explicit cases reproduce the failures of issue 10 (item 7): non-finite or negative radii,
out-of-range seeds, values of the wrong TOML type, an unusable ``run.out_dir`` and a loss term
that breaks its contract. The property-based tests (hypothesis) then mutate the quickstart recipe
and ``--set`` values at random and run ``artplug validate`` in-process on each.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

import artplug
from artplug import cli
from artplug.engine import build, train_step
from artplug.errors import PluginError, RecipeError
from artplug.kinds import Progress
from artplug.plugins import load_plugins
from artplug.recipe import dumps_toml, resolve
from artplug.testing import digits_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"
SHIPPED = sorted([*ROOT.glob("recipes/*.toml"), *ROOT.glob("recipes/digits/*.toml")])


def validate(*args: str) -> tuple[int, str, str]:
    """``artplug validate ARGS`` in-process: (exit code, stdout, stderr).

    Anything but SystemExit escaping ``main`` is a bug and fails the test with its traceback.
    """
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(["validate", *args])
        except SystemExit as exc:
            code = exc.code or 0
    return int(code), out.getvalue(), err.getvalue()


def assert_clean_outcome(code: int, out: str, err: str) -> None:
    """Exit 0, or exit 2 with exactly one ``Error:`` line on stderr; never a traceback."""
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if not line.startswith("Warning:")]
    if code == 0:
        assert not lines, err
        return
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("Error: "), err


def assert_one_error(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("Warning:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# Explicit reproductions


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("threat.eps=inf", "threat.eps: Input should be a finite number"),
        ("threat.eps=nan", "threat.eps: Input should be a finite number"),
        ("threat.eps=-inf", "threat.eps: Input should be a finite number"),
        ("threat.eps=-0.1", "threat.eps: Input should be greater than or equal to 0"),
        ("optim.lr=inf", "optim.lr: Input should be a finite number"),
        ("run.seed=-1", "run.seed: Input should be greater than or equal to 0"),
        ("run.seed=9223372036854775808", "run.seed: Input should be less than"),
        ("run.seed=18446744073709551616", "run.seed: Input should be less than"),
        ('run.epochs="1"', 'run.epochs: Input should be a valid integer (got the string "1")'),
        ("run.epochs=1.0", "run.epochs: Input should be a valid integer (got the float 1.0)"),
        ("run.epochs=true", "run.epochs: Input should be a valid integer (got the boolean true)"),
        ('optim.lr="0.1"', 'optim.lr: Input should be a valid number (got the string "0.1")'),
        ('data.download="yes"', "data.download: Input should be a valid boolean"),
        ("run.threads=-1", "run.threads: Input should be greater than or equal to 0"),
        ('perturbation.steps="3"', "perturbation (pgd).steps: Input should be a valid integer"),
        ("perturbation.steps=3.0", "perturbation (pgd).steps: Input should be a valid integer"),
        ("perturbation.step_size=inf", "perturbation (pgd).step_size: must be a finite number"),
        ('loss.0.label_smoothing="0"', "loss[0] (cross-entropy).label_smoothing: Input should"),
    ],
)
def test_bad_values_are_one_line_errors(override, needle):
    code, _, err = validate(str(QUICKSTART), "--set", override)
    assert_one_error(code, err, needle)


@pytest.mark.parametrize(
    ("override", "resolved"),
    [
        ("threat.eps=1", "eps = 1.0"),
        ("optim.lr=1", "lr = 1.0"),
        ("run.seed=9223372036854775807", "seed = 9223372036854775807"),
        ("run.seed=0", "seed = 0"),
        ("run.threads=2", "threads = 2"),
    ],
)
def test_good_edges_still_validate(override, resolved):
    """An int where a float is expected is fine (TOML ``eps = 1``); the seed range is inclusive."""
    code, out, err = validate(str(QUICKSTART), "--set", override)
    assert code == 0, err
    assert f"\n{resolved}\n" in out


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipes_validate_strictly(path):
    code, _, err = validate(str(path))
    assert code == 0, err


def test_out_dir_under_a_regular_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out_dir = blocker / "runs"
    code, _, err = validate(str(QUICKSTART), "--set", f'run.out_dir="{out_dir}"')
    line = assert_one_error(
        code, err, "run.out_dir:", "is a file, not a folder", "--set run.out_dir"
    )
    assert str(blocker) in line
    code, _, err = validate(str(QUICKSTART), "--set", f'run.out_dir="{blocker}"')
    assert_one_error(code, err, "run.out_dir:", "is a file, not a folder")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write to read-only folders"
)
def test_out_dir_in_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code, _, err = validate(str(QUICKSTART), "--set", f'run.out_dir="{locked / "runs"}"')
        assert_one_error(code, err, "run.out_dir:", "not writable")
    finally:
        locked.chmod(stat.S_IRWXU)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("[=1", "--set [=1: expected KEY=VALUE"),
        (".=1", "--set .=1: expected KEY=VALUE"),
        ("loss.5=1", "loss.5: the recipe has only 1 such table(s)"),
        ("loss.\u00b2.weight=1", "expected an index like loss.0.weight"),
        ("run.name.x=1", "run.name is not a table"),
    ],
)
def test_malformed_set_keys_are_one_line_errors(override, needle):
    code, _, err = validate(str(QUICKSTART), "--set", override)
    assert_one_error(code, err, needle)


def test_integer_too_long_for_python_is_an_error(tmp_path):
    """tomllib raises a plain ValueError (not TOMLDecodeError) for an int of > 4300 digits."""
    recipe = tmp_path / "huge.toml"
    recipe.write_text(f"[run]\nseed = {'1' * 5000}\n", encoding="utf-8")
    code, _, err = validate(str(recipe))
    assert_one_error(code, err, "invalid TOML value: Exceeds the limit")
    code, _, err = validate(str(QUICKSTART), "--set", f"run.seed={'1' * 5000}")
    line = assert_one_error(code, err, "--set run.seed=111", "...: Exceeds the limit")
    assert len(line) < 400


def test_undecodable_set_value_is_an_error():
    """Bytes that are not UTF-8 reach Python as lone surrogates; the resolved recipe (UTF-8)
    could not be written with them."""
    code, _, err = validate(str(QUICKSTART), "--set", "run.name=ab\udcff")
    assert_one_error(code, err, "--set", "not valid UTF-8")


def test_validate_creates_no_folders(tmp_path):
    out_dir = tmp_path / "deep" / "er" / "runs"
    code, _, err = validate(str(QUICKSTART), "--set", f'run.out_dir="{out_dir}"')
    assert code == 0, err
    assert not (tmp_path / "deep").exists()


def test_out_dir_is_not_checked_when_resolving_a_stored_recipe(plugin_set, tmp_path):
    """A checkpoint's recipe may name another machine's folder; eval and resume never use it."""
    blocker = tmp_path / "f"
    blocker.write_text("")
    raw = digits_recipe(run={"name": "t", "epochs": 1, "out_dir": str(blocker / "runs")})
    resolve(raw, plugin_set.registries)
    with pytest.raises(RecipeError, match=r"run\.out_dir"):
        resolve(raw, plugin_set.registries, check_out_dir=True)


# --------------------------------------------------------------------------------------------
# Loss terms that break their contract (0-dim, differentiable) are named on the first step


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PerExample:
    """Per-example cross-entropy (forgot the mean)."""

    name = "per-example"
    needs = frozenset({"adv"})
    Params = _Params

    def __init__(self, params: _Params) -> None:
        self.params = params

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> torch.Tensor:
        assert out.logits_adv is not None
        return torch.nn.functional.cross_entropy(out.logits_adv, out.y, reduction="none")


class Detached(PerExample):
    """Cross-entropy cut off from the graph."""

    name = "detached"

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> torch.Tensor:
        assert out.logits_adv is not None
        return torch.nn.functional.cross_entropy(out.logits_adv.detach(), out.y)


class PlainFloat(PerExample):
    """Cross-entropy as a Python float."""

    name = "plain-float"

    def __call__(self, out: artplug.Outputs, state: artplug.StepState) -> Any:
        assert out.logits_adv is not None
        return float(torch.nn.functional.cross_entropy(out.logits_adv.detach(), out.y))


class BadTermsPlugin:
    @staticmethod
    @artplug.hookimpl
    def register_loss_terms(register):
        register(PerExample)
        register(Detached)
        register(PlainFloat)


@pytest.fixture(scope="module")
def bad_plugins():
    return load_plugins(disabled=(), extra=[("bad-terms", BadTermsPlugin())], strict=True)


def _recipe(use: str) -> dict[str, Any]:
    return digits_recipe(
        perturbation={"use": "none"},
        loss=[{"use": "cross-entropy"}, {"use": use, "weight": 0.5}],
    )


@pytest.mark.parametrize(
    ("use", "needle"),
    [
        ("per-example", "returned a tensor of shape (64,)"),
        ("detached", "has no gradient path"),
        ("plain-float", "returned float, not a tensor"),
    ],
)
def test_broken_loss_term_is_named_on_the_first_step(bad_plugins, use, needle):
    c = build(resolve(_recipe(use), bad_plugins.registries))
    x, y = next(iter(c.train_loader))
    with pytest.raises(PluginError) as info:
        train_step(c, x, y, Progress(0, 0, 10, 10))
    message = info.value.one_line()
    assert f"loss[1] ({use})" in message and needle in message, message
    assert "plugin 'bad-terms' (not from an installed distribution)" in message, message


def test_loss_check_names_distribution_and_version(plugin_set):
    """A built-in term is reported with artplug's distribution and version."""
    c = build(resolve(digits_recipe(perturbation={"use": "none"}), plugin_set.registries))
    c.losses[0].term = Detached(_Params())  # type: ignore[assignment]
    x, y = next(iter(c.train_loader))
    with pytest.raises(PluginError) as info:
        train_step(c, x, y, Progress(0, 0, 10, 10))
    message = info.value.one_line()
    assert f"from artplug {artplug.__version__}" in message, message
    assert "loss[0] (cross-entropy)" in message


def test_loss_check_runs_on_the_first_step_only(plugin_set):
    c = build(resolve(digits_recipe(perturbation={"use": "none"}), plugin_set.registries))
    x, y = next(iter(c.train_loader))
    train_step(c, x, y, Progress(0, 0, 10, 10))
    assert c.loss_terms_checked
    # Once checked, the step trusts the terms (no per-step overhead); backward then fails as
    # torch's own error, which is what a term that changes its behaviour later gets.
    c.losses[0].term = PlainFloat(_Params())  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        train_step(c, x, y, Progress(0, 1, 10, 10))


def test_broken_loss_term_in_artplug_run_is_one_line(bad_plugins, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "load_plugins", lambda: bad_plugins)
    recipe = tmp_path / "bad.toml"
    recipe.write_text(dumps_toml(_recipe("per-example")))
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as info,
    ):
        cli.main(["run", str(recipe), "--no-track", "-q", "--set", f'run.out_dir="{tmp_path}"'])
    assert "Traceback" not in err.getvalue()
    assert_one_error(
        int(info.value.code or 0), err.getvalue(), "loss[1] (per-example)", "bad-terms"
    )


# --------------------------------------------------------------------------------------------
# Property-based: random mutations of the quickstart recipe and random --set values

BASE: dict[str, Any] = tomllib.loads(QUICKSTART.read_text(encoding="utf-8"))
TECHNIQUE_NAMES = ["pgd", "none", "trades", "cross-entropy", "cosine-lr", "fgsm", "hypersphere"]


def _leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _leaf_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*prefix, index)
            yield from _leaf_paths(value, (*prefix, index))


PATHS = sorted(_leaf_paths(BASE), key=repr)
SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, -0.0, 1e308, 5e-324]),
    st.booleans(),
    st.text(max_size=8),
    st.sampled_from(["1", "0.1", "true", "cpu", "none", "linf", *TECHNIQUE_NAMES, "pgdd"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(["use", "eps", "x", "steps", "weight", "id"]), inner, max_size=3
        ),
    ),
    max_leaves=5,
)
KEYS = st.one_of(
    st.sampled_from(["use", "nope", "eps", "steps", "weight", "id"]), st.text(max_size=6)
)


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    node = data
    for part in path[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


@st.composite
def mutated_recipes(draw: st.DrawFn) -> dict[str, Any]:
    """The quickstart recipe with one to three random mutations."""
    data: Any = tomllib.loads(QUICKSTART.read_text(encoding="utf-8"))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = _parent(data, path)
        if not isinstance(parent, dict | list):
            continue  # an earlier mutation replaced or removed a table on this path
        key = path[-1]
        if isinstance(parent, dict) and key not in parent:
            continue
        if isinstance(parent, list) and not (isinstance(key, int) and key < len(parent)):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add-key", "technique"]))
        if action == "replace":
            parent[key] = draw(VALUES)
        elif action == "delete":
            del parent[key]
        elif action == "add-key" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
        elif action == "technique":
            table = draw(st.sampled_from(["perturbation", "loss", "schedule", "transform"]))
            use = draw(st.one_of(st.sampled_from(TECHNIQUE_NAMES), st.text(max_size=8)))
            if table == "perturbation":
                data[table] = {"use": use}
            else:
                data[table] = [{"use": use}]
    return dict(data)


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in path)


SET_KEYS = st.one_of(
    st.sampled_from([_dotted(p) for p in PATHS]),
    st.sampled_from(["run.threads", "loss[0].weight", "loss[9].x", "loss.x", "run", "", "a.b"]),
    st.sampled_from(["[", ".", "[]", "loss.5", "loss.1", "loss.\u00b2", "perturbation.0"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz.[]0129_-=", max_size=12),
)
SET_VALUES = st.one_of(
    st.sampled_from(["1", "-1", "0.5", "inf", "nan", "-inf", "true", '"1"', "[1, 2]", "{x = 1}"]),
    st.sampled_from(["[", "]", '"', "'", "{", "1e999", "99999999999999999999999", "= 1", ""]),
    st.text(alphabet="abc01.,-+e[]{}\"'= :_nif", max_size=12),
    st.text(max_size=8),
)


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(recipe=mutated_recipes())
def test_mutated_recipes_never_show_a_traceback(recipe):
    with tempfile.TemporaryDirectory(prefix="artplug-prop-") as folder:
        path = Path(folder) / "recipe.toml"
        try:
            text = dumps_toml(recipe)
        except TypeError:
            return  # the writer only handles plain data; hypothesis made something else
        path.write_text(text, encoding="utf-8")
        code, out, err = validate(str(path))
    assert_clean_outcome(code, out, err)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    sets=st.lists(
        st.one_of(
            st.tuples(SET_KEYS, SET_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
            st.text(max_size=10),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_random_set_values_never_show_a_traceback(sets):
    args = [str(QUICKSTART)]
    for item in sets:
        args += ["--set", item]
    code, out, err = validate(*args)
    assert_clean_outcome(code, out, err)


QUICKSTART_TEXT = QUICKSTART.read_text(encoding="utf-8")


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(
    at=st.integers(0, len(QUICKSTART_TEXT)),
    cut=st.integers(0, 20),
    insert=st.one_of(
        st.text(alphabet="[]{}\"'=.,#\n \\abc019-+_eEinfa", max_size=12), st.text(max_size=6)
    ),
)
def test_edited_recipe_text_never_shows_a_traceback(at, cut, insert):
    """Raw text edits of the file: TOML syntax errors, broken strings, stray brackets."""
    text = QUICKSTART_TEXT[:at] + insert + QUICKSTART_TEXT[at + cut :]
    with tempfile.TemporaryDirectory(prefix="artplug-prop-") as folder:
        path = Path(folder) / "recipe.toml"
        path.write_text(text, encoding="utf-8")
        code, out, err = validate(str(path))
    assert_clean_outcome(code, out, err)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(recipe=mutated_recipes())
def test_what_validates_round_trips(recipe):
    """The resolved recipe that ``validate`` prints validates again to the same text."""
    with tempfile.TemporaryDirectory(prefix="artplug-prop-") as folder:
        path = Path(folder) / "recipe.toml"
        try:
            path.write_text(dumps_toml(recipe), encoding="utf-8")
        except (TypeError, UnicodeEncodeError):
            return
        code, out, _ = validate(str(path))
        if code != 0:
            return
        again = Path(folder) / "again.toml"
        again.write_text(out, encoding="utf-8")
        code2, out2, err2 = validate(str(again))
    assert code2 == 0, err2
    assert out2.split("\n", 1)[1] == out.split("\n", 1)[1]


TEXT = st.text(max_size=8)  # any Unicode but lone surrogates, control characters included
PLAIN = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    TEXT,
    st.lists(st.one_of(st.integers(-5, 5), TEXT), max_size=3),
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    data=st.dictionaries(
        TEXT,
        st.one_of(
            st.dictionaries(TEXT, PLAIN, max_size=3),
            st.lists(st.dictionaries(TEXT, PLAIN, min_size=1, max_size=3), min_size=1, max_size=2),
        ),
        max_size=3,
    )
)
def test_toml_writer_round_trips_any_text(data):
    """What the resolved recipe is written with re-reads to the same data (keys and strings)."""
    assert tomllib.loads(dumps_toml(data)) == data
