"""The lab commands ``compare``, ``sweep`` and ``rerun``, added through ``register_commands``.

A built-in plugin, registered through the ``artplug`` entry-point group like the technique
plugins, and the worked example of the ``register_commands`` hook (docs/writing-plugins.md).
The logic of reading and comparing runs is in :mod:`artplug.lab`; this module parses the
options and drives it:

- ``artplug compare``: read tracked runs back and rank them (:func:`artplug.lab.collect`);
- ``artplug sweep``: one nested MLflow run per combination of ``--grid`` values under a parent
  run, one after the other in this process, or ``--jobs N`` at once as ``artplug run``
  processes, each pinned to a GPU or to its share of the CPU cores (docs/sweeps.md);
- ``artplug rerun``: run a logged resolved recipe again as a new, linked run.

Blocking the plugin (``ARTPLUG_DISABLE_PLUGINS=lab_commands``) removes the three commands.

Imports: the public ``artplug`` root and :mod:`artplug.cli_options` at module level (both
cheap: this module is imported for ``artplug --help``); :mod:`artplug.lab` for its names; the
CLI back end (:mod:`artplug.workflows`, :mod:`artplug.tracking`, :mod:`artplug.interrupt`)
only inside the command bodies, because it pulls in torch and MLflow.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

import artplug
from artplug.cli_options import (
    PluginSet,
    load,
    max_steps_option,
    plugin_set,
    quiet_option,
    set_option,
)
from artplug.lab import FORMATS, Format
from artplug.lab import clock as _clock


@artplug.hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``compare``, ``sweep`` and ``rerun`` to the ``artplug`` group."""
    cli.add_command(compare)
    cli.add_command(sweep)
    cli.add_command(rerun)


# ------------------------------------------------------------------------------------------
# artplug compare


@click.command()
@click.argument("experiment", required=False, metavar="[EXPERIMENT_OR_SWEEP_ID]")
@click.option(
    "--run",
    "run_ids",
    multiple=True,
    metavar="ID",
    help="Also show this MLflow run (repeat for several; alone, only these runs).",
)
@click.option(
    "--parent",
    metavar="ID",
    default=None,
    help="Show the runs of this sweep (its parent run id), with the grid as columns.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format; csv writes fractions and seconds at full precision.",
)
@click.option(
    "--chart",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the PNG of robust against clean accuracy "
    "(default: compare-<experiment>.png in the current folder).",
)
@click.option("--no-chart", is_flag=True, help="Do not write the chart.")
@click.option(
    "--rank",
    type=click.Choice(["gate", "accuracy"]),
    default="gate",
    show_default=True,
    help="gate: runs that failed the sanity gate come last; accuracy: robust accuracy alone "
    "(failed runs are still marked in the gate column).",
)
@click.option(
    "--tracking-uri",
    default=None,
    metavar="URI",
    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default).",
)
def compare(
    experiment: str | None,
    run_ids: tuple[str, ...],
    parent: str | None,
    fmt: Format,
    chart: str | None,
    no_chart: bool,
    rank: str,
    tracking_uri: str | None,
) -> None:
    """Compare tracked runs: one row per run, best robust accuracy first, and a chart.

    EXPERIMENT is an MLflow experiment name or id, or a sweep's parent run id to show its
    grid. Without it: the experiments of plain runs ('artplug') and of the shipped recipes
    ('artplug-digits', 'artplug-quickstart', ...) that hold runs, else the experiment of the
    latest run. Runs that failed the sanity gate are marked and, unless --rank accuracy,
    ranked last. Columns every run agrees on are said once above the table (csv keeps them).
    Everything is read from the tracking store; nothing is re-evaluated.
    """
    _compare(
        experiment,
        list(run_ids),
        parent,
        fmt,
        chart,
        no_chart,
        tracking_uri,
        by_gate=rank == "gate",
    )


