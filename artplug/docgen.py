"""Technique help and the generated technique reference, written from one source.

``artplug list NAME`` prints :func:`render_text` of one technique; ``python -m artplug.docgen``
writes ``docs/techniques/reference.md`` (:func:`render_reference`) for every built-in technique,
and ``python -m artplug.docgen --check`` only says whether that file is up to date (the test
suite runs the same comparison). Both come from :func:`describe`, which reads only what the
technique class itself carries, so the help and the page cannot drift from the code:

- the class docstring (first line: the summary that ``artplug list`` shows) and the optional
  ``paper`` attribute (the publication it implements);
- the ``Params`` model: every field's type, constraints, default and ``description``;
- the capabilities the engine looks for (a transform's ``stage``, a loss term's ``needs``,
  a perturbation's replays, input-gradient hook and checkpointed state, a transform's update
  hook, the knobs a schedule sets);
- the rules the recipe validator enforces, found by validating small probe recipes: the
  technique alone, then with each other installed technique added, in train mode and under an
  L2 threat. Whatever the validator reports that the technique's presence causes is a rule
  (``check_recipe`` reasons, transform stage order, schedule knobs); rules inside a ``Params``
  model that only some parameter values break are not probed (the defaults are used);
- an example: the technique's table with every parameter at its default, plus the fewest other
  techniques the validator asks for, as a complete recipe that ``artplug validate`` accepts.

Importing this module does not import ART or MLflow.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from artplug.errors import ArtplugError, RecipeError, did_you_mean
from artplug.kinds import KINDS, RECIPE_TABLE, TRANSFORM_STAGES, Kind, transform_stage
from artplug.recipe import RESERVED_KEYS, resolve, toml_key, toml_value
from artplug.registry import Entry, Registries

REFERENCE = Path("docs") / "techniques" / "reference.md"
"""The generated page, relative to the repository root."""
COMMAND = "python -m artplug.docgen"
"""The command that regenerates :data:`REFERENCE`."""

KIND_HEADINGS: dict[Kind, str] = {
    "perturbation": "Perturbations",
    "loss": "Loss terms",
    "transform": "Model transforms",
    "schedule": "Schedules",
}

# The probe recipes: an attack and a loss, every fixed table at its default. A technique under
# study replaces the part of its kind (a perturbation, the loss) or is added (a transform, a
# schedule).
_GENERIC: dict[str, Any] = {"perturbation": {"use": "pgd"}, "loss": [{"use": "cross-entropy"}]}
_SETTINGS: tuple[tuple[str, str, Any], ...] = (
    ('[perturbation] model_mode = "train"', "perturbation.model_mode", "train"),
    ('[threat] norm = "l2"', "threat.norm", "l2"),
)


@dataclass(frozen=True)
class ParamDoc:
    """One recipe key of a technique's table: its type, default and meaning."""

    key: str
    type: str
    default: str
    meaning: str


@dataclass(frozen=True)
class TechniqueDoc:
    """Everything the help and the reference say about one technique.

    ``requirements`` are the validator's problems with the technique alone in a probe recipe
    (what it needs); ``rules`` the problems its presence causes in combination, each prefixed
    with the combination (``with loss trades: ...``); ``example`` a complete recipe (TOML) that
    validates.
    """

    kind: Kind
    name: str
    plugin: str
    summary: str
    description: str
    paper: str
    params: tuple[ParamDoc, ...]
    engine_keys: tuple[ParamDoc, ...]
    capabilities: tuple[str, ...]
    requirements: tuple[str, ...]
    rules: tuple[str, ...]
    example: str


# --------------------------------------------------------------------------------------------
# Reading a technique


