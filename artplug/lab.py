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
import shutil
import tempfile
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from artplug.display import clock as clock  # re-exported: the lab commands import only lab
from artplug.errors import ArtplugError, did_you_mean

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
SANITY_TAG = "artplug.sanity"  # the gate's summary: passed, FAILED: <checks>, ERROR: <why>
SANITY_PASSED_METRIC = "sanity/passed"  # 1 or 0; with the sanity.<check> tags (pass, fail, ...)

GATE_NOT_RUN = "not run"
GATE_ERROR = "error"  # the gate itself failed to run (its traceback went to the run's stderr)

RECIPE_EXPERIMENTS = ("artplug-quickstart", "artplug-digits", "artplug-mnist", "artplug-cifar10")
"""The ``[tracking] experiment`` values of the recipes shipped in recipes/: with the default
experiment, what a bare ``artplug compare`` looks for (tests/test_compare.py keeps it in step)."""

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
    gate: str = GATE_NOT_RUN
    experiment: str = ""

    @property
    def gate_failed(self) -> bool:
        """Whether the run failed the sanity gate (its robust accuracy may be overstated)."""
        return self.gate.startswith("FAILED")

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


def gate_of(tags: Mapping[str, str], metrics: Mapping[str, float]) -> str:
    """The sanity gate's verdict on a run: ``passed``, ``FAILED: <checks>``, ``error``, ``not run``.

    From the ``artplug.sanity`` tag, else (a run whose tags were not all written) from the
    ``sanity/passed`` metric and the ``sanity.<check>`` tags.
    """
    summary = tags.get(SANITY_TAG)
    if summary:
        return GATE_ERROR if summary.startswith("ERROR") else summary
    passed = metrics.get(SANITY_PASSED_METRIC)
    if passed is None:
        return GATE_NOT_RUN
    if passed >= 0.5:
        return "passed"
    checks = sorted(
        key.removeprefix("sanity.")
        for key, value in tags.items()
        if key.startswith("sanity.") and value == "fail"
    )
    return "FAILED: " + ", ".join(checks) if checks else "FAILED"


def row_from_run(run: Any, experiment: str = "") -> RunRow:
    """Read one MLflow ``Run`` (as returned by ``MlflowClient.search_runs``) into a row.

    ``experiment``: the name of the run's experiment, when the caller knows it.
    """
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
        gate=gate_of(tags, metrics),
        experiment=experiment,
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


def sort_rows(rows: Iterable[RunRow], *, by_gate: bool = True) -> list[RunRow]:
    """Best robust accuracy first; then clean accuracy; runs without a robust score last.

    ``by_gate``: runs that failed the sanity gate come after all the others, whatever their
    accuracy (a robust accuracy under gradient masking is not a result to rank first).
    """

    def key(row: RunRow) -> tuple[bool, bool, float, float, str]:
        score, _ = row.score
        return (
            by_gate and row.gate_failed,
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
    by_gate: bool = True  # the rows are ranked with the gate's failures last
    remarks: list[str] = field(default_factory=list)  # lines for above the table

    @property
    def several_experiments(self) -> bool:
        """Whether the rows come from more than one experiment (then a column says which)."""
        return len({row.experiment for row in self.rows}) > 1

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


class NoRunsYet(ArtplugError):
    """A bare ``artplug compare`` found no run in any experiment of the store.

    ``experiments`` names the store's experiments (all without runs), for a message that shows
    what is there; ``artplug compare`` prints them and exits with status 0.
    """

    def __init__(self, uri: str, experiments: list[str]) -> None:
        self.uri = uri
        self.experiments = experiments
        names = ", ".join(experiments) or "none"
        super().__init__(f"no runs to compare at '{uri}' (experiments there: {names})")


def _active_experiments(client: Any, uri: str) -> list[Any]:
    try:
        return list(client.search_experiments())  # active ones only, by default
    except Exception as exc:
        raise _store_error(uri, "list the experiments", exc) from None


def _has_runs(client: Any, uri: str, experiment_id: str) -> bool:
    try:
        return bool(client.search_runs([experiment_id], max_results=1))
    except Exception as exc:
        raise _store_error(uri, f"list the runs of experiment {experiment_id}", exc) from None


def default_experiments(client: Any, uri: str) -> tuple[list[Any], list[str]]:
    """The experiments a bare ``artplug compare`` shows, and a remark on the choice (or none).

    The default experiment and those of the shipped recipes (:data:`RECIPE_EXPERIMENTS`) that
    hold runs; when none does, the experiment of the most recent run. Raises
    :class:`NoRunsYet` when no experiment holds a run.
    """
    experiments = _active_experiments(client, uri)
    by_name = {found.name: found for found in experiments}
    names = (default_experiment(), *RECIPE_EXPERIMENTS)
    chosen = [
        by_name[name]
        for name in names
        if name in by_name and _has_runs(client, uri, str(by_name[name].experiment_id))
    ]
    if chosen:
        return chosen, []
    ids = [str(found.experiment_id) for found in experiments]
    try:
        latest = (
            client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1)
            if ids
            else []
        )
    except Exception as exc:
        raise _store_error(uri, "list the latest run", exc) from None
    if not latest:
        raise NoRunsYet(uri, sorted((found.name for found in experiments), key=str.lower))
    (recent,) = [f for f in experiments if str(f.experiment_id) == latest[0].info.experiment_id]
    remark = (
        f"the experiments of plain runs and of the shipped recipes ({', '.join(names)}) have "
        f"no runs here; showing '{recent.name}', the one with the latest run"
    )
    return [recent], [remark]


