"""The lab notebook on top of MLflow: compare runs, sweep a grid of recipes, re-run a logged one.

Everything here reads what ``artplug run`` logged (params = the flattened resolved recipe, the
``test/<attack>_acc`` metrics, ``time/wall_s``, the ``cost/*`` totals, the tags) and never
re-evaluates a model. The command line (:mod:`artplug.cli`) drives it:

* ``artplug compare``: :func:`open_store`, :func:`collect`, :func:`render`, :func:`plot_chart`;
* ``artplug sweep``: :func:`parse_grid`, :func:`combinations`, the tag names below;
* ``artplug rerun``: :func:`fetch_logged_recipe`.

mlflow and matplotlib are imported inside the functions that need them, so that importing this
module stays cheap.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from artplug.errors import ArtplugError

# Names in the tracking store (see docs/tracking.md).
TEST_METRIC = re.compile(r"test/(?P<attack>.+)_acc")
WALL_METRIC = "time/wall_s"
EPOCH_METRIC = "epoch"
FORWARD_METRIC = "cost/total_forward_per_example"
BACKWARD_METRIC = "cost/total_backward_per_example"
TRAIN_TIME_METRIC = "cost/train_s"
TECHNIQUES_TAG = "artplug.techniques"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nested-run link, shown as a tree in the UI
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
SWEEP_GRID_TAG = "artplug.sweep.grid"  # on a sweep's parent: JSON {key: [value, ...]}
SWEEP_SIZE_TAG = "artplug.sweep.size"  # on a sweep's parent: the number of combinations
SWEEP_VALUES_TAG = "artplug.sweep.values"  # on each child: JSON {key: value}
SWEEP_INDEX_TAG = "artplug.sweep.index"  # on each child: "3/8"
RERUN_TAG = "artplug.rerun_of"
RERUN_OVERRIDES_TAG = "artplug.rerun.overrides"
ERROR_TAG = "artplug.error"
RECIPE_ARTIFACT = "recipe.resolved.toml"

RUN_ID = re.compile(r"[0-9a-f]{32}")

Format = Literal["table", "markdown", "csv"]
FORMATS: tuple[Format, ...] = ("table", "markdown", "csv")

_MAX_RESULTS = 1000  # MLflow's page size for search_runs


# ------------------------------------------------------------------------------------------
# Rows


@dataclass
class RunRow:
    """What ``artplug compare`` shows of one run, read from its params, metrics and tags.

    Accuracies are fractions in [0, 1]; ``robust`` maps each attack-table entry other than
    ``clean`` and ``worst`` to its test accuracy. ``None`` means "not logged".
    """

    run_id: str
    name: str
    status: str
    techniques: str
    dataset: str
    model: str
    threat: str
    epochs: str
    clean: float | None = None
    robust: dict[str, float] = field(default_factory=dict)
    worst: float | None = None
    wall_s: float | None = None
    forward_per_example: float | None = None
    backward_per_example: float | None = None
    train_s: float | None = None
    grid: dict[str, str] = field(default_factory=dict)

    @property
    def score(self) -> tuple[float | None, str]:
        """The robust accuracy the rows are sorted by, and where it comes from.

        ``test/worst_acc`` (an example counts only if it survives every attack) when logged,
        else the lowest robust accuracy the run has, else ``(None, "-")``.
        """
        if self.worst is not None:
            return self.worst, "worst"
        if self.robust:
            attack = min(self.robust, key=lambda name: (self.robust[name], name))
            return self.robust[attack], attack
        return None, "-"


def format_eps(eps: float) -> str:
    """``eps`` as people write it: ``0.2``, ``0.5``, or ``8/255`` for a multiple of 1/255."""
    short = f"{eps:.4g}"
    if float(short) == eps:
        return short
    numerator = round(eps * 255)
    if numerator and math.isclose(eps, numerator / 255, rel_tol=1e-9, abs_tol=0.0):
        return f"{numerator}/255"
    return short


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _model_label(params: Mapping[str, str]) -> str:
    arch = params.get("model.arch", "?")
    if arch == "wide-resnet" and "model.depth" in params and "model.width" in params:
        return f"wrn-{params['model.depth']}-{params['model.width']}"
    return arch


def _techniques(params: Mapping[str, str], tags: Mapping[str, str]) -> str:
    if tags.get(TECHNIQUES_TAG):
        return tags[TECHNIQUES_TAG]
    # Runs logged without the tag: rebuild the label the way ResolvedRecipe.summary() does.
    stack = [] if params.get("perturbation.use", "none") == "none" else [params["perturbation.use"]]
    for kind in ("transform", "loss"):
        index = 0
        while f"{kind}.{index}.use" in params:
            stack.append(params[f"{kind}.{index}.use"])
            index += 1
    return " + ".join(stack) or "-"


def row_from_run(run: Any) -> RunRow:
    """Read one MLflow ``Run`` (as returned by ``MlflowClient.search_runs``) into a row."""
    params: Mapping[str, str] = run.data.params
    metrics: Mapping[str, float] = run.data.metrics
    tags: Mapping[str, str] = run.data.tags
    eps = _number(params.get("threat.eps"))
    threat = f"{params.get('threat.norm', '?')} {format_eps(eps) if eps is not None else '?'}"
    planned = params.get("run.epochs", "?")
    done = metrics.get(EPOCH_METRIC)
    epochs = planned
    if done is not None and str(int(done)) != planned:
        epochs = f"{int(done)}/{planned}"  # stopped early (interrupted, early stop, max steps)
    row = RunRow(
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get("mlflow.runName", run.info.run_id[:8]),
        status=run.info.status,
        techniques=_techniques(params, tags),
        dataset=params.get("data.dataset", "?"),
        model=_model_label(params),
        threat=threat,
        epochs=epochs,
        wall_s=metrics.get(WALL_METRIC),
        forward_per_example=metrics.get(FORWARD_METRIC),
        backward_per_example=metrics.get(BACKWARD_METRIC),
        train_s=metrics.get(TRAIN_TIME_METRIC),
    )
    for key, value in metrics.items():
        match = TEST_METRIC.fullmatch(key)
        if match is None:
            continue
        attack = match["attack"]
        if attack == "clean":
            row.clean = value
        elif attack == "worst":
            row.worst = value
        else:
            row.robust[attack] = value
    if tags.get(SWEEP_VALUES_TAG):
        try:
            values = json.loads(tags[SWEEP_VALUES_TAG])
        except json.JSONDecodeError:
            values = {}
        if isinstance(values, dict):
            row.grid = {str(k): str(v) for k, v in values.items()}
    return row


def sort_rows(rows: Iterable[RunRow]) -> list[RunRow]:
    """Best robust accuracy first; then clean accuracy; runs without a robust score last."""

    def key(row: RunRow) -> tuple[int, float, float, str]:
        score, _ = row.score
        return (
            score is None,
            -(score if score is not None else 0.0),
            -(row.clean if row.clean is not None else -1.0),
            row.name,
        )

    return sorted(rows, key=key)


# ------------------------------------------------------------------------------------------
# Collecting runs from the store


@dataclass
class Comparison:
    """The runs to compare, already sorted, with what the table needs to lay them out."""

    title: str
    rows: list[RunRow]
    grid_keys: list[str] = field(default_factory=list)
    hidden_parents: int = 0
    slug: str = "runs"
    uri: str = ""

    @property
    def attacks(self) -> list[str]:
        """The robust-accuracy columns: every attack of any row, weakest attack first.

        "Weakest" = highest mean accuracy over the rows that have it, so the columns read from
        fgsm towards the strongest attack without this module knowing the attack table.
        """
        values: dict[str, list[float]] = {}
        for row in self.rows:
            for attack, accuracy in row.robust.items():
                values.setdefault(attack, []).append(accuracy)
        return sorted(values, key=lambda name: (-sum(values[name]) / len(values[name]), name))

    def sort_note(self) -> str:
        """Which robust accuracy the rows are sorted by, in words."""
        sources = {row.score[1] for row in self.rows if row.score[0] is not None}
        if not sources:
            return "no run has a robust test accuracy; sorted by clean accuracy"
        if sources == {"worst"}:
            return (
                "sorted by robust accuracy: test/worst_acc (an example counts only if it "
                "survives every attack)"
            )
        if "worst" not in sources:
            return "sorted by robust accuracy: each run's lowest robust accuracy column"
        return (
            "sorted by robust accuracy: test/worst_acc where logged, else the run's lowest "
            "robust accuracy column (runs marked *)"
        )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "runs"


def default_experiment() -> str:
    """The experiment a plain ``artplug run`` logs to (the recipe's ``[tracking]`` default)."""
    from artplug.recipe import TrackingSection

    return str(TrackingSection.model_fields["experiment"].default)


def open_store(tracking_uri: str | None = None) -> tuple[Any, str]:
    """An ``MlflowClient`` on ``tracking_uri`` (default: MLflow's, MLFLOW_TRACKING_URI) and the URI.

    Reading must not create anything: a local SQLite store that does not exist is a user error
    (usually ``artplug compare`` started in another folder than ``artplug run``), not a new,
    empty database.
    """
    import mlflow

    from artplug.tracking import _probe_http, _quiet_store_setup_logs

    _quiet_store_setup_logs()
    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(unquote(uri.removeprefix("sqlite:///").split("?", 1)[0]))
        if str(path) != ":memory:" and not path.is_file():
            raise ArtplugError(
                f"no MLflow store at '{uri}' ({path} does not exist); run this in the folder "
                "where you ran artplug run, or set MLFLOW_TRACKING_URI / --tracking-uri"
            )
    _probe_http(uri)
    return mlflow.MlflowClient(tracking_uri=uri), uri


def _store_error(uri: str, what: str, exc: Exception) -> ArtplugError:
    from artplug.tracking import _short

    return ArtplugError(f"cannot {what} at '{uri}': {_short(exc, 300)}")


def _search(client: Any, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    """Every active run matching the filter (search_runs pages through large experiments)."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, max_results=_MAX_RESULTS, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def get_run(client: Any, uri: str, run_id: str) -> Any:
    """The run ``run_id``; a malformed or unknown id is a one-line user error."""
    if not RUN_ID.fullmatch(run_id):
        raise ArtplugError(f"{run_id!r} is not an MLflow run id (32 hexadecimal characters)")
    try:
        return client.get_run(run_id)
    except Exception as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise ArtplugError(f"no MLflow run {run_id} at '{uri}'") from None
        raise _store_error(uri, f"read run {run_id}", exc) from None


def _find_experiment(client: Any, uri: str, name: str) -> Any | None:
    try:
        found = client.get_experiment_by_name(name)
        if found is None and name.isdigit():
            # An experiment id, as the MLflow UI shows it in its address bar.
            try:
                found = client.get_experiment(name)
            except Exception as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                found = None
    except Exception as exc:
        raise _store_error(uri, "read the MLflow store", exc) from None
    return found


def collect(
    client: Any,
    uri: str,
    experiment: str | None = None,
    run_ids: Sequence[str] = (),
    parent: str | None = None,
) -> Comparison:
    """The runs to compare, sorted: a sweep's children, an experiment's runs, or given runs.

    ``parent`` (a sweep's parent run id) shows its children with the grid keys as columns.
    ``experiment`` is an experiment name (or id); a run id there means that run, or its
    children when it is a sweep's parent. ``run_ids`` adds single runs. With none of them, the
    default experiment (:func:`default_experiment`) is shown. An experiment's sweep parents are
    left out (they hold no results; their children are listed).
    """
    if parent is None and experiment is None and not run_ids:
        experiment = default_experiment()
    extra = list(run_ids)
    found: Any | None = None  # the experiment to list, when one is named
    if experiment is not None:
        found = _find_experiment(client, uri, experiment)
        if found is None and RUN_ID.fullmatch(experiment):
            run = get_run(client, uri, experiment)
            if SWEEP_GRID_TAG in run.data.tags and parent is None:
                parent = experiment
            else:
                extra.insert(0, experiment)
        elif found is None or found.lifecycle_stage == "deleted":
            state = "is deleted" if found is not None else "does not exist"
            raise ArtplugError(
                f"MLflow experiment {experiment!r} {state} at '{uri}'; give an existing "
                "experiment name, a run id (--run) or a sweep's parent run id"
            )
    rows: dict[str, RunRow] = {}
    grid_keys: list[str] = []
    hidden = 0
    title_parts: list[str] = []
    slug = "runs"
    if parent is not None:
        parent_run = get_run(client, uri, parent)
        grid = _grid_of(parent_run)
        grid_keys = list(grid)
        try:
            children = _search(
                client, [parent_run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'"
            )
        except Exception as exc:
            raise _store_error(uri, f"list the runs of sweep {parent}", exc) from None
        size = parent_run.data.tags.get(SWEEP_SIZE_TAG, "?")
        title_parts.append(
            f"sweep '{parent_run.info.run_name}' ({parent}, {parent_run.info.status}): "
            f"{len(children)} of {size} runs"
        )
        slug = f"sweep-{_slug(parent_run.info.run_name or '')}-{parent[:8]}"
        for run in children:
            rows[run.info.run_id] = row_from_run(run)
    if found is not None:
        try:
            runs = _search(client, [str(found.experiment_id)])
        except Exception as exc:
            raise _store_error(uri, f"list the runs of experiment {experiment!r}", exc) from None
        for run in runs:
            if SWEEP_GRID_TAG in run.data.tags:
                hidden += 1
                continue
            rows[run.info.run_id] = row_from_run(run)
        title_parts.append(f"experiment '{found.name}': {_plural(len(runs) - hidden, 'run')}")
        slug = _slug(found.name)
    for run_id in extra:
        if run_id not in rows:
            rows[run_id] = row_from_run(get_run(client, uri, run_id))
    if extra:
        title_parts.append(f"{len(extra)} run(s) given")
    if not rows:
        where = " and ".join(title_parts) or "nothing to compare"
        raise ArtplugError(f"no runs to compare ({where}) at '{uri}'")
    return Comparison(
        title="; ".join(title_parts),
        rows=sort_rows(rows.values()),
        grid_keys=grid_keys,
        hidden_parents=hidden,
        slug=slug,
        uri=uri,
    )


def _grid_of(run: Any) -> dict[str, list[str]]:
    text = run.data.tags.get(SWEEP_GRID_TAG)
    if text is None:
        raise ArtplugError(
            f"run {run.info.run_id} is not a sweep's parent run (no {SWEEP_GRID_TAG} tag); "
            "compare it with --run instead"
        )
    try:
        grid = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return (
        {str(k): [str(v) for v in vs] for k, vs in grid.items()} if isinstance(grid, dict) else {}
    )


# ------------------------------------------------------------------------------------------
# Rendering


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _raw(value: float | None) -> str:
    return "" if value is None else repr(value)


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, cells and which columns are numbers (right-aligned) of the human formats."""
    attacks = comparison.attacks
    mixed = {row.score[1] == "worst" for row in comparison.rows if row.score[0] is not None}
    mark_min = len(mixed) == 2  # some rows sorted by worst, others by their lowest column
    show_status = any(row.status != "FINISHED" for row in comparison.rows)
    headers = ["name", "techniques", "data/model", "threat", "epochs"]
    headers += comparison.grid_keys
    show_worst = any(row.worst is not None for row in comparison.rows)
    headers += ["clean", *attacks, *(["worst"] if show_worst else []), "wall", "fwd/ex", "bwd/ex"]
    numeric = [False] * (5 + len(comparison.grid_keys))
    numeric += [True] * (len(headers) - len(numeric))
    if show_status:
        headers.append("status")
        numeric.append(False)
    cells: list[list[str]] = []
    for row in comparison.rows:
        name = row.name + ("*" if mark_min and row.score[1] not in ("worst", "-") else "")
        line = [name, row.techniques, f"{row.dataset}/{row.model}", row.threat, row.epochs]
        line += [row.grid.get(key, "-") for key in comparison.grid_keys]
        line += [_percent(row.clean), *(_percent(row.robust.get(a)) for a in attacks)]
        line += [_percent(row.worst)] if show_worst else []
        line.append(_duration(row.wall_s))
        line += [_count(row.forward_per_example), _count(row.backward_per_example)]
        if show_status:
            line.append(row.status)
        cells.append(line)
    return headers, cells, numeric


def _plain_table(headers: list[str], cells: list[list[str]], numeric: list[bool]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return " | ".join(parts).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(c) for c in cells)])


def _markdown_table(headers: list[str], cells: list[list[str]], numeric: list[bool]) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(escape(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---:" if right else "---" for right in numeric) + "|")
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def _csv_table(comparison: Comparison) -> str:
    """Machine-readable: fractions and seconds at full precision, empty cells when missing."""
    attacks = comparison.attacks
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "run_id",
            "name",
            "status",
            "techniques",
            "dataset",
            "model",
            "threat",
            "epochs",
            *comparison.grid_keys,
            "clean_acc",
            *(f"{a}_acc" for a in attacks),
            "worst_acc",
            "robust_acc",
            "robust_from",
            "wall_s",
            "train_s",
            "forward_per_example",
            "backward_per_example",
        ]
    )
    for row in comparison.rows:
        score, source = row.score
        writer.writerow(
            [
                row.run_id,
                row.name,
                row.status,
                row.techniques,
                row.dataset,
                row.model,
                row.threat,
                row.epochs,
                *(row.grid.get(key, "") for key in comparison.grid_keys),
                _raw(row.clean),
                *(_raw(row.robust.get(a)) for a in attacks),
                _raw(row.worst),
                _raw(score),
                "" if score is None else source,
                _raw(row.wall_s),
                _raw(row.train_s),
                _raw(row.forward_per_example),
                _raw(row.backward_per_example),
            ]
        )
    return out.getvalue().rstrip("\n")


def render(comparison: Comparison, fmt: Format = "table") -> str:
    """The comparison as an aligned text table, a Markdown table or CSV (no title lines)."""
    if fmt == "csv":
        return _csv_table(comparison)
    headers, cells, numeric = table_rows(comparison)
    if fmt == "markdown":
        return _markdown_table(headers, cells, numeric)
    return _plain_table(headers, cells, numeric)


def describe(comparison: Comparison) -> list[str]:
    """The lines printed above the table: what is compared and how it is sorted."""
    where = f" at {comparison.uri}" if comparison.uri else ""
    lines = [comparison.title + where, comparison.sort_note()]
    if comparison.hidden_parents:
        lines.append(
            f"{comparison.hidden_parents} sweep parent run(s) not shown (their runs are); "
            "artplug compare <PARENT_RUN_ID> shows one sweep's grid"
        )
    return lines


def plot_chart(comparison: Comparison, path: str | Path) -> Path | None:
    """Robust (the sort key) against clean test accuracy, one labelled point per run, as PNG.

    Returns the path, or ``None`` when no run has both numbers (nothing is written then).
    """
    points = [
        (row, row.clean, row.score[0])
        for row in comparison.rows
        if row.clean is not None and row.score[0] is not None
    ]
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(6.5, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for row, clean, robust in points:
        assert clean is not None and robust is not None
        x, y = 100.0 * clean, 100.0 * robust
        axes.scatter([x], [y], s=28)
        label = ", ".join(f"{k}={v}" for k, v in row.grid.items()) if row.grid else row.name
        label = label if len(label) <= 40 else label[:39] + "…"
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    sources = {row.score[1] for row, _, _ in points}
    if sources == {"worst"}:
        meaning = "worst case over the attacks"
    elif "worst" in sources:
        meaning = "worst case, else the lowest attack"
    else:
        meaning = "the lowest attack"
    axes.set_xlabel("clean test accuracy (%)")
    axes.set_ylabel(f"robust test accuracy (%): {meaning}", fontsize=9)
    axes.set_title(comparison.title if len(comparison.title) <= 90 else comparison.slug, fontsize=9)
    axes.margins(x=0.15, y=0.1)  # room for the labels of points at the edges
    # Accuracies live in [0, 100]: the margins must not stretch an axis past 100 %.
    low_x, high_x = axes.get_xlim()
    low_y, high_y = axes.get_ylim()
    axes.set_xlim(max(low_x, 0.0), min(high_x, 100.5))
    axes.set_ylim(max(low_y, 0.0), min(high_y, 100.5))
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, format="png")
    return out


# ------------------------------------------------------------------------------------------
# Sweeps


def split_values(text: str) -> list[str]:
    """Split ``v1,v2,...`` at the commas outside brackets, braces and quotes.

    So a value may itself hold commas when it is a TOML list, inline table or string:
    ``["clean","fgsm"],["clean"]`` is two values, ``"a,b",c`` too.
    """
    values: list[str] = []
    current: list[str] = []
    depth = 0
    quote: str | None = None
    escaped = False
    for char in text:
        if quote is not None:
            current.append(char)
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True  # TOML basic strings escape with a backslash; literal ones don't
            elif char == quote:
                quote = None
            continue
        if char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {char!r} in {text!r}")
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if quote is not None or depth != 0:
        raise ValueError(f"unclosed {'quote' if quote else 'bracket'} in {text!r}")
    values.append("".join(current).strip())
    return values


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``--grid KEY=V1,V2`` options as ``{key: [value text, ...]}``, in the order given.

    Raises :class:`~artplug.errors.ArtplugError` (one line listing every problem) for a
    malformed option, an empty value, a key given twice, a value repeated within a key, or a
    ``tracking.*`` key (a sweep's runs share one experiment and store).
    """
    from artplug.recipe import _split_key

    grid: dict[str, list[str]] = {}
    problems: list[str] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        # loss[0].beta and loss.0.beta name the same value (as in --set).
        key = ".".join(_split_key(key.strip()))
        if not sep or not key:
            problems.append(f"--grid {spec}: expected KEY=V1,V2,..., e.g. optim.lr=0.05,0.1")
            continue
        if key.split(".")[0] == "tracking":
            problems.append(
                f"--grid {spec}: tracking.* cannot vary within a sweep (its runs share one "
                "experiment and store); use --set"
            )
            continue
        if key in grid:
            problems.append(f"--grid {spec}: {key} is already a grid key")
            continue
        try:
            values = split_values(text)
        except ValueError as exc:
            problems.append(f"--grid {spec}: {exc}")
            continue
        if any(not value for value in values):
            problems.append(f"--grid {spec}: empty value (values are separated by commas)")
            continue
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            problems.append(f"--grid {spec}: value(s) given twice: {', '.join(repeated)}")
            continue
        grid[key] = values
    if not specs:
        problems.append("give at least one --grid KEY=V1,V2,...")
    if problems:
        raise ArtplugError("; ".join(problems))
    return grid


def combinations(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def combination_label(values: Mapping[str, str]) -> str:
    """``optim.lr=0.05 perturbation.steps=3``: how a combination is shown and named."""
    return " ".join(f"{key}={value}" for key, value in values.items())


def combination_overrides(values: Mapping[str, str]) -> list[str]:
    """The ``--set`` overrides that apply one combination."""
    return [f"{key}={value}" for key, value in values.items()]


# ------------------------------------------------------------------------------------------
# Re-runs


def fetch_logged_recipe(run_id: str, tracking_uri: str | None = None) -> tuple[dict[str, Any], Any]:
    """The resolved recipe logged with run ``run_id`` (parsed TOML), and the run itself.

    Raises :class:`~artplug.errors.ArtplugError` (one line) for an unknown run or a run
    without a ``recipe.resolved.toml`` artifact.
    """
    client, uri = open_store(tracking_uri)
    run = get_run(client, uri, run_id)
    try:
        names = {item.path for item in client.list_artifacts(run_id)}
    except Exception as exc:
        raise _store_error(uri, f"list the artifacts of run {run_id}", exc) from None
    if RECIPE_ARTIFACT not in names:
        raise ArtplugError(
            f"run {run_id} has no {RECIPE_ARTIFACT} artifact to re-run from (it was not "
            "made by artplug run, or failed before training started)"
        )
    with tempfile.TemporaryDirectory(prefix="artplug-rerun-") as scratch, _no_progress_bar():
        try:
            local = client.download_artifacts(run_id, RECIPE_ARTIFACT, scratch)
            raw = tomllib.loads(Path(local).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ArtplugError(f"run {run_id}: cannot read its {RECIPE_ARTIFACT} ({exc})") from None
        except Exception as exc:
            raise _store_error(uri, f"download {RECIPE_ARTIFACT} of run {run_id}", exc) from None
    return raw, run


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """Silence MLflow's artifact download progress bar (it would break one-line output)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