def describe(entry: Entry, registries: Registries) -> TechniqueDoc:
    """The documentation of the registered technique ``entry``, probed against ``registries``."""
    doc = inspect.getdoc(entry.cls) or ""
    summary, _, rest = doc.strip().partition("\n")
    prober = _Prober(registries)
    requirements, rules, example = prober.probe(entry)
    return TechniqueDoc(
        kind=entry.kind,
        name=entry.name,
        plugin=entry.plugin,
        summary=_plain(summary.strip()),
        description=_plain(rest.strip()),
        paper=entry.paper,
        params=tuple(_param_docs(entry.cls.Params)),
        engine_keys=tuple(_engine_keys(entry)),
        capabilities=tuple(_capabilities(entry)),
        requirements=tuple(requirements),
        rules=tuple(rules),
        example=example,
    )


def find(registries: Registries, name: str) -> list[Entry]:
    """The techniques called ``name`` in every kind (a name may exist in more than one).

    Raises :class:`ArtplugError` with a did-you-mean when no kind has it.
    """
    found = [registries.of(kind).get(name) for kind in KINDS if name in registries.of(kind)]
    if found:
        return found
    every = sorted({e.name for kind in KINDS for e in registries.of(kind)})
    hint = did_you_mean(name, [*every, *KINDS], n=3, cutoff=0.5, sentence=True)
    raise ArtplugError(
        f"no technique named {name!r}.{hint} 'artplug list' shows the installed ones; "
        f"'artplug list KIND' one kind ({', '.join(KINDS)})"
    )


def _plain(text: str) -> str:
    """Docstring text with reST literals (````x````) as Markdown ones (```x```)."""
    return re.sub(r":[a-z]+:`", "`", text.replace("``", "`"))


def _param_docs(model: type[BaseModel], prefix: str = "") -> Iterable[ParamDoc]:
    """One row per field of ``model``; a nested model's fields follow as ``field.sub``."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        yield ParamDoc(key, _type_text(info), _default_text(info), _plain(info.description or ""))
        nested = _nested_model(info.annotation)
        if nested is not None:
            yield from _param_docs(nested, f"{key}.")


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _type_text(info: FieldInfo) -> str:
    """``integer, >= 1``; ``float, optional``; ``"a" | "b"``; ``table, optional``."""
    annotation = info.annotation
    optional = type(None) in get_args(annotation) and get_origin(annotation) in (
        Union,
        types.UnionType,
    )
    parts = [_type_name(annotation)]
    for item in info.metadata:
        for attribute, sign in _BOUNDS:
            bound = getattr(item, attribute, None)
            if bound is not None:
                parts.append(f"{sign} {toml_value(bound)}")
    if optional:
        parts.append("optional")
    return ", ".join(parts)


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(toml_value(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple, set, frozenset):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "table"
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    if isinstance(annotation, type) and annotation in names:
        return names[annotation]
    return str(annotation).replace("typing.", "")


def _default_value(info: FieldInfo) -> Any:
    """The field's default as plain data; ``None`` when it has none (or it is None)."""
    if info.is_required():
        return None
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = _default_value(info)
    return "not set" if value is None else toml_value(value)


def _engine_keys(entry: Entry) -> Iterable[ParamDoc]:
    """The keys of the table that the engine reads itself (not the technique's Params)."""
    yield ParamDoc("use", "string", "required", f"the technique's name, {entry.name!r}")
    for key in RESERVED_KEYS[entry.kind][1:]:
        if key == "model_mode":
            yield ParamDoc(
                key,
                '"eval" | "train"',
                '"eval"',
                "the model's mode while the perturbation runs (BatchNorm statistics, dropout)",
            )
        elif key == "id":
            yield ParamDoc(
                key,
                "string",
                "the use name",
                "the term's name in metrics and knobs (loss.<id>.weight); unique per recipe",
            )
        elif key == "weight":
            yield ParamDoc(
                key, "float", "1.0", "the term's factor in the training loss sum(weight * term)"
            )