def _compare(
    experiment: str | None,
    run_ids: list[str],
    parent: str | None,
    fmt: Format,
    chart: str | None,
    no_chart: bool,
    tracking_uri: str | None,
    *,
    by_gate: bool = True,
) -> None:
    """The body of ``artplug compare``."""
    from artplug import lab

    client, uri = lab.open_store(tracking_uri)
    # CSV goes to stdout alone, so that it can be piped; the notes then go to stderr.
    notes_to_stderr = fmt == "csv"
    try:
        comparison = lab.collect(
            client, uri, experiment=experiment, run_ids=run_ids, parent=parent, by_gate=by_gate
        )
    except lab.NoRunsYet as empty:
        # Nothing logged yet is not a mistake: say what the store holds and how to fill it.
        click.echo(f"no runs to compare at {uri}; its experiments:", err=notes_to_stderr)
        for name in empty.experiments:
            click.echo(f"  {name}: no runs", err=notes_to_stderr)
        click.echo(
            "artplug run RECIPE logs a run here; --tracking-uri (or MLFLOW_TRACKING_URI) reads "
            "another store",
            err=notes_to_stderr,
        )
        return
    for line in lab.describe(comparison, fmt):
        click.echo(line, err=notes_to_stderr)
    click.echo(lab.render(comparison, fmt))
    for line in lab.notes(comparison):
        click.echo(line, err=notes_to_stderr)
    if no_chart:
        return
    path = lab.plot_chart(comparison, chart or f"compare-{comparison.slug}.png")
    if path is None:
        click.echo("no chart: no run has both a clean and a robust accuracy", err=notes_to_stderr)
    else:
        click.echo(f"chart: {path}", err=notes_to_stderr)


# ------------------------------------------------------------------------------------------
# artplug sweep


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--grid",
    "grid_specs",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="A recipe key and its values (TOML syntax, as --set); repeat for more keys. Commas "
    'inside [..], {..} or quotes belong to the value: --grid \'eval.attacks=["clean"],'
    '["clean","fgsm"]\'.',
)
@set_option()
@quiet_option()
@max_steps_option("Stop every run after N steps (smoke test).")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Run N combinations at once, each as its own `artplug run` process pinned to one "
    "GPU (round-robin over the visible ones) and to cores/N CPU threads; 1 runs them one "
    "after the other in this process.",
)
@click.pass_context
def sweep(
    ctx: click.Context,
    recipe: str,
    grid_specs: tuple[str, ...],
    overrides: tuple[str, ...],
    quiet: bool,
    max_steps: int | None,
    jobs: int,
) -> None:
    """Run RECIPE once per combination of the --grid values, as nested MLflow runs.

    A parent run holds one child run per combination (each a full `artplug run` with the
    grid values applied like --set). Every combination is validated before any training.
    Runs go one after the other (--jobs N: N at once, as separate processes; docs/sweeps.md);
    a failing run is recorded as FAILED and the sweep goes on;
    Ctrl-C ends the parent run as KILLED and keeps what is done. The grid is compared at
    the end (again any time with `artplug compare PARENT_RUN_ID`).
    """
    _sweep(
        ctx,
        recipe,
        list(grid_specs),
        list(overrides),
        quiet=quiet,
        max_steps=max_steps,
        jobs=jobs,
    )


