"""Recipes: TOML files that combine techniques by name, validated strictly and all at once.

Pipeline (DESIGN §5):

1. parse the TOML (a syntax error names the file, line and column);
2. apply ``--set key=value`` overrides (values in TOML syntax; a bare word is a string);
3. validate the fixed sections (``[run]``, ``[data]``, ``[model]``, ``[optim]``, ``[threat]``,
   ``[eval]``, ``[tracking]``) with pydantic models that forbid unknown keys;
4. resolve every technique table's ``use`` against the registries (did-you-mean on a typo);
5. validate each technique's own ``Params``;
6. cross-check (loss ids unique, schedule knobs known and disjoint, evaluation attack names);
7. return a :class:`ResolvedRecipe` with every default filled in.

Every problem from steps 3-6 is collected and reported together in one :class:`RecipeError`,
each prefixed by its location, e.g. ``loss[0] (trades).beta: Input should be a valid number``.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from artplug.data import DATASETS, SyntheticSpec
from artplug.errors import RecipeError, did_you_mean
from artplug.evaluate import ATTACKS
from artplug.kinds import (
    TRANSFORM_STAGES,
    ChecksRecipe,
    Kind,
    RecipeView,
    Threat,
    transform_stage,
)
from artplug.models import ARCHITECTURES
from artplug.registry import Registries

# Keys a technique table keeps for the engine; every other key goes to the technique's Params.
RESERVED_KEYS: dict[Kind, tuple[str, ...]] = {
    "perturbation": ("use", "model_mode"),
    "loss": ("use", "id", "weight"),
    "transform": ("use",),
    "schedule": ("use",),
}
GLOBAL_KNOBS = ("lr_scale", "threat.eps_scale", "momentum")


SEED_LIMIT = 2**63
"""Seeds are integers in ``[0, SEED_LIMIT)``: non-negative and within torch's signed 64 bits."""
MAX_THREADS = 1024
"""The largest ``run.threads`` (a bigger value is a typo, and torch would try to start them)."""