def _capabilities(entry: Entry) -> Iterable[str]:
    """What the engine does differently for this class (from the attributes it checks)."""
    cls = entry.cls
    # Knob values are numbers: only integer and float fields (optional ones too) can take one.
    numeric = [name for name, info in cls.Params.model_fields.items() if _numeric(info.annotation)]
    if entry.kind == "perturbation":
        if hasattr(cls, "replays"):
            yield (
                "replays each minibatch for several optimizer steps (`replays`); the engine "
                "runs `generate` once per replay"
            )
        if callable(getattr(cls, "after_backward", None)):
            yield (
                "receives the input gradient of every weight update (`after_backward`), so "
                "the engine makes the training input require grad"
            )
        if callable(getattr(cls, "state_dict", None)):
            yield "keeps state across steps that checkpoints save and `artplug resume` restores"
        if numeric:
            knobs = ", ".join(f"`perturbation.{n}`" for n in numeric)
            yield f"knobs a schedule may set: {knobs}"
    elif entry.kind == "loss":
        yield _needs_text(entry)
        knobs = ", ".join(f"`loss.<id>.{n}`" for n in ["weight", *numeric])
        yield f"knobs a schedule may set: {knobs} (`<id>` = the term's id)"
    elif entry.kind == "transform":
        stage = transform_stage(cls)
        order = " -> ".join(TRANSFORM_STAGES)
        if stage is None:
            yield "no stage: may be listed anywhere among the transforms"
        else:
            yield (
                f"stage {stage!r}: transforms are listed, and applied, in stage order {order}; "
                "the validator rejects a transform of an earlier stage listed after it"
            )
        if callable(getattr(cls, "before_update", None)) and callable(
            getattr(cls, "after_backward_update", None)
        ):
            yield "changes the weights around every update (`before_update`, then restores them)"
    elif entry.kind == "schedule":
        try:
            knobs_set = sorted(cls(cls.Params()).knobs())
        except Exception:  # a schedule without usable defaults: say nothing rather than guess
            knobs_set = []
        if knobs_set:
            names = ", ".join(f"`{k}`" for k in knobs_set)
            yield (
                f"sets the knobs {names} (with its defaults); no other schedule of the recipe "
                "may set them"
            )
    if isinstance(getattr(cls, "check_recipe", None), types.MethodType):
        yield "checks the recipe it is in (`check_recipe`): see the rules below"