def _unknown_experiment(client: Any, uri: str, name: str, state: str) -> ArtplugError:
    """The one-line error for an experiment that does not exist, with the ones that do."""
    names = [found.name for found in _active_experiments(client, uri)]
    known = ", ".join(repr(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
    return ArtplugError(
        f"MLflow experiment {name!r} {state} at '{uri}'{did_you_mean(name, names)}; give an "
        f"existing experiment name ({known or 'there are none'}), a run id (--run) or a "
        "sweep's parent run id"
    )


def collect(
    client: Any,
    uri: str,
    experiment: str | None = None,
    run_ids: Sequence[str] = (),
    parent: str | None = None,
    *,
    by_gate: bool = True,
) -> Comparison:
    """The runs to compare, sorted: a sweep's children, an experiment's runs, or given runs.

    ``parent`` (a sweep's parent run id) shows its children with the grid keys as columns.
    ``experiment`` is an experiment name (or id); a run id there means that run, or its
    children when it is a sweep's parent. ``run_ids`` adds single runs. With none of them,
    :func:`default_experiments` are shown. An experiment's sweep parents are left out (they
    hold no results; their children are listed). ``by_gate``: runs that failed the sanity
    gate are ranked last (:func:`sort_rows`).
    """
    extra = list(run_ids)
    listed: list[Any] = []  # the experiments whose runs are listed
    remarks: list[str] = []
    if parent is None and experiment is None and not run_ids:
        listed, remarks = default_experiments(client, uri)
    elif experiment is not None:
        found = _find_experiment(client, uri, experiment)
        if found is None and RUN_ID.fullmatch(experiment):
            run = get_run(client, uri, experiment)
            if SWEEP_GRID_TAG in run.data.tags and parent is None:
                parent = experiment
            else:
                extra.insert(0, experiment)
        elif found is None or found.lifecycle_stage == "deleted":
            state = "is deleted" if found is not None else "does not exist"
            raise _unknown_experiment(client, uri, experiment, state)
        else:
            listed = [found]
    rows: dict[str, RunRow] = {}
    grid_keys: list[str] = []
    hidden = 0
    title_parts: list[str] = []
    slug = "runs"
    names: dict[str, str] = {}  # experiment id -> name, for the rows

    def name_of(experiment_id: str) -> str:
        if experiment_id not in names:
            try:
                names[experiment_id] = client.get_experiment(experiment_id).name
            except Exception:
                names[experiment_id] = experiment_id  # only a label: the id will do
        return names[experiment_id]

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
            rows[run.info.run_id] = row_from_run(run, name_of(run.info.experiment_id))
    counts: list[str] = []
    for found in listed:
        names[str(found.experiment_id)] = found.name
        try:
            runs = _search(client, [str(found.experiment_id)])
        except Exception as exc:
            raise _store_error(uri, f"list the runs of experiment {found.name!r}", exc) from None
        parents = 0
        for run in runs:
            if SWEEP_GRID_TAG in run.data.tags:
                parents += 1
                continue
            rows[run.info.run_id] = row_from_run(run, found.name)
        hidden += parents
        counts.append(f"'{found.name}': {_plural(len(runs) - parents, 'run')}")
    if len(counts) == 1:
        title_parts.append(f"experiment {counts[0]}")
    elif counts:
        title_parts.append(f"experiments {', '.join(counts)}")
    if listed:
        slug = "_".join(_slug(found.name) for found in listed)
    for run_id in extra:
        if run_id not in rows:
            run = get_run(client, uri, run_id)
            rows[run_id] = row_from_run(run, name_of(run.info.experiment_id))
    if extra:
        title_parts.append(f"{len(extra)} run(s) given")
    if not rows:
        where = " and ".join(title_parts) or "nothing to compare"
        raise ArtplugError(f"no runs to compare ({where}) at '{uri}'")
    return Comparison(
        title="; ".join(title_parts),
        rows=sort_rows(rows.values(), by_gate=by_gate),
        grid_keys=grid_keys,
        hidden_parents=hidden,
        slug=slug,
        uri=uri,
        by_gate=by_gate,
        remarks=remarks,
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


# Columns of the human formats that hold results: never left out, even when every row agrees.
_RESULT_COLUMNS = ("name", "clean", "worst")


@dataclass
class Table:
    """The human formats' table: headers, cells, which columns are numbers (right-aligned).

    ``constant`` holds the columns left out because every row has the same value in them
    (header -> that value), said once above the table instead.
    """

    headers: list[str]
    cells: list[list[str]]
    numeric: list[bool]
    constant: dict[str, str] = field(default_factory=dict)


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, cells and which columns are numbers (right-aligned) of the human formats.

    Every column; :func:`layout` leaves out those that are the same in every row.
    """
    attacks = comparison.attacks
    mixed = {row.score[1] == "worst" for row in comparison.rows if row.score[0] is not None}
    mark_min = len(mixed) == 2  # some rows sorted by worst, others by their lowest column
    show_status = any(row.status != "FINISHED" for row in comparison.rows)
    several = comparison.several_experiments
    headers = ["name", *(["experiment"] if several else [])]
    headers += ["techniques", "data/model", "threat", "epochs", *comparison.grid_keys]
    numeric = [False] * len(headers)
    show_worst = any(row.worst is not None for row in comparison.rows)
    headers += ["clean", *attacks, *(["worst"] if show_worst else [])]
    numeric += [True] * (len(headers) - len(numeric))
    headers.append("gate")
    numeric.append(False)
    headers += ["wall", "fwd/ex", "bwd/ex"]
    numeric += [True] * 3
    if show_status:
        headers.append("status")
        numeric.append(False)
    cells: list[list[str]] = []
    for row in comparison.rows:
        name = row.name + ("*" if mark_min and row.score[1] not in ("worst", "-") else "")
        line = [name, *([row.experiment] if several else [])]
        line += [row.techniques, f"{row.dataset}/{row.model}", row.threat, row.epochs]
        line += [row.grid.get(key, "-") for key in comparison.grid_keys]
        line += [_percent(row.clean), *(_percent(row.robust.get(a)) for a in attacks)]
        line += [_percent(row.worst)] if show_worst else []
        line.append(row.gate)
        line.append(_duration(row.wall_s))
        line += [_count(row.forward_per_example), _count(row.backward_per_example)]
        if show_status:
            line.append(row.status)
        cells.append(line)
    return headers, cells, numeric


def layout(comparison: Comparison) -> Table:
    """:func:`table_rows` without the columns that are the same in every row (two rows or more).

    So that the table fits a terminal: a sweep's runs share their techniques, data, threat and
    epochs, which then go into one line above the table (:func:`describe`). The accuracy
    columns and the name always stay.
    """
    headers, cells, numeric = table_rows(comparison)
    attacks = set(comparison.attacks)
    keep = list(range(len(headers)))
    constant: dict[str, str] = {}
    if len(cells) > 1:
        keep = []
        for i, header in enumerate(headers):
            values = {line[i] for line in cells}
            if len(values) == 1 and header not in _RESULT_COLUMNS and header not in attacks:
                constant[header] = next(iter(values))
            else:
                keep.append(i)
    return Table(
        [headers[i] for i in keep],
        [[line[i] for i in keep] for line in cells],
        [numeric[i] for i in keep],
        constant,
    )


# A text column is never shortened below this many characters (its header may be longer).
_MIN_TEXT_WIDTH = 12


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def fit_width(
    headers: list[str], cells: list[list[str]], numeric: list[bool], width: int
) -> list[list[str]]:
    """``cells`` with the widest text columns cut (ending in ``…``) until the plain table is at
    most ``width`` characters wide, or every text column but the name is down to
    ``_MIN_TEXT_WIDTH``. Numbers and the run name are never cut: they are what a reader
    compares and what identifies the run (csv and markdown keep every character)."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    cuttable = [i for i, right in enumerate(numeric) if not right and headers[i] != "name"]
    while sum(widths) + 3 * (len(widths) - 1) > width:
        candidates = [i for i in cuttable if widths[i] > max(_MIN_TEXT_WIDTH, len(headers[i]))]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: widths[i])
        excess = sum(widths) + 3 * (len(widths) - 1) - width
        widths[widest] = max(_MIN_TEXT_WIDTH, len(headers[widest]), widths[widest] - excess)
    return [
        [_shorten(value, widths[i]) if i in cuttable else value for i, value in enumerate(line)]
        for line in cells
    ]


def _plain_table(
    headers: list[str], cells: list[list[str]], numeric: list[bool], width: int | None = None
) -> str:
    if width is not None:
        cells = fit_width(headers, cells, numeric, width)
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
    """Machine-readable: every column, fractions and seconds at full precision, empty cells
    when missing; ``gate`` as in the table (``passed``, ``FAILED: <checks>``, ``error``,
    ``not run``)."""
    attacks = comparison.attacks
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "run_id",
            "name",
            "experiment",
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
            "gate",
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
                row.experiment,
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
                row.gate,
                _raw(row.wall_s),
                _raw(row.train_s),
                _raw(row.forward_per_example),
                _raw(row.backward_per_example),
            ]
        )
    return out.getvalue().rstrip("\n")


