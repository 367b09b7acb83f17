"""The ``artplug`` command line.

``main()`` loads the plugins once, builds the click group with :func:`make_cli` and runs it. A
user error (:class:`~artplug.errors.ArtplugError` or a click usage error) prints one line that
starts with ``Error:`` and exits with code 2; ``--traceback`` (or ``ARTPLUG_TRACEBACK=1``)
shows the traceback instead. Other exit codes: 3 when training diverged
(:class:`~artplug.errors.DivergenceError`), 130 after SIGINT and 143 after SIGTERM (the run
stops at a step boundary and prints its ``artplug resume`` command). ``--help``, ``validate``,
``list``, ``plugins`` and ``schema`` do not import ART or MLflow. ``compare``, ``sweep`` and
``rerun`` work on the MLflow store through :mod:`artplug.lab`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import click

from artplug.errors import ArtplugError, PluginError
from artplug.kinds import KINDS, Kind
from artplug.lab import FORMATS, Format
from artplug.plugins import PluginSet, load_plugins, report_warnings

KIND_TITLES = {
    "perturbation": "Perturbations ([perturbation] use = ...)",
    "loss": "Loss terms ([[loss]] use = ...)",
    "transform": "Model transforms ([[transform]] use = ...)",
    "schedule": "Schedules ([[schedule]] use = ...)",
}


class ArtplugGroup(click.Group):
    """A click group that refuses to silently replace a command with the same name."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Add ``cmd``; a name already taken raises PluginError."""
        name = name or cmd.name
        if name in self.commands:
            raise PluginError(
                f"command {name!r} is already defined; a plugin tried to add it again"
            )
        super().add_command(cmd, name)


def _set_option() -> Any:
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a recipe value (TOML syntax), e.g. --set optim.lr=0.05 --set loss.0.beta=3.",
    )


def _quiet_option() -> Any:
    return click.option("--quiet", "-q", is_flag=True, help="No progress display.")


def _unsafe_pickle_option() -> Any:
    # Named for the risk on purpose: a format-1 checkpoint can only be read by unpickling
    # arbitrary objects, which runs whatever code the file holds.
    return click.option(
        "--allow-unsafe-pickle",
        "allow_unsafe_pickle",
        is_flag=True,
        help="Executes code stored in the file; only for format-1 checkpoints you wrote yourself.",
    )


def _max_steps_option(help_text: str = "Stop after N steps (smoke test).") -> Any:
    return click.option("--max-steps", type=click.IntRange(min=1), default=None, help=help_text)


def _threads_option() -> Any:
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="CPU threads torch may use (as --set run.threads=N); on a shared machine "
        "--threads 1 is often much faster than torch's default of one per core.",
    )


def _with_threads(overrides: Sequence[str], threads: int | None) -> list[str]:
    """``overrides`` plus ``run.threads=N`` for ``--threads N`` (last, so that it wins)."""
    return [*overrides, *([f"run.threads={threads}"] if threads is not None else [])]


def _busy_hint(threads: int) -> None:
    """Suggest --threads 1 when the load average exceeds the core count at the start of a run.

    ``threads`` is the recipe's ``run.threads`` (0: torch's default). Measured on a shared
    2-core machine, torch's default of one thread per core made training 10-20x slower.
    ``ARTPLUG_NO_BUSY_HINT=1`` turns it off (scripts and the test suite, whose own processes
    load the machine and which read stderr line by line).
    """
    if os.environ.get("ARTPLUG_NO_BUSY_HINT", "") not in ("", "0"):
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return
    cores = os.cpu_count() or 1
    if load <= cores:
        return
    if not threads:
        import torch

        threads = torch.get_num_threads()
    if threads <= 1:
        return
    click.echo(
        f"hint: the machine is busy (load {load:.1f} on {cores} cores); torch uses {threads} "
        "threads per process; if other jobs are running, try --threads 1",
        err=True,
    )


def _plugin_set(ctx: click.Context) -> PluginSet:
    plugin_set: PluginSet = ctx.find_root().obj
    return plugin_set


