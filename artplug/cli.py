"""The ``artplug`` command line.

``main()`` loads the plugins once, builds the click group with :func:`make_cli` and runs it. A
user error (:class:`~artplug.errors.ArtplugError` or a click usage error) prints one line that
starts with ``Error:`` and exits with code 2; ``--traceback`` (or ``ARTPLUG_TRACEBACK=1``)
shows the traceback instead. ``--help``, ``validate``, ``list``, ``plugins`` and ``schema`` do
not import ART or MLflow.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from artplug.errors import ArtplugError, PluginError
from artplug.kinds import KINDS
from artplug.plugins import PluginSet, load_plugins

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


def _plugin_set(ctx: click.Context) -> PluginSet:
    plugin_set: PluginSet = ctx.find_root().obj
    return plugin_set


def _load(ctx: click.Context, recipe: str, overrides: Sequence[str]) -> Any:
    from artplug.recipe import load_recipe

    plugin_set = _plugin_set(ctx)
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
    @click.option("--quiet", "-q", is_flag=True, help="No progress display.")
    @click.option(
        "--max-steps",
        type=click.IntRange(min=1),
        default=None,
        help="Stop after N steps (smoke test).",
    )
    @click.pass_context
    def run(
        ctx: click.Context,
        recipe: str,
        overrides: tuple[str, ...],
        no_track: bool,
        quiet: bool,
        max_steps: int | None,
    ) -> None:
        """Train RECIPE adversarially, evaluate it with ART and log the run to MLflow."""
        resolved = _load(ctx, recipe, overrides)
        _run(_plugin_set(ctx), resolved, no_track=no_track, quiet=quiet, max_steps=max_steps)

    @cli.command()
    @click.argument("checkpoint", type=click.Path())
    @_set_option()
    @click.option("--no-track", is_flag=True, help="Do not record the run in MLflow.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress display.")
    @click.pass_context
    def resume(
        ctx: click.Context,
        checkpoint: str,
        overrides: tuple[str, ...],
        no_track: bool,
        quiet: bool,
    ) -> None:
        """Continue an interrupted run from CHECKPOINT (a checkpoint file or its run folder).

        The recipe comes from the checkpoint; --set can change it (e.g. run.epochs=100 to train
        longer). The run continues in the same folder and, when tracked, the same MLflow run.
        """
        from artplug import checkpoint as ckpt
        from artplug.engine import CHECKPOINT_NAME
        from artplug.recipe import resolve

        path = Path(checkpoint)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        payload = ckpt.load(path)
        plugin_set = _plugin_set(ctx)
        resolved = resolve(
            payload["recipe"],
            plugin_set.registries,
            source=str(path),
            overrides=overrides,
            failure_hint=plugin_set.failure_hint(),
        )
        _run(
            plugin_set,
            resolved,
            no_track=no_track,
            quiet=quiet,
            max_steps=None,
            resume=(path, payload),
        )

    @cli.command()
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @_set_option()
    @click.pass_context
    def validate(ctx: click.Context, recipe: str, overrides: tuple[str, ...]) -> None:
        """Check RECIPE and print it resolved, with every default filled in."""
        resolved = _load(ctx, recipe, overrides)
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

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_context
    def plugins(ctx: click.Context, as_json: bool) -> None:
        """Show installed plugins, what they register, and any that failed to load."""
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
                    {"plugins": rows, "failed": failures, "blocked": sorted(plugin_set.blocked)},
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

    @cli.command()
    @click.pass_context
    def schema(ctx: click.Context) -> None:
        """Print the JSON schema of recipes, including installed plugins' parameters."""
        from artplug.recipe import json_schema

        click.echo(json.dumps(json_schema(_plugin_set(ctx).registries), indent=2))

    plugin_set.pm.hook.register_commands(cli=cli)
    return cli


def _run(
    plugin_set: PluginSet,
    resolved: Any,
    *,
    no_track: bool,
    quiet: bool,
    max_steps: int | None,
    resume: tuple[Path, dict[str, Any]] | None = None,
) -> None:
    # Heavy imports happen here, not at module level, so --help and validate stay light.
    from artplug import engine
    from artplug.display import Display
    from artplug.evaluate import format_table
    from artplug.tracking import MlflowTracker, NullTracker, Tracker

    display = Display(enabled=not quiet)
    components = engine.build(resolved)
    tracker: Tracker
    if no_track or resolved.tracking.backend == "none":
        tracker = NullTracker()
    else:
        tracker = MlflowTracker(
            resolved.tracking.experiment,
            resolved.run.name,
            tracking_uri=resolved.tracking.uri,
            resume_run_id=resume[1].get("tracking_run_id") if resume else None,
        )
    run_dir = resume[0].parent if resume else engine.make_run_dir(resolved)
    if resume:
        display.line(f"resuming after epoch {resume[1]['epoch']} from {resume[0]}")
    display.line(
        f"artplug run '{resolved.run.name}': {resolved.summary()} on {resolved.data.dataset} "
        f"({resolved.model.arch}), {resolved.threat.norm} eps={resolved.threat.eps:.4g}, "
        f"{resolved.run.epochs} epochs, device {components.device}"
    )
    display.line(f"run folder: {run_dir}")
    status = "FAILED"
    try:
        engine.start_tracking(components, tracker, plugin_set.versions())
        result = engine.fit(
            components,
            tracker,
            run_dir=run_dir,
            display=display,
            max_steps=max_steps,
            resume_from=resume[1] if resume else None,
        )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            # Keep what the run produced: the last epoch's checkpoint and the metrics so far.
            for name in (engine.CHECKPOINT_NAME, "metrics.jsonl", "recipe.resolved.toml"):
                path = run_dir / name
                if path.exists():
                    tracker.log_artifact(
                        path, artifact_path="checkpoints" if name.endswith(".pt") else None
                    )
            display.line(f"run {status.lower()}; its files are kept in {run_dir}")
        tracker.end(status)  # type: ignore[arg-type]
    click.echo(
        format_table(
            result.final,
            title=f"Test accuracy ({resolved.threat.norm}, eps={resolved.threat.eps:.4g})",
        )
    )
    click.echo(f"wall time {result.wall_time_s:.1f}s; files in {result.run_dir}")
    click.echo(tracker.describe())


def _wants_traceback(argv: Sequence[str]) -> bool:
    return "--traceback" in argv or os.environ.get("ARTPLUG_TRACEBACK", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    traceback = _wants_traceback(args)
    try:
        plugin_set = load_plugins()
        for failure in plugin_set.failures:
            click.echo(f"Warning: {failure.one_line()}", err=True)
        cli = make_cli(plugin_set)
        cli.main(args=args, prog_name="artplug", standalone_mode=False)
    except ArtplugError as exc:
        if traceback:
            raise
        click.echo(f"Error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
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
