"""The ``artplug`` command line.

``main()`` loads the plugins once, builds the click group with :func:`make_cli` and runs it. A
user error (:class:`~artplug.errors.ArtplugError` or a click usage error) prints one line that
starts with ``Error:`` and exits with code 2; ``--traceback`` (or ``ARTPLUG_TRACEBACK=1``)
shows the traceback instead. Other exit codes: 3 when training diverged
(:class:`~artplug.errors.DivergenceError`), 130 after SIGINT and 143 after SIGTERM (the run
stops at a step boundary and prints its ``artplug resume`` command). ``--help``, ``validate``,
``list``, ``plugins`` and ``schema`` do not import ART or MLflow. ``compare``, ``sweep`` and
``rerun`` come from the built-in plugin ``artplug_plugins.lab_commands`` (the
``register_commands`` hook); the options commands share are in :mod:`artplug.cli_options`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import click

from artplug.cli_options import load as _load
from artplug.cli_options import max_steps_option as _max_steps_option
from artplug.cli_options import parse_tags as _parse_tags
from artplug.cli_options import plugin_set as _plugin_set
from artplug.cli_options import quiet_option as _quiet_option
from artplug.cli_options import run_tracking_options as _run_tracking_options
from artplug.cli_options import set_option as _set_option
from artplug.cli_options import threads_option as _threads_option
from artplug.cli_options import with_threads as _with_threads
from artplug.errors import ArtplugError, PluginError
from artplug.kinds import KINDS, Kind
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


def _unsafe_pickle_option() -> Any:
    # Named for the risk on purpose: a format-1 checkpoint can only be read by unpickling
    # arbitrary objects, which runs whatever code the file holds.
    return click.option(
        "--allow-unsafe-pickle",
        "allow_unsafe_pickle",
        is_flag=True,
        help="Executes code stored in the file; only for format-1 checkpoints you wrote yourself.",
    )


def _rank_zero() -> bool:
    """Whether this process prints more than errors: not one of a distributed run's other
    ranks (torchrun's ``RANK``; read here without importing torch.distributed)."""
    return os.environ.get("RANK", "0") in ("", "0")


def _busy_hint(threads: int) -> None:
    """Suggest --threads 1 when the load average exceeds the core count at the start of a run.

    ``threads`` is the recipe's ``run.threads`` (0: torch's default). Measured on a shared
    2-core machine, torch's default of one thread per core made training 10-20x slower.
    ``ARTPLUG_NO_BUSY_HINT=1`` turns it off (scripts and the test suite, whose own processes
    load the machine and which read stderr line by line).
    """
    if os.environ.get("ARTPLUG_NO_BUSY_HINT", "") not in ("", "0"):
        return
    if not _rank_zero():
        return  # a distributed run's other ranks print only errors (rank 0 gives the hint)
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


def _nproc_option() -> Any:
    return click.option(
        "--nproc",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Run in N processes on this machine, started by torchrun (data-parallel; the "
        "recipe's batch_size is the global batch); see docs/distributed.md.",
    )


def _command_line(ctx: click.Context, skip: str) -> list[str]:
    """The arguments that run the command of ``ctx`` again as parsed, without option ``skip``."""
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        if param.name == skip or param.name not in ctx.params:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            arguments.append(str(value))
        elif isinstance(param, click.Option) and value is not None:
            flag = max(param.opts, key=len)
            if param.is_flag:
                options += [flag] if value else []
            elif param.multiple:
                for item in value:
                    options += [flag, str(item)]
            else:
                options += [flag, str(value)]
    # "--" so that an argument starting with "-" is not read as an option.
    return [str(ctx.info_name), *options, "--", *arguments]


def _relaunch(ctx: click.Context, nproc: int) -> None:
    """Run the command of ``ctx`` in ``nproc`` processes started by torchrun; exit with their
    status (``--nproc`` is the shorthand of ``torchrun --standalone --nproc-per-node``)."""
    from artplug import distributed

    if distributed.launched():
        raise ArtplugError(
            "--nproc starts torchrun itself; under torchrun leave it out (the processes are "
            "already started)"
        )
    args = _command_line(ctx, skip="nproc")
    if ctx.find_root().params.get("traceback"):
        args.insert(0, "--traceback")
    sys.exit(distributed.launch(nproc, args))


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
    @_run_tracking_options()
    @_nproc_option()
    @click.pass_context
    def run(
        ctx: click.Context,
        recipe: str,
        overrides: tuple[str, ...],
        no_track: bool,
        quiet: bool,
        max_steps: int | None,
        threads: int | None,
        tracking_uri: str | None,
        parent_run: str | None,
        tags: tuple[str, ...],
        nproc: int | None,
    ) -> None:
        """Train RECIPE adversarially, evaluate it with ART and log the run to MLflow.

        With --nproc N (or under torchrun) the run is data-parallel over N processes.
        """
        plugin_set = _plugin_set(ctx)
        run_tags = _parse_tags(tags)
        resolved = _load(plugin_set, recipe, _with_threads(overrides, threads))
        if nproc is not None and nproc > 1:
            from artplug.distributed import check_global_batch

            # Before starting anything; the error names the recipe and the key.
            check_global_batch(
                resolved.data.batch_size, nproc, f"{resolved.source}: data.batch_size"
            )
            _relaunch(ctx, nproc)
        _busy_hint(resolved.run.threads)
        from artplug.workflows import run_recipe

        run_recipe(
            plugin_set,
            resolved,
            no_track=no_track,
            quiet=quiet,
            max_steps=max_steps,
            echo=click.echo,
            tracking_uri=tracking_uri,
            parent_run_id=parent_run,
            tags=run_tags,
            # A nested run (a sweep child) that fails before tracking starts still gets its
            # FAILED run, so that the sweep shows every combination it tried.
            record_failure=parent_run is not None,
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
    @_nproc_option()
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
        nproc: int | None,
    ) -> None:
        """Continue an interrupted run from CHECKPOINT (a checkpoint file or its run folder).

        Only the latest checkpoint (checkpoint-last.pt) of an unfinished run (no eval.json, or
        one from a --max-steps smoke run) is continued, in the same folder and, when tracked,
        the same MLflow run; an interrupted step is not logged twice. A finished run or an
        older checkpoint (checkpoint-best.pt, a stale copy) is refused: --fork starts a new
        run folder and MLflow run from it instead (e.g. --fork --set run.epochs=100 to train a
        finished run longer). The recipe comes from the checkpoint; --set can change it.
        A distributed run continues with as many processes as it had (--nproc N).
        """
        from artplug.workflows import check_world_size, load_resumable, resolve_saved, run_recipe

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
        if nproc is not None and nproc > 1:
            from artplug.distributed import check_global_batch

            if not fork:
                check_world_size(path, payload, world_size=nproc)
            check_global_batch(
                resolved.data.batch_size, nproc, f"{resolved.source}: data.batch_size"
            )
            _relaunch(ctx, nproc)
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
    @_nproc_option()
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
        nproc: int | None,
    ) -> None:
        """Evaluate a trained model: a checkpoint file, a run folder or an MLflow run id.

        The model is rebuilt from the recipe stored in the checkpoint (a run folder gives its
        checkpoint-best.pt, else checkpoint-last.pt), attacked on the test split and scored
        per attack and in the worst case over the attacks. Results are printed, written to
        eval.json and logged to the checkpoint's MLflow run (unless --no-track). With --nproc
        N (or under torchrun) the examples are split over N processes.
        """
        if nproc is not None and nproc > 1:
            _relaunch(ctx, nproc)
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
    @click.argument("kind", required=False, metavar="[KIND|NAME]")
    @click.pass_context
    def list_(ctx: click.Context, kind: str | None) -> None:
        """List installed techniques (optionally only one KIND), or explain technique NAME.

        KIND is perturbation, loss, transform or schedule. For a technique NAME it prints the
        description, the paper, every parameter (type, default, meaning), the rules the
        validator applies to combinations and an example recipe that validates; the same text
        as docs/techniques/reference.md.
        """
        plugin_set = _plugin_set(ctx)
        if kind is not None and kind not in KINDS:
            from artplug.docgen import describe, find, render_text

            # A name may be taken in more than one kind: explain each.
            for index, entry in enumerate(find(plugin_set.registries, kind)):
                text = render_text(describe(entry, plugin_set.registries))
                click.echo(("\n" if index else "") + text, nl=False)
            return
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


def _wants_traceback(argv: Sequence[str]) -> bool:
    return "--traceback" in argv or os.environ.get("ARTPLUG_TRACEBACK", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    traceback = _wants_traceback(args)
    try:
        plugin_set = load_plugins()
        # The one place start-up problems are printed: each warning once per command (by rank
        # 0 alone in a distributed run).
        if _rank_zero():
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
        if _rank_zero():  # every rank of a distributed run stops; rank 0 says so
            click.echo(f"Interrupted ({name})." if name else "Aborted.", err=True)
        sys.exit(code)
    except KeyboardInterrupt as exc:
        if _rank_zero():
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