class _Section(BaseModel):
    # strict: a value of the wrong TOML type is an error, never coerced (epochs = "1" is a
    # string; 1.0 is not an integer). An int is still accepted where a float is expected.
    # allow_inf_nan=False: no recipe number has a meaning at inf or nan.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class RunSection(_Section):
    """``[run]``: identity, length and hardware of the run."""

    name: str = "artplug-run"
    seed: int = Field(
        0, ge=0, lt=SEED_LIMIT, description="random seed of the run, 0 <= seed < 2**63"
    )
    epochs: int = Field(10, ge=1)
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda'")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto",
        description="mixed precision (autocast): 'auto' = bf16 on CUDA, off (fp32) on CPU; "
        "'bf16' and 'fp16' also work on CPU (slow; for tests); 'fp16' adds loss scaling; "
        "docs/precision.md",
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="channels_last memory format; 'auto' = on for CUDA"
    )
    log_every: int = Field(20, ge=1, description="optimizer steps between metric syncs")
    out_dir: str = Field("runs", description="folder for run folders (checkpoints, results)")
    threads: int = Field(
        0,
        ge=0,
        le=MAX_THREADS,
        description="CPU threads torch uses in this process (torch.set_num_threads); "
        "0 = torch's default (one per core); on a shared machine 1 is often much faster",
    )
    on_nonfinite: Literal["stop", "rollback"] = Field(
        "stop",
        description="a non-finite loss or weights: 'stop' the run with an error, or 'rollback' "
        "to the last good checkpoint with the learning rate halved (at most max_rollbacks times)",
    )
    max_rollbacks: int = Field(
        3, ge=0, description="rollbacks allowed with on_nonfinite = 'rollback' before stopping"
    )
    sync_bn: bool = Field(
        False,
        description="in a distributed run (torchrun, --nproc), BatchNorm statistics over the "
        "global batch (SyncBatchNorm); no effect in one process; docs/distributed.md",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or value.startswith("cuda:"):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'")


class SyntheticSection(_Section):
    """``[data.synthetic]``: the generated dataset's shape and sizes (docs/datasets.md)."""

    shape: list[int] = Field(
        default_factory=lambda: list(SyntheticSpec().shape),
        description="image shape [channels, height, width]",
    )
    num_classes: int = Field(SyntheticSpec().num_classes, ge=2)
    train_size: int = Field(SyntheticSpec().train_size, ge=2, description="train + val examples")
    test_size: int = Field(SyntheticSpec().test_size, ge=1)

    @field_validator("shape")
    @classmethod
    def _three_positive_sizes(cls, value: list[int]) -> list[int]:
        if len(value) != 3 or min(value) < 1:
            raise ValueError(f"must be [channels, height, width], each >= 1, got {value}")
        return value

    def spec(self) -> SyntheticSpec:
        """As the :class:`~artplug.data.SyntheticSpec` that :func:`~artplug.data.load_dataset`
        takes."""
        channels, height, width = self.shape
        return SyntheticSpec(
            (channels, height, width), self.num_classes, self.train_size, self.test_size
        )


class DataSection(_Section):
    """``[data]``: which dataset, where it lives and how it is batched."""

    dataset: Literal[DATASETS] = "digits"  # type: ignore[valid-type]
    root: str | None = Field(None, description="dataset folder (default ~/.cache/artplug/data)")
    download: bool = Field(False, description="let torchvision download the files if missing")
    batch_size: int = Field(128, ge=1)
    augment: Literal["auto", "on", "off"] = Field(
        "auto", description="random crop + flip; 'auto' = on for 32x32 datasets, off for digits"
    )
    val_size: int | None = Field(None, ge=1, description="validation examples held out of train")
    synthetic: SyntheticSection | None = Field(
        None,
        description="shape and sizes of dataset = 'synthetic' (filled in with CIFAR-10's when "
        "absent); only for that dataset",
    )
    paper_parity: bool = Field(
        False,
        description="the recipe reproduces a paper's setup and its numbers are compared with "
        "published ones: dataset = 'synthetic' is refused",
    )

    @model_validator(mode="before")
    @classmethod
    def _synthetic_defaults(cls, data: Any) -> Any:
        # The resolved recipe shows every default: the synthetic table too, when it applies.
        if (
            isinstance(data, dict)
            and data.get("dataset") == "synthetic"
            and data.get("synthetic") is None
        ):
            return {**data, "synthetic": {}}
        return data

    @model_validator(mode="after")
    def _synthetic_only_where_it_applies(self) -> DataSection:
        if self.dataset == "synthetic" and self.paper_parity:
            raise ValueError(
                "dataset 'synthetic' is refused: this recipe claims paper parity "
                "(data.paper_parity = true), so its numbers must come from the paper's data; "
                "for a throughput measurement add --set data.paper_parity=false"
            )
        if self.dataset != "synthetic" and self.synthetic is not None:
            raise ValueError(
                f"the [data.synthetic] table applies to dataset 'synthetic' only, not "
                f"{self.dataset!r}; remove it"
            )
        return self

    def synthetic_spec(self) -> SyntheticSpec | None:
        """The shape and sizes of the synthetic dataset, None for the other datasets."""
        if self.synthetic is None:
            return None
        return self.synthetic.spec()


class ModelSection(_Section):
    """``[model]``: the architecture (normalization is inside the model)."""

    arch: Literal[ARCHITECTURES] = "small-cnn"  # type: ignore[valid-type]
    depth: int = Field(28, ge=1, description="wide-resnet depth")
    width: int = Field(10, ge=1, description="wide-resnet widen factor")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class OptimSection(_Section):
    """``[optim]``: the optimizer; ``lr`` is the base rate that LR schedules scale."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0)


class ThreatSection(_Section):
    """``[threat]``: one threat model for training attacks and evaluation, pixel space [0, 1]."""

    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(8 / 255, ge=0.0)

    def threat(self) -> Threat:
        """As the :class:`Threat` dataclass handed to techniques."""
        return Threat(self.norm, self.eps)


DEFAULT_FINAL_ATTACKS: tuple[str, ...] = ("clean", "pgd-20", "apgd-ce", "apgd-dlr")
"""``[eval] final_attacks``'s default: a suite whose per-example worst case (``worst``) comes
close to the standard AutoAttack's APGD-CE + APGD-T. PGD-20 alone overstates robustness, most
of all for cosine heads (HE), whose cross-entropy gradient is weak; ``square`` (5000 queries,
minutes on a CPU) and ``autoattack`` (an optional extra) are left to the recipes."""


class EvalSection(_Section):
    """``[eval]``: validation during training and the final evaluation, both through ART."""

    every_epochs: int = Field(
        1,
        ge=0,
        description="validate every N epochs; 0 = never (the test split is always run at the end)",
    )
    attacks: list[str] = Field(default_factory=lambda: ["clean", "pgd-20"])
    final_attacks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FINAL_ATTACKS),
        description="final evaluation entries; the run reports each and their per-example "
        "worst case",
    )
    eps: float | None = Field(
        None,
        ge=0.0,
        description="radius of validation and the final evaluation (sanity gate and eps-curve "
        "mark included); None = [threat] eps. Lets a recipe train at a paper's eps (0.031) and "
        "evaluate at RobustBench's 8/255",
    )
    n_examples: int = Field(500, ge=1, description="size of the seeded validation subset")
    test_examples: int | None = Field(
        None,
        ge=1,
        description="the first N test examples, in order (as RobustBench); None = the full "
        "test split",
    )
    batch_size: int = Field(512, ge=1)
    overfit_check: Literal["off", "log", "stop"] = Field(
        "off",
        description="catastrophic-overfitting detection after every epoch: 'log' records the "
        "event, 'stop' also ends training and restores the last good checkpoint",
    )
    overfit_rule: Literal["artplug", "fast-at"] = Field(
        "artplug",
        description="the check's rule: 'artplug' = PGD-20 accuracy on overfit_examples fixed "
        "training examples (eval mode) drops by more than overfit_drop while FGSM accuracy does "
        "not fall; 'fast-at' = Wong et al.'s: PGD-5 accuracy on one fixed training batch "
        "(data.batch_size examples) with the model in train mode drops by more than overfit_drop",
    )
    overfit_examples: int = Field(
        256, ge=1, description="fixed training examples it attacks (the 'artplug' rule)"
    )
    overfit_drop: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="PGD accuracy drop (absolute, against the last healthy epoch) that counts "
        "as a collapse",
    )
    select: Literal["last", "best"] = Field(
        "best",
        description="checkpoint the final evaluation uses: 'best' = highest robust validation "
        "accuracy (first non-clean entry of attacks; clean accuracy breaks ties), 'last' = the "
        "last epoch; 'best' needs every_epochs > 0, else the last one is used",
    )
    early_stop_patience: int = Field(
        0,
        ge=0,
        description="stop when robust validation accuracy has not improved for N validations "
        "(robust overfitting); 0 = off; needs every_epochs > 0",
    )
    sanity: bool = Field(
        True, description="run the sanity gate (gradient-masking checks) after training"
    )
    sanity_examples: int = Field(
        200, ge=1, description="test examples the sanity gate attacks (at most test_examples)"
    )
    sanity_tolerance: float = Field(
        0.05, ge=0.0, le=1.0, description="accuracy slack (absolute) of the sanity checks"
    )
    sanity_black_box: Literal["random-search", "square"] = Field(
        "random-search",
        description="black-box attack of the sanity gate: artplug's torch random search "
        "(1000 queries, seconds) or the attack table's 'square' (5000 ART queries, minutes)",
    )
    eps_curve: list[float] = Field(
        default_factory=list,
        description="eps values of a robust-accuracy curve (pgd-20) after training; [] = off",
    )
    eps_curve_examples: int | None = Field(
        None, ge=1, description="test examples of the eps curve; None = as test_examples"
    )

    @field_validator("eps_curve")
    @classmethod
    def _curve_radii(cls, value: list[float]) -> list[float]:
        bad = [eps for eps in value if not (math.isfinite(eps) and eps >= 0.0)]
        if bad:
            raise ValueError(f"eps values must be finite and >= 0, got {bad}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _patience_needs_validation(self) -> EvalSection:
        if self.early_stop_patience and not self.every_epochs:
            raise ValueError(
                "early_stop_patience needs validation during training; set every_epochs > 0"
            )
        return self


class TrackingSection(_Section):
    """``[tracking]``: where the run is recorded."""

    backend: Literal["mlflow", "none"] = "mlflow"
    experiment: str = "artplug"
    uri: str | None = Field(None, description="None = MLFLOW_TRACKING_URI or MLflow's default")
    log_model: bool = Field(
        True,
        description="log the trained model with MLflow's PyTorch flavour as the run's model "
        "'model' (mlflow.pytorch.load_model('runs:/<run id>/model'))",
    )


SECTIONS: dict[str, type[_Section]] = {
    "run": RunSection,
    "data": DataSection,
    "model": ModelSection,
    "optim": OptimSection,
    "threat": ThreatSection,
    "eval": EvalSection,
    "tracking": TrackingSection,
}
TECHNIQUE_TABLES = ("transform", "perturbation", "loss", "schedule")
ALL_TABLES = (*SECTIONS, *TECHNIQUE_TABLES)
LIST_TABLES = ("transform", "loss", "schedule")
"""The arrays of tables; an extending recipe replaces them whole (never merged by position)."""
EXTENDS_KEY = "extends"
"""Top-level key of a recipe file: the path (relative to that file) of the recipe it extends."""
UNSET_KEY = "unset"
"""Top-level key of an extending recipe: dotted keys to remove from what it inherits."""
CHAIN_KEY = "extends_chain"
"""Top-level key of a resolved recipe: the files it was merged from, the extending one first."""
TOP_LEVEL_KEYS = (EXTENDS_KEY, UNSET_KEY, CHAIN_KEY)


@dataclass(frozen=True)
class TechniqueSpec:
    """A technique chosen by the recipe, with validated parameters."""

    kind: Kind
    use: str
    params: BaseModel
    cls: type[Any]
    plugin: str
    location: str
    id: str = ""
    weight: float = 1.0
    model_mode: Literal["eval", "train"] = "eval"

    def build(self) -> Any:
        """Instantiate the technique class with its params."""
        return self.cls(self.params)

    def to_dict(self) -> dict[str, Any]:
        """The table as it would be written in a resolved recipe."""
        table: dict[str, Any] = {"use": self.use}
        if self.kind == "loss":
            table["id"] = self.id
            table["weight"] = self.weight
        if self.kind == "perturbation":
            table["model_mode"] = self.model_mode
        table.update(self.params.model_dump(mode="json"))
        return table


@dataclass(frozen=True)
class ResolvedRecipe:
    """A validated recipe with every default filled in: what is logged and what re-runs consume."""

    source: str
    run: RunSection
    data: DataSection
    model: ModelSection
    optim: OptimSection
    threat: ThreatSection
    eval: EvalSection
    tracking: TrackingSection
    perturbation: TechniqueSpec
    transforms: tuple[TechniqueSpec, ...] = ()
    losses: tuple[TechniqueSpec, ...] = ()
    schedules: tuple[TechniqueSpec, ...] = ()
    techniques: tuple[str, ...] = field(default=())
    extends_chain: tuple[str, ...] = ()
    """The recipe files merged into this one through ``extends``, the extending file first;
    empty for a recipe that extends nothing."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/TOML-able), sections in a fixed order.

        ``extends_chain`` comes first, and only when the recipe extends another: as a
        top-level key it must precede every table in TOML.
        """
        out: dict[str, Any] = {CHAIN_KEY: list(self.extends_chain)} if self.extends_chain else {}
        for name in SECTIONS:
            section: _Section = getattr(self, name)
            out[name] = section.model_dump(mode="json")
        out["transform"] = [t.to_dict() for t in self.transforms]
        out["perturbation"] = self.perturbation.to_dict()
        out["loss"] = [t.to_dict() for t in self.losses]
        out["schedule"] = [t.to_dict() for t in self.schedules]
        return out

    def to_toml(self) -> str:
        """The resolved recipe as TOML that :func:`load_recipe` accepts unchanged."""
        header = f"# Resolved from {self.source}; every default filled in.\n"
        return header + dumps_toml(self.to_dict())

    def summary(self) -> str:
        """A short label of the technique stack, e.g. ``pgd + cross-entropy``."""
        return " + ".join(self.techniques)


# --------------------------------------------------------------------------------------------
# Loading


def load_recipe(
    path: str | Path,
    registries: Registries,
    overrides: Sequence[str] = (),
    *,
    failure_hint: str = "",
    check_out_dir: bool = True,
) -> ResolvedRecipe:
    """Read, override, validate and resolve the recipe at ``path``.

    A recipe that extends another (``extends = "PARENT.toml"``) is merged with its chain first
    (see :func:`read_recipe`); its problems then name the file and line each offending value
    came from. With ``check_out_dir`` (the default: a recipe file is read to be run) an
    ``run.out_dir`` that cannot hold run folders is one of the problems reported; nothing is
    created.
    """
    recipe_file = read_recipe(path)
    raw = recipe_file.raw
    if len(recipe_file.chain) > 1:
        raw = {CHAIN_KEY: list(recipe_file.chain), **raw}
    try:
        return resolve(
            raw,
            registries,
            source=recipe_file.chain[0],
            overrides=overrides,
            failure_hint=failure_hint,
            check_out_dir=check_out_dir,
        )
    except RecipeError as exc:
        if len(recipe_file.chain) == 1:
            raise
        overridden = {tuple(_split_key(o.partition("=")[0])) for o in overrides}
        located = [recipe_file.locate(problem, overridden) for problem in exc.problems]
        raise RecipeError(exc.source, located) from None


# --------------------------------------------------------------------------------------------
# Inheritance: ``extends = "PARENT.toml"``


@dataclass(frozen=True)
class RecipeFile:
    """A recipe file merged with the files it extends, before validation.

    ``raw`` is the merged TOML data (without ``extends`` and ``unset``); ``chain`` the file
    names, the extending file first (as given, parents joined to it and normalised);
    ``origins`` the file that set each value, by key path (``("optim", "lr")``; an array of
    tables by its name alone, ``("loss",)``, as it is replaced whole); ``texts`` each file's text,
    to find line numbers.
    """

    raw: dict[str, Any]
    chain: tuple[str, ...]
    origins: dict[tuple[str, ...], str]
    texts: dict[str, str]

    def origin(self, path: Sequence[str]) -> str | None:
        """The file that set the value at key ``path``, or None when it is not one file."""
        key = tuple(path)
        for end in range(len(key), 0, -1):
            if key[:end] in self.origins:
                return self.origins[key[:end]]
        # A whole table whose keys came from several files has no single origin.
        files = {f for k, f in self.origins.items() if k[: len(key)] == key}
        return files.pop() if len(files) == 1 else None

    def locate(self, problem: str, overridden: Iterable[tuple[str, ...]] = ()) -> str:
        """``problem`` with the file and line its value came from appended, when found.

        ``problem`` starts with a location as :func:`resolve` writes them (``optim.lr: ...``,
        ``loss[1] (trades).beta: ...``); a key set by ``--set`` (one of ``overridden``) is
        said to come from there.
        """
        match = _PROBLEM_LOCATION.match(problem)
        if match is None:
            return problem
        table = match["table"]
        index = int(match["index"]) if match["index"] is not None else None
        # ".attacks[0]" -> ["attacks"]: a problem inside an array names the array's key.
        keys = [re.sub(r"\[\d+\]$", "", part) for part in match["rest"].split(".") if part]
        path = (table, *keys)
        dotted = {tuple(o) for o in overridden}
        wanted = (table, str(index), *keys) if index is not None else path
        if any(wanted[: len(o)] == o for o in dotted):
            return f"{problem} (set by --set)"
        file = self.origin(path)
        if file is None:
            return problem
        line = _find_line(self.texts.get(file, ""), path, index)
        return f"{problem} (set in {file}:{line})" if line else f"{problem} (set in {file})"


# The location a problem of resolve() starts with: "optim.lr:", "loss[1] (trades).beta:",
# "perturbation (moat).slat.alpha:", "eval.attacks[0]:", "run:".
_PROBLEM_LOCATION = re.compile(
    r"^(?P<table>[A-Za-z0-9_-]+)(?:\[(?P<index>\d+)\])?(?: \([^)]*\))?"
    r"(?P<rest>(?:\.[A-Za-z0-9_-]+(?:\[\d+\])?)*):"
)


def read_recipe(path: str | Path) -> RecipeFile:
    """Parse the recipe file at ``path`` and merge it with the chain of files it extends.

    Merge rules (docs/recipes.md, Inheritance): tables merge key by key, nested tables too;
    arrays of tables (``[[transform]]``, ``[[loss]]``, ``[[schedule]]``) and every other value
    are replaced whole; a ``[perturbation]`` that names another ``use`` replaces the inherited
    one whole (the parameters of one attack mean nothing to another). ``unset = ["eval.eps"]``
    removes inherited keys before the file's own values apply. Problems (a missing parent, a
    cycle, a bad ``unset``) raise :class:`RecipeError` naming the file and line.
    """
    display = str(path)
    return _read_chain(Path(path), display, ())


def _read_chain(file: Path, display: str, below: tuple[tuple[Path, str], ...]) -> RecipeFile:
    """``file`` merged with its parents; ``below`` are the files that extend it (a chain)."""
    text, raw = _parse_file(file, display, below)
    extends = raw.pop(EXTENDS_KEY, None)
    unset = raw.pop(UNSET_KEY, None)
    own = _origins_of(raw, display)
    if extends is None:
        if unset is not None:
            raise RecipeError(
                display,
                [
                    f"unset{_line_note(text, (UNSET_KEY,))}: only a recipe that extends another "
                    'can unset keys; add extends = "PARENT.toml" or remove unset'
                ],
            )
        return RecipeFile(raw, (display,), own, {display: text})
    where = f"extends{_line_note(text, (EXTENDS_KEY,))}"
    if not isinstance(extends, str) or not extends.strip():
        raise RecipeError(
            display,
            [
                f"{where}: must be the path of the recipe this one extends, relative to this "
                f'file, e.g. extends = "../he_trades.toml" (got {_describe(extends)})'
            ],
        )
    parent_file = file.parent / extends
    parent_display = os.path.normpath(os.path.join(os.path.dirname(display), extends))
    here = file.resolve()
    chain = [*below, (here, display)]
    if any(seen == parent_file.resolve() for seen, _ in chain):
        start = next(i for i, (seen, _) in enumerate(chain) if seen == parent_file.resolve())
        cycle = " -> ".join([name for _, name in chain[start:]] + [parent_display])
        raise RecipeError(display, [f"{where}: recipes extend each other in a cycle: {cycle}"])
    if not parent_file.is_file():
        what = "not found" if not parent_file.exists() else "not a file"
        raise RecipeError(
            display,
            [f"{where}: {extends!r} is {what} (looked for {parent_display}, relative to the file)"],
        )
    parent = _read_chain(parent_file, parent_display, tuple(chain))
    merged = parent.raw
    origins = dict(parent.origins)
    problems: list[str] = []
    if unset is not None:
        problems += _apply_unset(merged, origins, unset, text, parent.chain[0])
    if problems:
        raise RecipeError(display, problems)
    _merge(merged, raw, origins, display, ())
    return RecipeFile(merged, (display, *parent.chain), origins, {**parent.texts, display: text})


def _parse_file(
    file: Path, display: str, below: tuple[tuple[Path, str], ...]
) -> tuple[str, dict[str, Any]]:
    """The text and TOML data of one recipe file; a problem names it (and who extends it)."""
    source = f"{display} (extended by {below[-1][1]})" if below else display
    if not file.is_file():
        raise RecipeError(source, ["file not found" if not file.exists() else "not a file"])
    try:
        text = file.read_text(encoding="utf-8")
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(source, [f"invalid TOML: {exc}"]) from None
    except UnicodeDecodeError:
        raise RecipeError(source, ["not a UTF-8 text file"]) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (int() refuses it)
        raise RecipeError(source, [f"invalid TOML value: {exc}"]) from None


def _origins_of(
    value: Any, display: str, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], str]:
    """Key path -> ``display`` for every value in ``value`` (tables recursed, arrays whole)."""
    if not isinstance(value, dict) or (prefix and prefix[0] in LIST_TABLES):
        return {prefix: display} if prefix else {}
    out: dict[tuple[str, ...], str] = {}
    for key, item in value.items():
        out.update(_origins_of(item, display, (*prefix, key)))
    if prefix and not value:  # an empty table, e.g. [model] with every key left to defaults
        out[prefix] = display
    return out


def _drop_origins(origins: dict[tuple[str, ...], str], path: tuple[str, ...]) -> None:
    """Forget where the value at ``path`` and everything under it came from."""
    for key in [k for k in origins if k[: len(path)] == path]:
        del origins[key]


def _merge(
    base: dict[str, Any],
    over: Mapping[str, Any],
    origins: dict[tuple[str, ...], str],
    display: str,
    prefix: tuple[str, ...],
) -> None:
    """Apply the values of ``over`` (from file ``display``) onto ``base`` in place."""
    for key, value in over.items():
        path = (*prefix, key)
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and path[0] not in LIST_TABLES:
            # Another attack: its parameters are not the inherited attack's.
            other_attack = value.get("use", old.get("use")) != old.get("use")
            if not (path == ("perturbation",) and other_attack):
                _merge(old, value, origins, display, path)
                continue
        base[key] = _deep_copy(value)
        _drop_origins(origins, path)
        origins.update(_origins_of(value, display, path))


def _apply_unset(
    merged: dict[str, Any],
    origins: dict[tuple[str, ...], str],
    unset: Any,
    text: str,
    parent: str,
) -> list[str]:
    """Remove the inherited keys named by ``unset``; one problem per bad entry."""
    where = f"unset{_line_note(text, (UNSET_KEY,))}"
    if not (isinstance(unset, list) and all(isinstance(e, str) for e in unset)):
        return [
            f'{where}: must be a list of dotted keys, e.g. unset = ["eval.eps", "model.depth"] '
            f"(got {_describe(unset)})"
        ]
    problems = []
    for entry in unset:
        parts = entry.split(".")
        node: Any = merged
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node or not all(parts):
            known = list(_dotted_keys(merged))
            problems.append(
                f"{where}: {entry!r} is not set by {parent} or the recipes it extends, so there "
                f"is nothing to unset{did_you_mean(entry, known)}"
            )
            continue
        del node[parts[-1]]
        _drop_origins(origins, tuple(parts))
    return problems


def _dotted_keys(value: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Every table and key of ``value`` as a dotted name (``eval``, ``eval.eps``)."""
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else key
        yield name
        if isinstance(item, dict):
            yield from _dotted_keys(item, name)