def _resolve_sweep(
    plugins: PluginSet, recipe: str, grid: Mapping[str, list[str]], overrides: Sequence[str]
) -> list[tuple[dict[str, str], Any]]:
    """Every combination with its resolved recipe; all problems of all combinations at once."""
    from artplug import lab

    combos = lab.combinations(grid)
    resolved: list[tuple[dict[str, str], Any]] = []
    failures: list[tuple[str, list[str]]] = []
    for values in combos:
        label = lab.combination_label(values)
        try:
            recipe_of = load(plugins, recipe, [*overrides, *lab.combination_overrides(values)])
        except artplug.RecipeError as exc:
            failures.append((label, exc.problems))
            continue
        resolved.append((values, recipe_of))
    if failures:
        # A problem every combination has (a misspelt key) is said once, without a label.
        shared = []
        if len(failures) == len(combos):
            shared = [p for p in failures[0][1] if all(p in own for _, own in failures)]
        problems = list(shared)
        for label, own in failures:
            problems += [f"[{label}] {p}" for p in own if p not in shared]
        raise artplug.RecipeError(recipe, problems)
    first = resolved[0][1]
    if first.tracking.backend == "none":
        raise artplug.ArtplugError(
            f"{recipe}: a sweep records its runs in MLflow, but tracking.backend is 'none'; "
            "use --set tracking.backend=mlflow"
        )
    return resolved


@dataclass
class _Child:
    """One combination of a sweep: what it runs and, once it has run, how it ended."""

    index: int
    size: int
    values: dict[str, str]
    label: str
    overrides: list[str]  # the user's --set, the combination's values and the child's name
    run_id: str | None = None
    status: str = "FAILED"
    error: str | None = None
    seconds: float = 0.0

    @property
    def tags(self) -> dict[str, str]:
        """The sweep tags of the child's MLflow run."""
        from artplug import lab

        return {
            lab.SWEEP_VALUES_TAG: json.dumps(self.values),
            lab.SWEEP_INDEX_TAG: f"{self.index}/{self.size}",
        }

    def outcome(self) -> dict[str, Any]:
        """The child's entry in the parent's ``sweep/sweep.json``."""
        found: dict[str, Any] = {"values": self.values, "run_id": self.run_id}
        found["status"] = self.status
        if self.error is not None:
            found["error"] = self.error
        return found


@dataclass
class _Progress:
    """The one line a sweep prints per finished child: overall count, time and ETA."""

    size: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0

    def finished(self, child: _Child) -> str:
        """Count ``child`` as done and describe it, with the estimated time to the end."""
        self.done += 1
        self.failed += child.status != "FINISHED"
        elapsed = time.monotonic() - self.started
        left = self.size - self.done
        # Throughput-based: elapsed wall time per finished child already reflects --jobs.
        eta = f"ETA {_clock(elapsed / self.done * left)}" if left else "sweep done"
        run = f" (run {child.run_id[:8]})" if child.run_id else ""
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"[{self.done}/{self.size} done{failed}] {child.label}: {child.status} in "
            f"{_clock(child.seconds)}{run}; {eta}"
        )