def render(comparison: Comparison, fmt: Format = "table", width: int | None = None) -> str:
    """The comparison as an aligned text table, a Markdown table or CSV (no title lines).

    The text and Markdown tables leave out the columns every row agrees on (:func:`layout`;
    :func:`describe` says their values); CSV keeps every column. The text table is cut to
    ``width`` columns (default: the terminal's width, 100 off a terminal; ``COLUMNS``
    overrides) by shortening its long text cells (:func:`fit_width`).
    """
    if fmt == "csv":
        return _csv_table(comparison)
    table = layout(comparison)
    if fmt == "markdown":
        return _markdown_table(table.headers, table.cells, table.numeric)
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns
    return _plain_table(table.headers, table.cells, table.numeric, width)


def describe(comparison: Comparison, fmt: Format = "table") -> list[str]:
    """The lines printed above the table: what is compared, how it is sorted, and (text and
    Markdown formats) the values of the columns left out because every run has the same."""
    where = f" at {comparison.uri}" if comparison.uri else ""
    lines = [comparison.title + where, *comparison.remarks, comparison.sort_note()]
    if comparison.hidden_parents:
        lines.append(
            f"{comparison.hidden_parents} sweep parent run(s) not shown (their runs are); "
            "artplug compare <PARENT_RUN_ID> shows one sweep's grid"
        )
    if fmt != "csv":
        # A column no run has a value in ("-") is left out without a word.
        constant = {h: v for h, v in layout(comparison).constant.items() if v != "-"}
        if constant:
            same = ", ".join(f"{header}={value}" for header, value in constant.items())
            lines.append(f"same for all runs: {same}")
    return lines