_HEADER = re.compile(r"^\[\[?\s*(?P<name>[^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_LINE = re.compile(r"^(?P<key>[A-Za-z0-9_\-.\"' ]+?)\s*=")


def _dotted(name: str) -> tuple[str, ...]:
    """A TOML key or header (``a . "b"``) as its parts, quotes and spaces stripped."""
    return tuple(part.strip().strip("\"'") for part in name.split("."))


def _find_line(text: str, path: tuple[str, ...], index: int | None = None) -> int | None:
    """The line of ``text`` that sets the key at ``path``, by a light scan (tomllib gives none).

    ``index`` picks the occurrence of an array of tables (``[[loss]]``). Falls back to a line
    that sets a table holding the key (an inline table), then to the table's header; None when
    nothing matches. Multi-line strings that look like keys may mislead it: good enough to
    point a reader at the right place.
    """
    table: tuple[str, ...] = ()
    occurrence: dict[tuple[str, ...], int] = {}
    current: int | None = None
    exact = partial = header = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        heading = _HEADER.match(stripped)
        if heading is not None and stripped.startswith("["):
            table = _dotted(heading["name"])
            current = None
            if stripped.startswith("[["):
                current = occurrence[table] = occurrence.get(table, -1) + 1
            if header is None and table == path[:1] and (index is None or current == index):
                header = number
            continue
        key_line = _KEY_LINE.match(stripped)
        if key_line is None:
            continue
        if table and table[0] in LIST_TABLES and index is not None and current != index:
            continue
        full = (*table, *_dotted(key_line["key"]))
        if full == path and exact is None:
            exact = number
        elif len(full) < len(path) and path[: len(full)] == full and partial is None:
            partial = number
    return exact or partial or header


def _line_note(text: str, path: tuple[str, ...]) -> str:
    """`` (line N)`` for the line that sets ``path`` in ``text``; empty when not found."""
    line = _find_line(text, path)
    return f" (line {line})" if line else ""


def resolve(
    raw: Mapping[str, Any],
    registries: Registries,
    *,
    source: str = "<recipe>",
    overrides: Sequence[str] = (),
    failure_hint: str = "",
    check_out_dir: bool = False,
) -> ResolvedRecipe:
    """Validate a parsed recipe; raise one :class:`RecipeError` listing every problem.

    ``check_out_dir`` also checks that ``run.out_dir`` can hold run folders (see
    :func:`out_dir_problem`); off by default, since a stored recipe (a checkpoint's, for
    ``eval`` or ``resume``) may name a folder of another machine that is never used.
    """
    data = _deep_copy(raw)
    problems: list[str] = []
    for override in overrides:
        try:
            apply_override(data, override)
        except ValueError as exc:
            # backslashreplace: a lone surrogate (undecodable argv bytes) would break the print.
            shown = override.encode("utf-8", "backslashreplace").decode("utf-8")
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            problems.append(f"--set {shown}: {exc}")
    if problems:
        raise RecipeError(source, problems)

    chain = data.pop(CHAIN_KEY, [])
    if not (isinstance(chain, list) and all(isinstance(name, str) for name in chain)):
        problems.append(f"{CHAIN_KEY}: must be a list of file names (got {_describe(chain)})")
        chain = []
    for key in (EXTENDS_KEY, UNSET_KEY):
        if key in data:
            data.pop(key)
            problems.append(
                f"{key}: only a recipe file can use {key} (paths are relative to the file); "
                "this recipe was not read from one"
            )
    for key in data:
        if key not in ALL_TABLES:
            problems.append(
                f"{key}: unknown table{did_you_mean(key, (*ALL_TABLES, *TOP_LEVEL_KEYS))}"
            )

    sections: dict[str, Any] = {}
    for name, model in SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            problems.append(f"{name}: must be a table [{name}]")
            continue
        try:
            sections[name] = model.model_validate(table)
        except ValidationError as exc:
            problems.extend(_render(exc, name, model))
    if check_out_dir and "run" in sections:
        problem = out_dir_problem(sections["run"].out_dir)
        if problem is not None:
            problems.append(problem)

    perturbation_raw = data.get("perturbation", {"use": "none"})
    specs: dict[str, list[TechniqueSpec]] = {"transform": [], "loss": [], "schedule": []}
    perturbation: TechniqueSpec | None = None
    if not isinstance(perturbation_raw, dict):
        problems.append("perturbation: must be a single table [perturbation]")
    else:
        perturbation = _technique(
            "perturbation", "perturbation", perturbation_raw, registries, problems, failure_hint
        )
    for kind in ("transform", "loss", "schedule"):
        tables = data.get(kind, [])
        if not isinstance(tables, list):
            problems.append(f"{kind}: must be an array of tables [[{kind}]]")
            continue
        for index, table in enumerate(tables):
            location = f"{kind}[{index}]"
            if not isinstance(table, dict):
                problems.append(f"{location}: must be a table")
                continue
            spec = _technique(kind, location, table, registries, problems, failure_hint)
            if spec is not None:
                specs[kind].append(spec)
    if not data.get("loss"):
        problems.append(
            'loss: at least one [[loss]] table is required, e.g. [[loss]] use = "cross-entropy"'
        )

    _cross_check(sections, perturbation, specs, problems)
    if problems or perturbation is None:
        raise RecipeError(source, problems)

    stack = [perturbation.use] if perturbation.use != "none" else []
    stack += [s.use for s in specs["transform"]] + [s.use for s in specs["loss"]]
    return ResolvedRecipe(
        source=source,
        perturbation=perturbation,
        transforms=tuple(specs["transform"]),
        losses=tuple(specs["loss"]),
        schedules=tuple(specs["schedule"]),
        techniques=tuple(stack),
        extends_chain=tuple(chain),
        **sections,
    )


def _technique(
    kind: Kind,
    location: str,
    table: dict[str, Any],
    registries: Registries,
    problems: list[str],
    failure_hint: str,
) -> TechniqueSpec | None:
    use = table.get("use")
    if not isinstance(use, str):
        installed = ", ".join(registries.of(kind).names()) or "(none)"
        problems.append(f"{location}: missing 'use = \"<name>\"'; installed: {installed}")
        return None
    registry = registries.of(kind)
    if use not in registry:
        problems.append(f"{location}: {registry.unknown_message(use)}{failure_hint}")
        return None
    entry = registry.get(use)
    params_raw = {k: v for k, v in table.items() if k not in RESERVED_KEYS[kind]}
    label = f"{location} ({use})"
    ok = True
    # Technique Params are validated as strictly as the sections (no "3" for an int, no 3.0
    # for an int), whatever each plugin's own model_config says.
    own: list[str] = []
    try:
        params = entry.cls.Params.model_validate(params_raw, strict=True)
    except ValidationError as exc:
        # Reserved keys are the engine's, not Params fields, yet a typo of one is a typo.
        own = _render(exc, label, entry.cls.Params, RESERVED_KEYS[kind][1:], use)
        ok = False
    # Params models are the plugins' and may allow inf/nan; no recipe number means anything
    # there, so non-finite values are refused here (unless pydantic already refused them).
    for where, value in _non_finite(params_raw):
        if not any(line.startswith(f"{label}.{where}:") for line in own):
            own.append(f"{label}.{where}: must be a finite number, got {_toml_value(value)}")
            ok = False
    problems.extend(own)
    extra: dict[str, Any] = {}
    if kind == "loss":
        term_id = table.get("id", use)
        weight = table.get("weight", 1.0)
        if not isinstance(term_id, str) or not term_id:
            problems.append(f"{label}.id: must be a non-empty string")
            ok = False
        if not _finite_number(weight):
            problems.append(f"{label}.weight: must be a finite number")
            ok = False
        extra = {"id": term_id, "weight": float(weight) if ok else 1.0}
    if kind == "perturbation":
        mode = table.get("model_mode", "eval")
        if mode not in ("eval", "train"):
            problems.append(f'{label}.model_mode: must be "eval" or "train", got {mode!r}')
            ok = False
        extra = {"model_mode": mode}
    if not ok:
        return None
    return TechniqueSpec(
        kind=kind,
        use=use,
        params=params,
        cls=entry.cls,
        plugin=entry.plugin,
        location=location,
        **extra,
    )


def _cross_check(
    sections: Mapping[str, Any],
    perturbation: TechniqueSpec | None,
    specs: Mapping[str, list[TechniqueSpec]],
    problems: list[str],
) -> None:
    ids: dict[str, str] = {}
    for spec in specs["loss"]:
        if spec.id in ids:
            problems.append(
                f"{spec.location}.id: {spec.id!r} is also the id of {ids[spec.id]}; "
                'give one of them a distinct id = "..."'
            )
        ids[spec.id] = spec.location

    known = set(GLOBAL_KNOBS)
    if perturbation is not None:
        known |= {f"perturbation.{f}" for f in type(perturbation.params).model_fields}
    for spec in specs["loss"]:
        known.add(f"loss.{spec.id}.weight")
        known |= {f"loss.{spec.id}.{f}" for f in type(spec.params).model_fields}
    owner: dict[str, str] = {}
    for spec in specs["schedule"]:
        try:
            knobs = spec.build().knobs()
        except Exception as exc:  # a schedule that cannot even say its knobs is unusable
            problems.append(f"{spec.location} ({spec.use}): cannot be built: {exc}")
            continue
        for knob in sorted(knobs):
            if knob not in known:
                problems.append(
                    f"{spec.location} ({spec.use}): sets unknown knob {knob!r}; "
                    f"this recipe has {', '.join(sorted(known))}"
                )
            elif knob in owner:
                problems.append(
                    f"{spec.location} ({spec.use}): knob {knob!r} is already set by {owner[knob]}"
                )
            else:
                owner[knob] = f"{spec.location} ({spec.use})"

    problems.extend(_stage_order_problems(specs["transform"]))

    threat_section = sections.get("threat")
    if perturbation is not None and threat_section is not None:
        view = RecipeView(
            transforms=tuple(spec.use for spec in specs["transform"]),
            perturbation=perturbation.use,
            losses=tuple(spec.use for spec in specs["loss"]),
            schedules=tuple(spec.use for spec in specs["schedule"]),
            threat=threat_section.threat(),
            model_mode=perturbation.model_mode,
        )
        every = [perturbation, *specs["transform"], *specs["loss"], *specs["schedule"]]
        for spec in every:
            if not isinstance(spec.cls, ChecksRecipe):
                continue
            for reason in spec.cls.check_recipe(spec.params, view):
                problems.append(f"{spec.location} ({spec.use}): {reason}")

    evaluation = sections.get("eval")
    if evaluation is not None:
        for key in ("attacks", "final_attacks"):
            for index, name in enumerate(getattr(evaluation, key)):
                if name not in ATTACKS:
                    problems.append(
                        f"eval.{key}[{index}]: unknown attack {name!r}"
                        f"{did_you_mean(name, ATTACKS)}; known: {', '.join(ATTACKS)}"
                    )


def _stage_order_problems(transforms: Sequence[Any]) -> list[str]:
    """One problem per transform listed after one of a later stage (see ``TRANSFORM_STAGES``).

    The order is data declared by each transform (its ``stage``), so no plugin has to name
    another one. Transforms without a stage may go anywhere.
    """
    rank = {stage: index for index, stage in enumerate(TRANSFORM_STAGES)}
    order = " -> ".join(TRANSFORM_STAGES)
    problems = []
    for index, spec in enumerate(transforms):
        stage = transform_stage(spec.cls)
        if stage is None:
            continue
        later = [
            other
            for other in transforms[:index]
            if (other_stage := transform_stage(other.cls)) is not None
            and rank[other_stage] > rank[stage]
        ]
        if later:
            names = ", ".join(f"{other.use!r} ({transform_stage(other.cls)})" for other in later)
            problems.append(
                f"{spec.location} ({spec.use}): {spec.use} must come before {names}: transforms "
                f"are listed, and applied, in stage order {order}, and {spec.use} is a "
                f"{stage!r} transform"
            )
    return problems


def _render(
    exc: ValidationError,
    prefix: str,
    model: type[BaseModel] | None = None,
    reserved: Sequence[str] = (),
    technique: str = "",
) -> list[str]:
    """One problem line per pydantic error, located under ``prefix``.

    An unknown key gets a did-you-mean among the keys of ``model`` at that place (and the
    table's ``reserved`` keys), or the list of them when none is close; ``technique`` names the
    technique whose parameters they are, for the hint ``artplug list NAME``.
    """
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key" + _unknown_key_hint(model, error["loc"], reserved, technique)
        elif error["type"].endswith("_type"):
            # Strict validation refuses "1" for an integer: say what was given, as TOML.
            message += f" (got {_describe(error['input'])})"
        where = f"{prefix}.{loc}" if loc else prefix
        lines.append(f"{where}: {message}")
    return lines


def _unknown_key_hint(
    model: type[BaseModel] | None,
    loc: Sequence[int | str],
    reserved: Sequence[str],
    technique: str,
) -> str:
    """`` (did you mean 'x'?)`` for the unknown key at ``loc``, else the keys allowed there."""
    known = _keys_at(model, loc[:-1]) if model is not None else None
    if known is None:
        return " (not a parameter here)"
    if not loc[:-1]:
        known = [*known, *reserved]
    hint = did_you_mean(str(loc[-1]), known)
    if hint:
        return hint
    if not known:
        return " (no keys are allowed here)"
    more = f"; 'artplug list {technique}' explains them" if technique else ""
    return f" (allowed here: {', '.join(known)}{more})"


def _keys_at(model: type[BaseModel], path: Sequence[int | str]) -> list[str] | None:
    """The field names of the (nested) model at ``path`` inside ``model``; None if not one."""
    current: type[BaseModel] | None = model
    for part in path:
        info = current.model_fields.get(str(part)) if current is not None else None
        if info is None:
            return None
        current = _model_in(info.annotation)
    return list(current.model_fields) if current is not None else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``Sub`` or ``Sub | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


_TOML_TYPES = ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"))


def _describe(value: Any) -> str:
    """A recipe value for an error message, e.g. ``the string "1"``; long values cut short."""
    for kind, name in _TOML_TYPES:
        if isinstance(value, kind):
            text = _toml_value(value)
            return f"the {name} {text if len(text) <= 40 else text[:37] + '...'}"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float usable as a finite float (bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        # An int beyond float's range (TOML allows any size to tomllib) is not finite either.
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _non_finite(value: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """``(location, value)`` of every inf or nan float in a raw table, nested ones too."""
    if isinstance(value, float) and not math.isfinite(value):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{where}.{index}" if where else str(index))


def out_dir_problem(out_dir: str) -> str | None:
    """Why ``run.out_dir`` cannot hold run folders, as a one-line problem; None when it can.

    Looks at the folder, or at its nearest existing ancestor when it does not exist yet (the
    run creates it), and creates nothing: ``artplug validate`` must not touch the disk.
    """
    fix = "set run.out_dir (or --set run.out_dir=PATH) to a folder you can write to"
    path = Path(out_dir)
    try:
        probe = path
        # The nearest existing ancestor decides: mkdir(parents=True) fails exactly there.
        while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
            probe = probe.parent
        if probe == path and path.exists() and not path.is_dir():
            return f"run.out_dir: {out_dir!r} is a file, not a folder; {fix}"
        if not probe.is_dir():
            what = "a broken link" if not probe.exists() else "a file, not a folder"
            return f"run.out_dir: {out_dir!r} cannot be created: {str(probe)!r} is {what}; {fix}"
        if not os.access(probe, os.W_OK | os.X_OK):
            return (
                f"run.out_dir: {out_dir!r} cannot be created: {str(probe)!r} is not writable; {fix}"
            )
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a folder we cannot read
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"run.out_dir: {out_dir!r} cannot be used ({reason}); {fix}"
    return None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# --set overrides


def parse_value(text: str) -> Any:
    """A ``--set`` value in TOML syntax (``0.1``, ``true``, ``[1, 2]``, ``"a"``); else a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        # Bare words (``--set data.dataset=cifar10``) are strings; anything with TOML syntax
        # characters that failed to parse is a genuine mistake.
        if any(ch in text for ch in "[]{}\"'"):
            raise ValueError(f"{text!r} is not a valid TOML value") from None
        return text


def _split_key(key: str) -> list[str]:
    # ``loss[0].beta`` and ``loss.0.beta`` mean the same thing.
    return [part for part in key.replace("[", ".").replace("]", "").split(".") if part]


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``key=value`` override to the raw recipe in place."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError("expected KEY=VALUE, e.g. --set optim.lr=0.05")
    if any("\ud800" <= ch <= "\udfff" for ch in override):
        # Python decodes undecodable argv bytes to lone surrogates; they cannot be written to
        # the resolved recipe (UTF-8) later, so they are refused here.
        raise ValueError("not valid UTF-8 text (the shell passed undecodable bytes)")
    parts = _split_key(key)
    if not parts:  # a key of only brackets and dots, e.g. --set '[=1'
        raise ValueError("expected KEY=VALUE, e.g. --set optim.lr=0.05")
    value = parse_value(text.strip())
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, parts[: depth + 1])
        elif isinstance(node, dict):
            if part not in node:
                if depth == 0 and part not in ALL_TABLES:
                    raise ValueError(f"unknown table {part!r}{did_you_mean(part, ALL_TABLES)}")
                node[part] = [] if part in ("transform", "loss", "schedule") else {}
            node = node[part]
        else:
            raise ValueError(f"{'.'.join(parts[: depth + 1])} is not a table")
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, parts)  # an index past the end is an error, not an append
        node[_index(last, parts)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"{'.'.join(parts[:-1])} is not a table")


def _index(part: str, parts: Sequence[str]) -> int:
    # isascii: str.isdigit() also passes '²', which int() refuses.
    if not (part.isascii() and part.isdigit()):
        raise ValueError(f"{'.'.join(parts)}: expected an index like loss.0.weight")
    return int(part)


def _list_item(node: list[Any], part: str, parts: Sequence[str]) -> Any:
    index = _index(part, parts)
    if index >= len(node):
        raise ValueError(f"{'.'.join(parts)}: the recipe has only {len(node)} such table(s)")
    return node[index]


# --------------------------------------------------------------------------------------------
# TOML output (the resolved recipe); a small writer for the plain data this module produces.


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string."""
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            # TOML forbids raw control characters; JSON's escaping (json.dumps) misses DEL and,
            # with ensure_ascii, writes surrogate pairs, which TOML rejects.
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    # Bare keys are ASCII only (str.isalnum() would also pass '²' or 'é').
    if key and all(ch in _BARE_KEY_CHARS for ch in key):
        return key
    return _toml_string(key)


_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def toml_value(value: Any) -> str:
    """``value`` (plain data: bool, int, float, str, list, dict) written as a TOML value."""
    return _toml_value(value)


def toml_key(key: str) -> str:
    """``key`` as a TOML key: bare when it can be, else a quoted string."""
    return _toml_key(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(
            f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None
        )
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _scalars(table: Mapping[str, Any]) -> list[str]:
    # TOML has no null: a None (an automatic value) is left out, which re-reads as the default.
    return [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if v is not None]


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Write nested plain data as TOML: tables, arrays of tables, scalars and lists."""
    lines: list[str] = []
    for name, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{_toml_key(name)}]", *_scalars(value)]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += ["", f"[[{_toml_key(name)}]]", *_scalars(item)]
        elif isinstance(value, list) and not value:
            continue
        else:
            lines.append(f"{_toml_key(name)} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# JSON schema


def json_schema(registries: Registries) -> dict[str, Any]:
    """The JSON schema of recipes, including every installed technique's parameters."""
    defs: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    for name, model in SECTIONS.items():
        schema = model.model_json_schema()
        defs.update(schema.pop("$defs", {}))
        properties[name] = schema
    for kind in TECHNIQUE_TABLES:
        variants = []
        for entry in registries.of(kind):  # type: ignore[arg-type]
            schema = entry.cls.Params.model_json_schema()
            defs.update(schema.pop("$defs", {}))
            props = dict(schema.get("properties", {}))
            props["use"] = {"const": entry.name, "description": entry.description}
            if kind == "loss":
                props["id"] = {"type": "string", "description": "knob prefix; default: use"}
                props["weight"] = {"type": "number", "default": 1.0}
            if kind == "perturbation":
                props["model_mode"] = {"enum": ["eval", "train"], "default": "eval"}
            variants.append(
                {
                    "title": entry.name,
                    "type": "object",
                    "properties": props,
                    "required": ["use", *schema.get("required", [])],
                    "additionalProperties": False,
                }
            )
        table = {"anyOf": variants} if variants else {"type": "object"}
        properties[kind] = table if kind == "perturbation" else {"type": "array", "items": table}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "artplug recipe",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "$defs": defs,
    }