def _numeric(annotation: Any) -> bool:
    """Whether a field holds an integer or a float (or None): what a knob can set."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return len(args) == 1 and _numeric(args[0])
    return annotation in (int, float)


def _needs_text(entry: Entry) -> str:
    needs = getattr(entry.cls, "needs", None)
    if needs is None:
        try:  # needs set per instance from the Params (cross-entropy's `on`)
            needs = entry.cls(entry.cls.Params()).needs
        except Exception:
            needs = None
        if needs is None:
            return "forward passes it needs: set per instance"
        passes = " and ".join(sorted(needs))
        return f"forward passes it needs: {passes} (with its defaults; depends on its parameters)"
    return f"forward passes it needs: {' and '.join(sorted(needs)) or 'none'}"


# --------------------------------------------------------------------------------------------
# Probing the validator


# "loss[1] (trades).beta: ..." -> use "trades", rest ".beta: ..."; a technique's problems are
# compared by name, since adding a technique can shift the index of another.
_TECHNIQUE_PROBLEM = re.compile(r"^(?:[a-z]+)(?:\[\d+\])? \((?P<use>[^)]+)\)(?P<rest>.*)$", re.S)


def _normalise(problem: str) -> str:
    """``problem`` without what depends on the probe recipe: the index, the knob list."""
    match = _TECHNIQUE_PROBLEM.match(problem)
    text = f"{match['use']}{match['rest']}" if match else problem
    return re.sub(r"; this recipe has .*$", "", text, flags=re.S)


class _Prober:
    """Validates small recipes around one technique to find the rules that involve it."""

    def __init__(self, registries: Registries) -> None:
        self.registries = registries
        self._cache: dict[str, list[str]] = {}

    def problems(self, raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> list[str]:
        """The validator's problems with ``raw`` (normalised, see :func:`_normalise`)."""
        key = repr((raw, tuple(overrides)))
        if key not in self._cache:
            try:
                resolve(raw, self.registries, overrides=overrides)
                found: list[str] = []
            except RecipeError as exc:
                found = [_normalise(p) for p in exc.problems]
            self._cache[key] = found
        return self._cache[key]

    def with_technique(self, raw: Mapping[str, Any], kind: Kind, table: dict[str, Any]) -> Any:
        """A copy of ``raw`` with ``table`` (a technique of ``kind``) put in its place."""
        out = {k: [dict(t) for t in v] if isinstance(v, list) else v for k, v in raw.items()}
        if kind == "perturbation":
            out["perturbation"] = table
        elif kind == "transform":
            listed = out.setdefault("transform", [])
            rank = _stage_rank(self.registries.of("transform").get(table["use"]).cls)
            # After every transform of an earlier or the same stage: the validator's order.
            at = len(listed)
            if rank is not None:
                ranks = [
                    _stage_rank(self.registries.of("transform").get(t["use"]).cls) for t in listed
                ]
                later = [i for i, r in enumerate(ranks) if r is not None and r > rank]
                at = later[0] if later else len(listed)
            listed.insert(at, table)
        else:
            listed = out.setdefault(kind, [])
            if kind == "loss" and any(t.get("id", t["use"]) == table["use"] for t in listed):
                table = {**table, "id": f"{table['use']}-2"}
            listed.append(table)
        return out

    def alone(self, entry: Entry) -> dict[str, Any]:
        """The probe recipe of ``entry``: the generic one with the technique in it."""
        table = {"use": entry.name}
        if entry.kind == "loss":
            return {"perturbation": dict(_GENERIC["perturbation"]), "loss": [table]}
        return self.with_technique(_GENERIC, entry.kind, table)

    def probe(self, entry: Entry) -> tuple[list[str], list[str], str]:
        """(requirements, combination rules, example recipe) of ``entry``."""
        base = self.alone(entry)
        required = self.problems(base)
        rules: list[str] = []
        fixes: list[dict[str, Any]] = []
        for kind, other in self._others(entry):
            label = f"with {kind} {other.name}"
            if kind == "perturbation" and entry.kind == "perturbation":
                continue  # one perturbation per recipe: the other would replace it
            combined = self.with_technique(base, kind, {"use": other.name})
            found = self.problems(combined)
            if not found:
                fixes.append(combined)
            if kind == entry.kind and other.name == entry.name:
                label = f"listed twice ({kind} {other.name} again)"
            # What the other technique says anyway, without this one, is not about this one.
            without = self.problems(self.with_technique(_GENERIC, kind, {"use": other.name}))
            rules += [f"{label} → {p}" for p in found if p not in required and p not in without]
        for label, key, value in _SETTINGS:
            found = self.problems(base, [f"{key}={value}"])
            without = self.problems(_GENERIC, [f"{key}={value}"])
            rules += [
                f"with {label} → {p}" for p in found if p not in required and p not in without
            ]
        # Two tables of one technique each report the same reason: say it once.
        rules = list(dict.fromkeys(rules))
        example = base if not required else (fixes[0] if fixes else base)
        return required, rules, _example_toml(entry, example)

    def _others(self, entry: Entry) -> Iterable[tuple[Kind, Entry]]:
        for kind in ("transform", "perturbation", "loss", "schedule"):
            for other in self.registries.of(kind):  # type: ignore[arg-type]
                if kind == "perturbation" and other.name == _GENERIC["perturbation"]["use"]:
                    continue  # the probe recipe's own attack
                if other.name == entry.name and kind in ("perturbation",):
                    continue
                yield kind, other  # type: ignore[misc]