def _load(plugin_set: PluginSet, recipe: str, overrides: Sequence[str]) -> Any:
    """The recipe file ``recipe`` with ``overrides``, resolved against the installed plugins."""
    from artplug.recipe import load_recipe

    return load_recipe(
        recipe, plugin_set.registries, overrides, failure_hint=plugin_set.failure_hint()
    )


def make_cli(plugin_set: PluginSet) -> click.Group:
    """Build the command group for ``plugin_set`` (tests call this with their own plugins)."""

    @click.group(cls=ArtplugGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--traceback", is_flag=True, help="Show the full traceback of errors (for debugging)."
    )
    @click.version_option(package_name="artplug")
    @click.pass_context
    def cli(ctx: click.Context, traceback: bool) -> None:
        """artplug: adversarial training as composable plugins, built on ART.

        Write a recipe (TOML) that combines techniques by name, then `artplug run RECIPE`.
        """
        ctx.obj = plugin_set

    @cli.command()
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @_set_option()
    @click.option("--no-track", is_flag=True, help="Do not record the run in MLflow.")
    @_quiet_option()
    @_max_steps_option()
    @_threads_option()
    @click.pass_context
    def run(
        ctx: click.Context,
        recipe: str,
        overrides: tuple[str, ...],
        no_track: bool,
        quiet: bool,
        max_steps: int | None,
        threads: int | None,
    ) -> None:
        """Train RECIPE adversarially, evaluate it with ART and log the run to MLflow."""
        plugin_set = _plugin_set(ctx)
        resolved = _load(plugin_set, recipe, _with_threads(overrides, threads))
        _busy_hint(resolved.run.threads)
        from artplug.workflows import run_recipe

        run_recipe(
            plugin_set,
            resolved,
            no_track=no_track,
            quiet=quiet,
            max_steps=max_steps,
            echo=click.echo,
        )

    @cli.command()
    @click.argument("checkpoint", type=click.Path())
    @_set_option()
    @click.option("--no-track", is_flag=True, help="Do not record the run in MLflow.")
    @_quiet_option()
    @_unsafe_pickle_option()
    @click.option(
        "--fork",
        is_flag=True,
        help="Start a new run folder and a new MLflow run from CHECKPOINT (linked to the "
        "original) instead of continuing the original run; needed for a finished run or an "
        "older checkpoint.",
    )
    @_threads_option()
    @click.pass_context
    def resume(
        ctx: click.Context,
        checkpoint: str,
        overrides: tuple[str, ...],
        no_track: bool,
        quiet: bool,
        allow_unsafe_pickle: bool,
        fork: bool,
        threads: int | None,
    ) -> None:
        """Continue an interrupted run from CHECKPOINT (a checkpoint file or its run folder).

        Only the latest checkpoint (checkpoint-last.pt) of an unfinished run (no eval.json, or
        one from a --max-steps smoke run) is continued, in the same folder and, when tracked,
        the same MLflow run; an interrupted step is not logged twice. A finished run or an
        older checkpoint (checkpoint-best.pt, a stale copy) is refused: --fork starts a new
        run folder and MLflow run from it instead (e.g. --fork --set run.epochs=100 to train a
        finished run longer). The recipe comes from the checkpoint; --set can change it.
        """
        from artplug.workflows import load_resumable, resolve_saved, run_recipe

        path, payload = load_resumable(
            checkpoint, fork=fork, allow_unsafe_pickle=allow_unsafe_pickle
        )
        plugin_set = _plugin_set(ctx)
        resolved = resolve_saved(
            plugin_set,
            payload["recipe"],
            str(path),
            _with_threads(overrides, threads),
            check_out_dir=fork,  # a fork starts a new run folder in run.out_dir
        )
        _busy_hint(resolved.run.threads)
        run_recipe(
            plugin_set,
            resolved,
            no_track=no_track,
            quiet=quiet,
            max_steps=None,
            resume=(path, payload),
            fork=fork,
            echo=click.echo,
        )

    @cli.command(name="eval")
    @click.argument("target", metavar="CHECKPOINT_OR_RUN_ID")
    @click.option(
        "--attack",
        "attacks",
        multiple=True,
        metavar="NAME",
        help="Attack-table entry to run (repeat for several); default: the recipe's "
        "eval.final_attacks.",
    )
    @click.option(
        "--n",
        "n_examples",
        type=click.IntRange(min=1),
        default=None,
        help="Evaluate the first N test examples, in order, as RobustBench does (default: the "
        "recipe's eval.test_examples).",
    )
    @click.option(
        "--eps",
        type=click.FloatRange(min=0.0),
        default=None,
        help="Attack radius in pixel space, as --set eval.eps=X (default: the recipe's eval "
        "eps, else its threat eps).",
    )
    @click.option("--sanity", is_flag=True, help="Also run the sanity gate (masking checks).")
    @click.option(
        "--curve",
        metavar="EPS,EPS,...",
        default=None,
        help="Also measure pgd-20 accuracy at these eps values and plot it (eps_curve.png).",
    )
    @_set_option()
    @click.option("--no-track", is_flag=True, help="Print only; log nothing to MLflow.")
    @click.option(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking URI (default: the recipe's, else MLFLOW_TRACKING_URI).",
    )
    @click.option(
        "--out",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder for eval.json and the plot (default: eval-<time> beside the checkpoint).",
    )
    @_quiet_option()
    @_unsafe_pickle_option()
    @_threads_option()
    @click.pass_context
    def eval_(
        ctx: click.Context,
        target: str,
        attacks: tuple[str, ...],
        n_examples: int | None,
        eps: float | None,
        sanity: bool,
        curve: str | None,
        overrides: tuple[str, ...],
        no_track: bool,
        tracking_uri: str | None,
        out: str | None,
        quiet: bool,
        allow_unsafe_pickle: bool,
        threads: int | None,
    ) -> None:
        """Evaluate a trained model: a checkpoint file, a run folder or an MLflow run id.

        The model is rebuilt from the recipe stored in the checkpoint (a run folder gives its
        checkpoint-best.pt, else checkpoint-last.pt), attacked on the test split and scored
        per attack and in the worst case over the attacks. Results are printed, written to
        eval.json and logged to the checkpoint's MLflow run (unless --no-track).
        """
        from artplug.workflows import EvalOptions, evaluate_target

        options = EvalOptions(
            attacks=list(attacks),
            n_examples=n_examples,
            eps=eps,
            sanity=sanity,
            curve=_parse_curve(curve),
            overrides=_with_threads(overrides, threads),
            no_track=no_track,
            tracking_uri=tracking_uri,
            out=Path(out) if out is not None else None,
            quiet=quiet,
            allow_unsafe_pickle=allow_unsafe_pickle,
        )
        evaluate_target(_plugin_set(ctx), target, options, echo=click.echo)

    @cli.command()
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @_set_option()
    @click.pass_context
    def validate(ctx: click.Context, recipe: str, overrides: tuple[str, ...]) -> None:
        """Check RECIPE and print it resolved, with every default filled in.

        The model is built on the CPU and the transforms applied (no data is loaded), so that a
        technique that rejects its parameters or the model is reported before any training.
        """
        from artplug.workflows import validate_recipe

        resolved = _load(_plugin_set(ctx), recipe, overrides)
        validate_recipe(resolved)
        click.echo(resolved.to_toml(), nl=False)

    @cli.command(name="list")
    @click.argument("kind", required=False, type=click.Choice(list(KINDS)))
    @click.pass_context
    def list_(ctx: click.Context, kind: str | None) -> None:
        """List installed techniques (optionally only one KIND)."""
        plugin_set = _plugin_set(ctx)
        for index, k in enumerate([kind] if kind else list(KINDS)):
            registry = plugin_set.registries.of(k)  # type: ignore[arg-type]
            if index:
                click.echo()
            click.echo(KIND_TITLES[k])
            width = max((len(e.name) for e in registry), default=0)
            for entry in registry:
                click.echo(f"  {entry.name.ljust(width)}  {entry.description}  [{entry.plugin}]")
            if not len(registry):
                click.echo("  (none installed)")
            for name in registry.contested():
                click.echo(
                    f"  {name.ljust(width)}  not usable: contested by outside plugins "
                    "(see 'artplug plugins')"
                )

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_context
    def plugins(ctx: click.Context, as_json: bool) -> None:
        """Show installed plugins, what they register, name collisions and load failures."""
        plugin_set = _plugin_set(ctx)
        techniques: dict[str, list[str]] = {name: [] for name in plugin_set.plugins}
        for k in KINDS:
            for entry in plugin_set.registries.of(k):
                techniques.setdefault(entry.plugin, []).append(f"{k}:{entry.name}")
        rows = [
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "builtin": info.builtin,
                "techniques": techniques.get(info.name, []),
            }
            for info in sorted(plugin_set.plugins.values(), key=lambda i: (not i.builtin, i.name))
        ]
        failures = [
            {"name": f.name, "distribution": f.distribution, "error": f.error}
            for f in plugin_set.failures
        ]
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "plugins": rows,
                        "failed": failures,
                        "blocked": sorted(plugin_set.blocked),
                        "collisions": [c.as_dict() for c in plugin_set.collisions],
                    },
                    indent=2,
                )
            )
            return
        for row in rows:
            origin = "built-in" if row["builtin"] else (row["distribution"] or "local")
            version = f" {row['version']}" if row["version"] else ""
            names = techniques.get(str(row["name"]), [])
            click.echo(f"{row['name']} ({origin}{version}): {', '.join(names) or '-'}")
        for name in sorted(plugin_set.blocked):
            click.echo(f"{name}: blocked by ARTPLUG_DISABLE_PLUGINS")
        for failure in plugin_set.failures:
            click.echo(f"FAILED {failure.one_line()}")
        if plugin_set.collisions:
            click.echo("Name collisions:")
            for collision in plugin_set.collisions:
                click.echo(f"  {collision.one_line()}")

    @cli.command()
    @click.pass_context
    def schema(ctx: click.Context) -> None:
        """Print the JSON schema of recipes, including installed plugins' parameters."""
        from artplug.recipe import json_schema

        click.echo(json.dumps(json_schema(_plugin_set(ctx).registries), indent=2))

    @cli.command()
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
        tracking_uri: str | None,
    ) -> None:
        """Compare tracked runs: one row per run, best robust accuracy first, and a chart.

        EXPERIMENT is an MLflow experiment name (default: the one a plain `artplug run` uses,
        'artplug'), or a sweep's parent run id to show its grid. Everything is read from the
        tracking store (params, test/* metrics, time and cost metrics); nothing is re-evaluated.
        """
        _compare(experiment, list(run_ids), parent, fmt, chart, no_chart, tracking_uri)

    @cli.command()
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
    @_set_option()
    @_quiet_option()
    @_max_steps_option("Stop every run after N steps (smoke test).")
    @click.pass_context
    def sweep(
        ctx: click.Context,
        recipe: str,
        grid_specs: tuple[str, ...],
        overrides: tuple[str, ...],
        quiet: bool,
        max_steps: int | None,
    ) -> None:
        """Run RECIPE once per combination of the --grid values, as nested MLflow runs.

        A parent run holds one child run per combination (each a full `artplug run` with the
        grid values applied like --set). Every combination is validated before any training.
        Runs go one after the other; a failing run is recorded as FAILED and the sweep goes on;
        Ctrl-C ends the parent run as KILLED and keeps what is done. The grid is compared at
        the end (again any time with `artplug compare PARENT_RUN_ID`).
        """
        _sweep(ctx, recipe, list(grid_specs), list(overrides), quiet=quiet, max_steps=max_steps)

    @cli.command()
    @click.argument("run_id")
    @_set_option()
    @click.option(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking URI of RUN_ID and of the new run (default: MLFLOW_TRACKING_URI, "
        "else MLflow's; the new run follows the recipe's [tracking] uri when it names one).",
    )
    @_quiet_option()
    @_max_steps_option()
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

        --set changes the recipe (e.g. run.seed=1 for another seed). The new run is tagged
        artplug.rerun_of = RUN_ID and its description names the original and the changes.
        """
        _rerun(ctx, run_id, list(overrides), tracking_uri, quiet=quiet, max_steps=max_steps)

    @cli.command()
    @click.argument("run_dir", type=click.Path(file_okay=False), metavar="RUN_DIR")
    @click.option(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="Send the run to this MLflow tracking URI (default: the one the run used).",
    )
    def sync(run_dir: str, tracking_uri: str | None) -> None:
        """Send what the MLflow store lacks of the run in RUN_DIR, and set its final status.

        For a run whose tracking went offline: the metrics (from metrics.jsonl), params, tags
        and artifacts the store missed are sent, without duplicates (syncing twice is
        harmless), and the status becomes the one the run ended with (FINISHED, FAILED,
        KILLED; FAILED when its process died without saying). A run the store does not have
        yet is created.
        """
        from artplug.tracking import sync_run

        click.echo(sync_run(Path(run_dir), tracking_uri=tracking_uri).summary())

    @cli.command(name="new-plugin")
    @click.argument("name")
    @click.option(
        "--kind",
        required=True,
        type=click.Choice(["loss", "perturbation", "transform", "schedule"]),
        help="The technique kind the skeleton implements.",
    )
    @click.option(
        "--dir",
        "parent",
        default=".",
        show_default=True,
        type=click.Path(file_okay=False),
        help="Folder to create the package folder artplug-NAME in.",
    )
    @click.pass_context
    def new_plugin(ctx: click.Context, name: str, kind: str, parent: str) -> None:
        """Write a plugin package skeleton for technique NAME (kebab-case) of one kind.

        The package (pyproject.toml with the artplug entry point, one technique class,
        contract tests from artplug.testing, a README) passes its tests right after
        `pip install -e artplug-NAME` and `pytest artplug-NAME`.
        """
        from artplug.scaffold import new_plugin as write_skeleton

        technique_kind = cast(Kind, kind)  # click.Choice above allows only the four kinds
        registry = _plugin_set(ctx).registries.of(technique_kind)
        if name in registry:
            # The built-in (or the first installed package) would keep the name: refuse early.
            owner = registry.get(name).plugin
            raise ArtplugError(f"{kind} {name!r} is taken by plugin {owner!r}; pick another name")
        root = write_skeleton(name, technique_kind, Path(parent))
        click.echo(f"wrote {root}")
        click.echo(f"next: pip install -e {root} && pytest {root}")

    plugin_set.pm.hook.register_commands(cli=cli)
    return cli


def _parse_curve(text: str | None) -> list[float]:
    if text is None:
        return []
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ArtplugError(
                f"--curve: {part.strip()!r} is not a number; give eps values like 0,0.01,0.03"
            ) from None
        if not (math.isfinite(value) and value >= 0.0):
            raise ArtplugError(f"--curve: eps values must be finite and >= 0, got {part.strip()}")
        values.append(value)
    return values


# ------------------------------------------------------------------------------------------
# artplug compare / sweep / rerun (the logic is in artplug.lab)


def _compare(
    experiment: str | None,
    run_ids: list[str],
    parent: str | None,
    fmt: Format,
    chart: str | None,
    no_chart: bool,
    tracking_uri: str | None,
) -> None:
    """The body of ``artplug compare``."""
    from artplug import lab

    client, uri = lab.open_store(tracking_uri)
    comparison = lab.collect(client, uri, experiment=experiment, run_ids=run_ids, parent=parent)
    # CSV goes to stdout alone, so that it can be piped; the notes then go to stderr.
    notes_to_stderr = fmt == "csv"
    for line in lab.describe(comparison):
        click.echo(line, err=notes_to_stderr)
    click.echo(lab.render(comparison, fmt))
    if no_chart:
        return
    path = lab.plot_chart(comparison, chart or f"compare-{comparison.slug}.png")
    if path is None:
        click.echo("no chart: no run has both a clean and a robust accuracy", err=notes_to_stderr)
    else:
        click.echo(f"chart: {path}", err=notes_to_stderr)


def _resolve_sweep(
    plugin_set: PluginSet, recipe: str, grid: Mapping[str, list[str]], overrides: Sequence[str]
) -> list[tuple[dict[str, str], Any]]:
    """Every combination with its resolved recipe; all problems of all combinations at once."""
    from artplug import lab
    from artplug.errors import RecipeError

    combos = lab.combinations(grid)
    resolved: list[tuple[dict[str, str], Any]] = []
    failures: list[tuple[str, list[str]]] = []
    for values in combos:
        label = lab.combination_label(values)
        try:
            recipe_of = _load(plugin_set, recipe, [*overrides, *lab.combination_overrides(values)])
        except RecipeError as exc:
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
        raise RecipeError(recipe, problems)
    first = resolved[0][1]
    if first.tracking.backend == "none":
        raise ArtplugError(
            f"{recipe}: a sweep records its runs in MLflow, but tracking.backend is 'none'; "
            "use --set tracking.backend=mlflow"
        )
    return resolved


def _sweep(
    ctx: click.Context,
    recipe: str,
    grid_specs: list[str],
    overrides: list[str],
    *,
    quiet: bool,
    max_steps: int | None,
) -> None:
    """The body of ``artplug sweep``: validate every combination, then a parent and children."""
    import tempfile

    from artplug import lab
    from artplug.tracking import MlflowTracker
    from artplug.workflows import one_line, run_recipe

    plugin_set = _plugin_set(ctx)
    grid = lab.parse_grid(grid_specs)
    combos = _resolve_sweep(plugin_set, recipe, grid, overrides)
    base = combos[0][1]
    size = len(combos)
    names_vary = "run.name" in grid
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
    click.echo(f"sweep of {size} runs over {', '.join(grid)}; parent {parent.describe()}")
    outcomes: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        for index, (values, _) in enumerate(combos, start=1):
            label = lab.combination_label(values)
            click.echo(f"\n[{index}/{size}] {label}")
            extra = [] if names_vary else [f"run.name={json.dumps(f'{base.run.name} {label}')}"]
            # Re-resolved with the child's own name (validated above without it).
            child = _load(
                plugin_set, recipe, [*overrides, *lab.combination_overrides(values), *extra]
            )
            outcome: dict[str, Any] = {"values": values, "run_id": None, "status": "FAILED"}
            outcomes.append(outcome)
            tags = {
                lab.SWEEP_VALUES_TAG: json.dumps(values),
                lab.SWEEP_INDEX_TAG: f"{index}/{size}",
            }
            try:
                outcome["run_id"] = run_recipe(
                    plugin_set,
                    child,
                    no_track=False,
                    quiet=quiet,
                    max_steps=max_steps,
                    tracking_uri=parent.tracking_uri,
                    parent_run_id=parent.run_id,
                    tags=tags,
                    record_failure=True,
                    echo=click.echo,
                )
                outcome["status"] = "FINISHED"
            except KeyboardInterrupt:
                outcome["status"] = "KILLED"
                raise
            except Exception as exc:
                # One combination failing (diverged, out of memory, a bug in a plugin) must not
                # cost the others; its MLflow run is FAILED with the error as a tag.
                outcome["error"] = one_line(exc)
                click.echo(f"run {index}/{size} ({label}) failed: {outcome['error']}", err=True)
        failed = sum(o["status"] != "FINISHED" for o in outcomes)
        status = "FAILED" if failed == size else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        click.echo(
            f"sweep interrupted at run {len(outcomes)} of {size}; the finished runs are kept",
            err=True,
        )
        raise
    finally:
        with tempfile.TemporaryDirectory(prefix="artplug-sweep-") as scratch:
            summary = Path(scratch) / "sweep.json"
            summary.write_text(
                json.dumps({"grid": grid, "size": size, "runs": outcomes}, indent=2) + "\n",
                encoding="utf-8",
            )
            parent.log_artifact(summary, artifact_path="sweep")
            done = sum(o["status"] == "FINISHED" for o in outcomes)
            parent.log_metrics({"sweep/finished": done, "sweep/failed": len(outcomes) - done}, 0)
            if status != "KILLED":
                _log_sweep_comparison(parent, Path(scratch))
        parent.end(status)  # type: ignore[arg-type]
    comparison = _sweep_comparison(parent)
    click.echo()
    for line in lab.describe(comparison):
        click.echo(line)
    click.echo(lab.render(comparison, "table"))
    click.echo(parent.describe())
    if failed:
        click.echo(f"{failed} of {size} runs failed", err=True)
        # Exit status 1 (not 2: the sweep itself was valid), for scripts that chain sweeps.
        raise SystemExit(1)


def _sweep_comparison(parent: Any) -> Any:
    from artplug import lab

    client, uri = lab.open_store(parent.tracking_uri)
    return lab.collect(client, uri, parent=parent.run_id)


def _log_sweep_comparison(parent: Any, folder: Path) -> None:
    """The grid's comparison as artifacts of the parent run (compare.md, compare.png)."""
    from artplug import lab

    try:
        comparison = _sweep_comparison(parent)
    except ArtplugError:
        return  # no child run reached the store: nothing to compare
    table = folder / "compare.md"
    table.write_text(
        "\n\n".join([*lab.describe(comparison), lab.render(comparison, "markdown")]) + "\n",
        encoding="utf-8",
    )
    parent.log_artifact(table, artifact_path="sweep")
    chart = lab.plot_chart(comparison, folder / "compare.png")
    if chart is not None:
        parent.log_artifact(chart, artifact_path="sweep")


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
    from artplug.workflows import resolve_saved, run_recipe

    raw, original = lab.fetch_logged_recipe(run_id, tracking_uri)
    plugin_set = _plugin_set(ctx)
    source = f"MLflow run {run_id} ({lab.RECIPE_ARTIFACT})"
    resolved = resolve_saved(plugin_set, raw, source, overrides, check_out_dir=True)
    changes = f"with --set {' '.join(overrides)}" if overrides else "unchanged"
    note = (
        f"Re-run of MLflow run {run_id} ('{original.info.run_name}') from its logged "
        f"{lab.RECIPE_ARTIFACT}, {changes}."
    )
    run_recipe(
        plugin_set,
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


def _wants_traceback(argv: Sequence[str]) -> bool:
    return "--traceback" in argv or os.environ.get("ARTPLUG_TRACEBACK", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    traceback = _wants_traceback(args)
    try:
        plugin_set = load_plugins()
        # The one place start-up problems are printed: each warning once per command.
        report_warnings(plugin_set)
        cli = make_cli(plugin_set)
        cli.main(args=args, prog_name="artplug", standalone_mode=False)
    except ArtplugError as exc:
        if traceback:
            raise
        click.echo(f"Error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        # click turns KeyboardInterrupt (and so RunInterrupted, artplug.interrupt) into Abort;
        # the cause carries the exit status: 130 for SIGINT, 143 for SIGTERM.
        code = getattr(exc.__cause__, "exit_code", 130)
        name = getattr(exc.__cause__, "signal_name", None)
        click.echo(f"Interrupted ({name})." if name else "Aborted.", err=True)
        sys.exit(code)
    except KeyboardInterrupt as exc:
        click.echo("Interrupted.", err=True)
        sys.exit(getattr(exc, "exit_code", 130))
    except click.ClickException as exc:
        if traceback:
            raise
        message = " ".join(exc.format_message().split())
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"Error: {message}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # python -m artplug.cli
    main()