def _sweep(
    ctx: click.Context,
    recipe: str,
    grid_specs: list[str],
    overrides: list[str],
    *,
    quiet: bool,
    max_steps: int | None,
    jobs: int = 1,
) -> None:
    """The body of ``artplug sweep``: validate every combination, then a parent and children."""
    import tempfile

    from artplug import lab
    from artplug.tracking import MlflowTracker

    plugins = plugin_set(ctx)
    grid = lab.parse_grid(grid_specs)
    combos = _resolve_sweep(plugins, recipe, grid, overrides)
    base = combos[0][1]
    size = len(combos)
    names_vary = "run.name" in grid
    children = []
    for index, (values, _) in enumerate(combos, start=1):
        label = lab.combination_label(values)
        name = [] if names_vary else [f"run.name={json.dumps(f'{base.run.name} {label}')}"]
        child_overrides = [*overrides, *lab.combination_overrides(values), *name]
        children.append(_Child(index, size, values, label, child_overrides))
    parent = MlflowTracker(
        base.tracking.experiment,
        f"{base.run.name} sweep",
        tracking_uri=base.tracking.uri,
        tags={
            lab.SWEEP_GRID_TAG: json.dumps(grid),
            lab.SWEEP_SIZE_TAG: str(size),
            "artplug.recipe": recipe,
            lab.NOTE_TAG: f"Sweep of {recipe} over {', '.join(grid)} ({size} runs)"
            + (f"; --set {' '.join(overrides)}" if overrides else ""),
        },
    )
    parent.start()
    assert parent.run_id is not None
    parent.log_artifact(recipe, artifact_path="sweep")
    jobs = min(jobs, size)
    at_once = f", {jobs} at a time" if jobs > 1 else ""
    click.echo(f"sweep of {size} runs over {', '.join(grid)}{at_once}; parent {parent.describe()}")
    started: list[_Child] = []
    status = "FAILED"
    logs: Path | None = None
    try:
        if jobs == 1:
            _run_serial(plugins, recipe, children, parent, started, quiet, max_steps)
        else:
            logs = Path(base.run.out_dir) / f"sweep-{parent.run_id[:12]}"
            placement = _Placement.detect(jobs, base.run.device, base.run.threads)
            click.echo(f"{placement.describe()}; child logs in {logs}")
            _run_parallel(
                recipe, children, parent, started, jobs, placement, logs, quiet, max_steps
            )
        failed = sum(c.status != "FINISHED" for c in started)
        status = "FAILED" if failed == size else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        click.echo(
            f"sweep interrupted at run {len(started)} of {size}; the finished runs are kept",
            err=True,
        )
        raise
    finally:
        with tempfile.TemporaryDirectory(prefix="artplug-sweep-") as scratch:
            summary = Path(scratch) / "sweep.json"
            summary.write_text(
                json.dumps(
                    {"grid": grid, "size": size, "runs": [c.outcome() for c in started]},
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )
            parent.log_artifact(summary, artifact_path="sweep")
            if logs is not None and logs.is_dir():
                parent.log_artifact(logs, artifact_path="sweep/logs")
            done = sum(c.status == "FINISHED" for c in started)
            parent.log_metrics({"sweep/finished": done, "sweep/failed": len(started) - done}, 0)
            if status != "KILLED":
                _log_sweep_comparison(parent, Path(scratch))
        parent.end(status)  # type: ignore[arg-type]
    comparison = _sweep_comparison(parent)
    click.echo()
    for line in lab.describe(comparison):
        click.echo(line)
    click.echo(lab.render(comparison, "table"))
    for line in lab.notes(comparison):
        click.echo(line)
    click.echo(parent.describe())
    if failed:
        click.echo(f"{failed} of {size} runs failed", err=True)
        # Exit status 1 (not 2: the sweep itself was valid), for scripts that chain sweeps.
        raise SystemExit(1)


def _run_serial(
    plugins: PluginSet,
    recipe: str,
    children: list[_Child],
    parent: Any,
    started: list[_Child],
    quiet: bool,
    max_steps: int | None,
) -> None:
    """Run the children one after the other in this process (``--jobs 1``)."""
    from artplug.workflows import one_line, run_recipe

    progress = _Progress(len(children))
    for child in children:
        click.echo(f"\n[{child.index}/{child.size}] {child.label}")
        # Re-resolved with the child's own name (validated above without it).
        resolved = load(plugins, recipe, child.overrides)
        started.append(child)
        begin = time.monotonic()
        try:
            child.run_id = run_recipe(
                plugins,
                resolved,
                no_track=False,
                quiet=quiet,
                max_steps=max_steps,
                tracking_uri=parent.tracking_uri,
                parent_run_id=parent.run_id,
                tags=child.tags,
                record_failure=True,
                echo=click.echo,
            )
            child.status = "FINISHED"
        except KeyboardInterrupt:
            child.status = "KILLED"
            raise
        except Exception as exc:
            # One combination failing (diverged, out of memory, a bug in a plugin) must not
            # cost the others; its MLflow run is FAILED with the error as a tag.
            child.error = one_line(exc)
            click.echo(
                f"run {child.index}/{child.size} ({child.label}) failed: {child.error}", err=True
            )
        child.seconds = time.monotonic() - begin
        click.echo(progress.finished(child))


# ------------------------------------------------------------------------------------------
# artplug sweep --jobs N: children as processes


def _visible_gpus() -> list[str]:
    """The CUDA devices a child may be given, as ``CUDA_VISIBLE_DEVICES`` entries.

    When the sweep itself runs under ``CUDA_VISIBLE_DEVICES``, its entries (indices or UUIDs)
    are dealt out; otherwise the indices ``0 .. device_count - 1``. Empty without CUDA.
    """
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        entries = [part.strip() for part in listed.split(",") if part.strip()]
        return entries[:count]
    return [str(i) for i in range(count)]


def _cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class _Placement:
    """Where each child of a ``--jobs N`` sweep runs: a GPU of its own and its CPU threads."""

    gpus: tuple[str, ...]  # CUDA_VISIBLE_DEVICES entries dealt round-robin; () on a CPU
    threads: int  # --threads of every child
    jobs: int

    @classmethod
    def detect(cls, jobs: int, device: str, recipe_threads: int) -> _Placement:
        """GPUs for a recipe on ``auto``/``cuda``, and ``cores // jobs`` threads per child.

        A recipe that names its thread count (``run.threads`` > 0) keeps it; one that names a
        device other than ``auto`` or ``cuda`` (``cpu``, ``cuda:1``) gets no GPU pinning, since
        renumbering the visible devices would change what it asked for.
        """
        gpus = tuple(_visible_gpus()) if device in ("auto", "cuda") else ()
        threads = recipe_threads or max(1, _cores() // jobs)
        return cls(gpus, threads, jobs)

    def env(self, slot: int) -> dict[str, str]:
        """The environment changes of the child started in ``slot`` (0-based, round-robin)."""
        if not self.gpus:
            return {}
        return {"CUDA_VISIBLE_DEVICES": self.gpus[slot % len(self.gpus)]}

    def describe(self) -> str:
        """One line: which devices the children share and how many threads each gets."""
        if self.gpus:
            where = f"{len(self.gpus)} GPU{'s' if len(self.gpus) > 1 else ''} round-robin"
        else:
            where = "CPU"
        return f"{self.jobs} child processes on {where}, {self.threads} threads each"


def _child_command(
    recipe: str, child: _Child, parent: Any, threads: int, quiet: bool, max_steps: int | None
) -> list[str]:
    """``python -m artplug run RECIPE --set ...`` for ``child``, nested under ``parent``."""
    command = [sys.executable, "-m", "artplug", "run", recipe]
    for override in child.overrides:
        command += ["--set", override]
    command += ["--tracking-uri", str(parent.tracking_uri), "--parent-run", str(parent.run_id)]
    for key, value in child.tags.items():
        command += ["--tag", f"{key}={value}"]
    command += ["--threads", str(threads)]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    if quiet:
        command.append("--quiet")
    return command


@dataclass
class _Running:
    """A child process in flight."""

    child: _Child
    process: subprocess.Popen[bytes]
    log: Path
    begin: float


def _error_line(log: Path) -> str | None:
    """The child's ``Error:`` line (the CLI's one-line report), else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line.removeprefix("Error: ")
    return lines[-1] if lines else None


# The exit codes of `artplug run` (artplug.cli): 130 and 143 after SIGINT and SIGTERM.
_KILLED_CODES = (130, 143, -2, -15)


def _finish(child: _Child, code: int, log: Path, client: Any, parent: Any) -> None:
    """Record how ``child`` ended: its status, error and MLflow run (found by its tags)."""
    from artplug import lab

    child.status = "FINISHED" if code == 0 else "KILLED" if code in _KILLED_CODES else "FAILED"
    if code != 0:
        child.error = _error_line(log) or f"exit status {code}"
    try:
        found = client.search_runs(
            [parent.experiment_id],
            f"tags.`{lab.PARENT_TAG}` = '{parent.run_id}' and "
            f"tags.`{lab.SWEEP_INDEX_TAG}` = '{child.index}/{child.size}'",
            max_results=1,
        )
        if not found:
            return  # died before it could record anything (the log says why)
        run = found[0]
        child.run_id = run.info.run_id
        if run.info.status == "RUNNING" and code != 0:
            # Ended without closing its run (killed by the OS, out of memory): close it for it.
            client.set_tag(child.run_id, lab.ERROR_TAG, child.error or f"exit status {code}")
            client.set_terminated(child.run_id, "KILLED" if child.status == "KILLED" else "FAILED")
    except Exception as exc:
        # The store hiccuped: the child's own record stands; only the link in sweep.json is lost.
        reason = " ".join(str(exc).split())[:300]
        click.echo(f"warning: no MLflow run found for child {child.index}: {reason}", err=True)


def _run_parallel(
    recipe: str,
    children: list[_Child],
    parent: Any,
    started: list[_Child],
    jobs: int,
    placement: _Placement,
    logs: Path,
    quiet: bool,
    max_steps: int | None,
) -> None:
    """Run up to ``jobs`` children at once as ``artplug run`` processes (``--jobs N``).

    Each child's output goes to ``logs/<index>.log``; the sweep prints one line per finished
    child. A failing child is reported and the others go on. SIGINT or SIGTERM stops the
    children (SIGTERM: each checkpoints, closes its run as KILLED and exits) and the sweep.
    """
    from artplug import lab
    from artplug.interrupt import StopRequest, stop_on_signals

    client, _ = lab.open_store(parent.tracking_uri)
    logs.mkdir(parents=True, exist_ok=True)
    width = len(str(len(children)))
    waiting = list(children)
    running: dict[int, _Running] = {}  # slot -> child; a slot keeps its GPU
    progress = _Progress(len(children))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ARTPLUG_NO_BUSY_HINT": "1"}
    try:
        # Not deferred: the first signal raises RunInterrupted (a KeyboardInterrupt) here.
        with stop_on_signals(StopRequest()):
            while waiting or running:
                for slot in range(jobs):
                    if slot in running or not waiting:
                        continue
                    child = waiting.pop(0)
                    log = logs / f"{child.index:0{width}d}.log"
                    command = _child_command(
                        recipe, child, parent, placement.threads, quiet, max_steps
                    )
                    with log.open("wb") as out:
                        out.write(f"# {shlex.join(command)}\n".encode())
                        out.flush()
                        process = subprocess.Popen(
                            command,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            env={**env, **placement.env(slot)},
                            # Its own session: a Ctrl-C in the terminal reaches the sweep only,
                            # which then stops every child once, with SIGTERM.
                            start_new_session=True,
                        )
                    started.append(child)
                    running[slot] = _Running(child, process, log, time.monotonic())
                for slot, job in list(running.items()):
                    code = job.process.poll()
                    if code is None:
                        continue
                    del running[slot]
                    job.child.seconds = time.monotonic() - job.begin
                    _finish(job.child, code, job.log, client, parent)
                    if job.child.status == "FAILED":
                        click.echo(
                            f"run {job.child.index}/{job.child.size} ({job.child.label}) "
                            f"failed: {job.child.error} (log: {job.log})",
                            err=True,
                        )
                    click.echo(progress.finished(job.child))
                time.sleep(0.2)
    except KeyboardInterrupt:
        _stop_children(list(running.values()))
        for job in running.values():
            job.child.seconds = time.monotonic() - job.begin
            code = job.process.returncode
            _finish(job.child, 143 if code is None else code, job.log, client, parent)
        raise


def _stop_children(jobs: list[_Running], grace_s: float = 120.0) -> None:
    """SIGTERM every child, wait up to ``grace_s`` for them to checkpoint, then kill."""
    for job in jobs:
        if job.process.poll() is None:
            job.process.terminate()
    deadline = time.monotonic() + grace_s
    for job in jobs:
        try:
            job.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            job.process.kill()
            job.process.wait()


def _sweep_comparison(parent: Any) -> Any:
    from artplug import lab

    client, uri = lab.open_store(parent.tracking_uri)
    return lab.collect(client, uri, parent=parent.run_id)


def _log_sweep_comparison(parent: Any, folder: Path) -> None:
    """The grid's comparison as artifacts of the parent run (compare.md, compare.png)."""
    from artplug import lab

    try:
        comparison = _sweep_comparison(parent)
    except artplug.ArtplugError:
        return  # no child run reached the store: nothing to compare
    table = folder / "compare.md"
    parts = [*lab.describe(comparison, "markdown"), lab.render(comparison, "markdown")]
    table.write_text("\n\n".join([*parts, *lab.notes(comparison)]) + "\n", encoding="utf-8")
    parent.log_artifact(table, artifact_path="sweep")
    chart = lab.plot_chart(comparison, folder / "compare.png")
    if chart is not None:
        parent.log_artifact(chart, artifact_path="sweep")


# ------------------------------------------------------------------------------------------
# artplug rerun


@click.command()
@click.argument("run_id")
@set_option()
@click.option(
    "--tracking-uri",
    default=None,
    metavar="URI",
    help="MLflow tracking URI of RUN_ID and of the new run (default: MLFLOW_TRACKING_URI, "
    "else MLflow's; the new run follows the recipe's [tracking] uri when it names one).",
)
@quiet_option()
@max_steps_option()
@click.pass_context
def rerun(
    ctx: click.Context,
    run_id: str,
    overrides: tuple[str, ...],
    tracking_uri: str | None,
    quiet: bool,
    max_steps: int | None,
) -> None:
    """Run again from the resolved recipe logged with MLflow run RUN_ID, as a new run.

    --set changes the recipe (e.g. run.seed=1 for another seed); the new run is named after
    the values it changes ('pgd-at run.seed=1'). It is tagged artplug.rerun_of = RUN_ID and its
    description names the original and the changes.
    """
    _rerun(ctx, run_id, list(overrides), tracking_uri, quiet=quiet, max_steps=max_steps)


def _rerun(
    ctx: click.Context,
    run_id: str,
    overrides: list[str],
    tracking_uri: str | None,
    *,
    quiet: bool,
    max_steps: int | None,
) -> None:
    """The body of ``artplug rerun``."""
    from artplug import lab
    from artplug.tracking import flatten
    from artplug.workflows import resolve_saved, run_recipe

    raw, original = lab.fetch_logged_recipe(run_id, tracking_uri)
    plugins = plugin_set(ctx)
    source = f"MLflow run {run_id} ({lab.RECIPE_ARTIFACT})"
    resolved = resolve_saved(plugins, raw, source, overrides, check_out_dir=True)
    name = lab.rerun_name(resolved.run.name, overrides, flatten(resolved.to_dict()))
    if name != resolved.run.name:
        # Resolved again with its name: the name is part of the recipe (and of the folder's).
        named = [*overrides, f"run.name={json.dumps(name)}"]
        resolved = resolve_saved(plugins, raw, source, named, check_out_dir=True)
    changes = f"with --set {' '.join(overrides)}" if overrides else "unchanged"
    note = (
        f"Re-run of MLflow run {run_id} ('{original.info.run_name}') from its logged "
        f"{lab.RECIPE_ARTIFACT}, {changes}."
    )
    run_recipe(
        plugins,
        resolved,
        no_track=False,
        quiet=quiet,
        max_steps=max_steps,
        echo=click.echo,
        tracking_uri=tracking_uri,
        tags={
            lab.RERUN_TAG: run_id,
            lab.RERUN_OVERRIDES_TAG: json.dumps(overrides),
            lab.NOTE_TAG: note,
        },
    )