def notes(comparison: Comparison) -> list[str]:
    """The lines printed under the table: which runs failed the sanity gate, and what it means."""
    failed = sum(row.gate_failed for row in comparison.rows)
    if not failed:
        return []
    runs = _plural(failed, "run")
    their = "its" if failed == 1 else "their"
    if comparison.by_gate:
        ranked = "is ranked last" if failed == 1 else "are ranked last"
        return [
            f"{runs} failed the sanity gate and {ranked}: {their} robust accuracy may be "
            "overstated (gradient masking)"
        ]
    return [
        f"{runs} failed the sanity gate (gate column): {their} robust accuracy may be "
        "overstated (gradient masking)"
    ]


# How the chart draws a run, by the gate's verdict: (marker, colour, legend label).
_CHART_STYLES = {
    "passed": ("o", "tab:blue", "passed the sanity gate"),
    "failed": ("X", "tab:red", "FAILED the sanity gate"),
    "other": ("o", "tab:gray", "sanity gate not run"),
}


def _chart_style(row: RunRow) -> str:
    if row.gate_failed:
        return "failed"
    return "passed" if row.gate == "passed" else "other"


def chart_figure(comparison: Comparison) -> Any | None:
    """The chart of :func:`plot_chart` as a matplotlib ``Figure`` (``None``: no point to draw).

    Runs that failed the sanity gate are red crosses, runs that passed blue dots, runs without
    a gate grey dots; a legend names the kinds present.
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

    figure = Figure(figsize=(6.5, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labelled: set[str] = set()
    for row, clean, robust in points:
        assert clean is not None and robust is not None
        x, y = 100.0 * clean, 100.0 * robust
        kind = _chart_style(row)
        marker, colour, legend = _CHART_STYLES[kind]
        axes.scatter(
            [x],
            [y],
            s=48 if kind == "failed" else 28,
            marker=marker,
            color=colour,
            # One legend entry per kind: the first point of a kind carries the label.
            label=legend if kind not in labelled else None,
            zorder=3 if kind == "failed" else 2,
        )
        labelled.add(kind)
        label = ", ".join(f"{k}={v}" for k, v in row.grid.items()) if row.grid else row.name
        label = label if len(label) <= 40 else label[:39] + "…"
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if len(labelled) > 1 or "failed" in labelled:
        axes.legend(fontsize=7, loc="best")
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
    return figure


def plot_chart(comparison: Comparison, path: str | Path) -> Path | None:
    """Robust (the sort key) against clean test accuracy, one labelled point per run, as PNG.

    Returns the path, or ``None`` when no run has both numbers (nothing is written then).
    """
    figure = chart_figure(comparison)
    if figure is None:
        return None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
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

# Keys that change where or how fast a run goes, not what it computes: not in a re-run's name.
_UNNAMED_KEYS = ("run.out_dir", "run.threads", "run.device")


def rerun_name(name: str, overrides: Sequence[str], values: Mapping[str, str]) -> str:
    """The name of a re-run of run ``name`` with ``--set`` ``overrides``: its actual values.

    ``pgd-at`` with ``--set optim.lr=0.020`` becomes ``pgd-at optim.lr=0.02``: each overridden
    key with the value the new recipe has (``values``: its flattened params), the way a
    sweep names its runs. A ``key=value`` part the name already has (a sweep's run, an earlier
    re-run) is replaced, not repeated. An override of ``run.name`` itself wins; keys that do
    not change the results (``run.threads``, ``tracking.*``, ...) are left out.
    """
    from artplug.recipe import _split_key

    keys: list[str] = []
    for spec in overrides:
        key = ".".join(_split_key(spec.partition("=")[0].strip()))
        if key == "run.name":
            return values.get(key, name)
        if key in _UNNAMED_KEYS or key.split(".")[0] == "tracking" or key in keys:
            continue
        keys.append(key)
    if not keys:
        return name
    parts = [part for part in name.split(" ") if part.partition("=")[0] not in keys]
    for key in keys:
        # A key set to a whole table has no flattened value of its own: the text given.
        given = next(o for o in reversed(overrides) if ".".join(_split_key(o.split("=")[0])) == key)
        value = values.get(key, "".join(given.partition("=")[2].split()))
        parts.append(f"{key}={value}")
    return " ".join(parts)


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