def _stage_rank(cls: type[Any]) -> int | None:
    stage = transform_stage(cls)
    return None if stage is None else TRANSFORM_STAGES.index(stage)


def _example_toml(entry: Entry, raw: Mapping[str, Any]) -> str:
    """``raw`` as TOML, the table of ``entry`` written out with every parameter's default."""
    lines: list[str] = []
    for kind in ("transform", "perturbation", "loss", "schedule"):
        tables = raw.get(kind)
        if tables is None:
            continue
        for table in tables if isinstance(tables, list) else [tables]:
            header = f"[[{kind}]]" if isinstance(tables, list) else f"[{kind}]"
            lines += ["", header]
            own = kind == entry.kind and table["use"] == entry.name
            for key, value in table.items():
                lines.append(f"{toml_key(key)} = {toml_value(value)}")
            if own:
                lines += _default_lines(entry.cls.Params)
    return "\n".join(lines).lstrip("\n") + "\n"


def _default_lines(model: type[BaseModel]) -> list[str]:
    """``key = default`` for every field; a field without a default as a comment."""
    lines = []
    for name, info in model.model_fields.items():
        value = _default_value(info)
        if value is None:
            lines.append(f"# {name}: not set by default ({_type_text(info)})")
        else:
            lines.append(f"{toml_key(name)} = {toml_value(value)}")
    return lines


# --------------------------------------------------------------------------------------------
# Rendering


def render_text(doc: TechniqueDoc) -> str:
    """The help of ``artplug list NAME``: plain text, paragraphs as in the docstring."""
    out = [f"{doc.name} ({doc.kind}, plugin {doc.plugin}): {doc.summary}"]
    if doc.paper:
        out += ["", f"Paper: {doc.paper}"]
    if doc.description:
        out += ["", doc.description]
    out += ["", f"Parameters ({RECIPE_TABLE[doc.kind]} use = {toml_value(doc.name)}):"]
    if not doc.params:
        out.append("  (none)")
    for param in doc.params:
        out.append(f"  {param.key} = {param.default}  ({param.type})")
        if param.meaning:
            out.append(f"      {param.meaning}")
    out += ["", "Keys of the table that the engine reads:"]
    for param in doc.engine_keys:
        out.append(f"  {param.key} = {param.default}  ({param.type})")
        out.append(f"      {param.meaning}")
    out += ["", "Compatibility:"]
    out += [f"  - {line}" for line in doc.capabilities]
    if doc.requirements:
        out.append("  - on its own, the validator asks for:")
        out += [f"      {line}" for line in doc.requirements]
    if doc.rules:
        out.append("  - combinations the validator rejects:")
        out += [f"      {line}" for line in doc.rules]
    if not doc.requirements and not doc.rules:
        out.append("  - no combination rule found (probed against every installed technique)")
    out += ["", "Example (a complete recipe; 'artplug validate' accepts it as it is):", ""]
    out += [f"  {line}" if line else "" for line in doc.example.splitlines()]
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    """``text`` for a Markdown table cell (pipes escaped, lines joined)."""
    return " ".join(text.split()).replace("|", "\\|")


def render_markdown(doc: TechniqueDoc, pages: Mapping[str, str]) -> str:
    """The section of one technique in the reference page."""
    out = [f"### `{doc.name}`", "", f"*{doc.kind}, plugin `{doc.plugin}`.* {doc.summary}", ""]
    if doc.paper:
        out += [f"**Paper:** {doc.paper}", ""]
    if doc.name in pages:
        page = pages[doc.name]
        out += [f"**Hand-written page:** [{page}]({page}) (equations, reference code, numbers)", ""]
    if doc.description:
        out += [doc.description, ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for param in (*doc.engine_keys, *doc.params):
        out.append(
            f"| `{param.key}` | {_cell(param.type)} | `{param.default}` | {_cell(param.meaning)} |"
        )
    out += ["", "**Compatibility:**", ""]
    out += [f"- {line}" for line in doc.capabilities]
    out += [f"- needs, on its own: {line}" for line in doc.requirements]
    out += [f"- {line}" for line in doc.rules]
    if not doc.requirements and not doc.rules:
        out.append("- no combination rule found (probed against every built-in technique)")
    out += ["", "**Example** (a complete recipe that validates):", "", "```toml"]
    out += [doc.example.rstrip("\n"), "```", ""]
    return "\n".join(out)


def hand_written_pages(index: str) -> dict[str, str]:
    """Technique name -> its hand-written page, from the table of docs/techniques/README.md."""
    pages: dict[str, str] = {}
    for line in index.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        link = re.match(r"^\[[^\]]+\]\(([^)]+\.md)\)$", cells[0]) if len(cells) > 2 else None
        if link is None:
            continue
        for name in re.findall(r"`([a-z][a-z0-9-]*)`", cells[2]):
            pages.setdefault(name, link.group(1))
    return pages


def render_reference(registries: Registries, builtin: Iterable[str], index: str) -> str:
    """The whole reference page for the techniques of the plugins named in ``builtin``.

    ``index`` is the text of docs/techniques/README.md (for the hand-written pages).
    """
    plugins = set(builtin)
    pages = hand_written_pages(index)
    docs = [
        describe(entry, registries)
        for kind in KINDS
        for entry in registries.of(kind)
        if entry.plugin in plugins
    ]
    out = [
        "# Technique reference",
        "",
        f"<!-- Generated by `{COMMAND}` from the technique classes; do not edit by hand. -->",
        "",
        "Every built-in technique: what `artplug list NAME` prints, from the same source (the",
        "class docstring, its `paper`, its `Params` fields and the recipe validator), so the two",
        "cannot drift: after changing a technique, run",
        f"`{COMMAND}` (the test suite fails until this page matches).",
        "The rules under *Compatibility* are what the validator reports when the technique is",
        "combined with each other built-in technique, in train mode and under an L2 threat (with",
        "default parameters). The hand-written pages ([README.md](README.md)) give the equations,",
        "the reference code and the published numbers.",
        "",
        "| kind | technique | summary |",
        "|---|---|---|",
    ]
    for doc in docs:
        out.append(f"| {doc.kind} | [`{doc.name}`](#{_anchor(doc.name)}) | {_cell(doc.summary)} |")
    out.append("")
    for kind in KINDS:
        section = [d for d in docs if d.kind == kind]
        if section:
            out += [f"## {KIND_HEADINGS[kind]}", ""]
            out += [render_markdown(doc, pages) for doc in section]
    return "\n".join(out).rstrip("\n") + "\n"


def _anchor(name: str) -> str:
    """GitHub's anchor of the heading ``### `name` ``."""
    return re.sub(r"[^a-z0-9 -]", "", name.lower()).replace(" ", "-")


# --------------------------------------------------------------------------------------------
# Command line


def reference_text(root: Path) -> str:
    """The reference page as it should be, for the repository at ``root``."""
    from artplug.plugins import load_plugins

    plugin_set = load_plugins()
    builtin = [name for name, info in plugin_set.plugins.items() if info.builtin]
    index = (root / "docs" / "techniques" / "README.md").read_text(encoding="utf-8")
    return render_reference(plugin_set.registries, builtin, index)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m artplug.docgen [--check] [--root DIR]``: write or check the reference."""
    parser = argparse.ArgumentParser(prog="python -m artplug.docgen", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="only compare; exit 1 when the file is out of date"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="repository root (default: the checkout this module is in)",
    )
    args = parser.parse_args(argv)
    path = args.root / REFERENCE
    text = reference_text(args.root)
    current = path.read_text(encoding="utf-8") if path.is_file() else None
    if args.check:
        if current != text:
            print(f"{path} is out of date; run: {COMMAND}", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    if current == text:
        print(f"{path} is up to date")
    else:
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
