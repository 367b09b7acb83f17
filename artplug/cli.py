"""The ``artplug`` command line.

``main()`` loads the plugins once, builds the click group with :func:`make_cli` and runs it. A
user error (:class:`~artplug.errors.ArtplugError` or a click usage error) prints one line that
starts with ``Error:`` and exits with code 2; ``--traceback`` (or ``ARTPLUG_TRACEBACK=1``)
shows the traceback instead. ``--help``, ``validate``, ``list``, ``plugins`` and ``schema`` do
not import ART or MLflow.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from artplug.errors import ArtplugError, CheckpointError, PluginError
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
        help="Evaluate a seeded subset of N test examples (default: the recipe's "
        "eval.test_examples).",
    )
    @click.option(
        "--eps",
        type=click.FloatRange(min=0.0),
        default=None,
        help="Attack radius in pixel space (default: the recipe's threat eps).",
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
    @click.option("--quiet", "-q", is_flag=True, help="No progress display.")
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
    ) -> None:
        """Evaluate a trained model: a checkpoint file, a run folder or an MLflow run id.

        The model is rebuilt from the recipe stored in the checkpoint (a run folder gives its
        checkpoint-best.pt, else checkpoint-last.pt), attacked on the test split and scored
        per attack and in the worst case over the attacks. Results are printed, written to
        eval.json and logged to the checkpoint's MLflow run (unless --no-track).
        """
        options = EvalOptions(
            attacks=list(attacks),
            n_examples=n_examples,
            eps=eps,
            sanity=sanity,
            curve=_parse_curve(curve),
            overrides=list(overrides),
            no_track=no_track,
            tracking_uri=tracking_uri,
            out=Path(out) if out is not None else None,
            quiet=quiet,
        )
        _eval(_plugin_set(ctx), target, options)

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
    _echo_report(result.report, result.sanity)
    click.echo(f"wall time {result.wall_time_s:.1f}s; files in {result.run_dir}")
    click.echo(tracker.describe())


def _echo_report(report: dict[str, Any], sanity: Any) -> None:
    """What follows the accuracy table: the checkpoint used, the sanity gate, the eps curve."""
    from artplug.sanity import gate_lines

    if "checkpoint_reason" in report:
        click.echo(
            f"checkpoint: {report['checkpoint']} (epoch {report['checkpoint_epoch']}); "
            f"{report['checkpoint_reason']}"
        )
    if sanity:
        for line in gate_lines(sanity):
            click.echo(line)
    elif isinstance(report.get("sanity"), dict) and report["sanity"].get("error"):
        click.echo(f"WARNING: the sanity gate could not run ({report['sanity']['error']})")
    curve = report.get("eps_curve")
    if isinstance(curve, dict):
        if "points" in curve:
            points = ", ".join(f"{eps:.4g}: {100 * acc:.1f}%" for eps, acc in curve["points"])
            plot = f"; plot {curve['plot']}" if curve.get("plot") else ""
            click.echo(f"eps curve ({curve['attack']}, {curve['norm']}): {points}{plot}")
        if curve.get("error"):
            click.echo(f"WARNING: the eps curve could not be computed ({curve['error']})")


# ------------------------------------------------------------------------------------------
# artplug eval

_RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class EvalOptions:
    """The options of ``artplug eval`` (see its ``--help``)."""

    attacks: list[str] = field(default_factory=list)
    n_examples: int | None = None
    eps: float | None = None
    sanity: bool = False
    curve: list[float] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    no_track: bool = False
    tracking_uri: str | None = None
    out: Path | None = None
    quiet: bool = False


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


def _check_attacks(names: Sequence[str]) -> None:
    import difflib

    from artplug.evaluate import ATTACKS

    for name in names:
        if name not in ATTACKS:
            close = difflib.get_close_matches(name, list(ATTACKS), n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ArtplugError(
                f"--attack {name}: unknown attack{hint}; known: {', '.join(ATTACKS)}"
            )


def _pick_checkpoint(folder: Path) -> Path:
    """A run folder's checkpoint-best.pt, else its checkpoint-last.pt."""
    from artplug.engine import BEST_CHECKPOINT_NAME, CHECKPOINT_NAME

    for name in (BEST_CHECKPOINT_NAME, CHECKPOINT_NAME):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder}: no {BEST_CHECKPOINT_NAME} or {CHECKPOINT_NAME} in this folder"
    )


def _download_run_checkpoint(run_id: str, dest: Path, tracking_uri: str | None) -> Path:
    """The checkpoint of an MLflow run, downloaded into ``dest`` (best, else last)."""
    from artplug.tracking import download_checkpoints

    # artplug.tracking is the one module that imports mlflow.
    folder = download_checkpoints(run_id, dest, tracking_uri=tracking_uri)
    return _pick_checkpoint(folder)


def _attach_tracker(resolved: Any, run_id: str, tracking_uri: str | None) -> Any:
    """A tracker that logs into the existing run ``run_id`` and leaves its status alone."""
    from artplug.tracking import MlflowTracker

    return MlflowTracker(
        resolved.tracking.experiment,
        resolved.run.name,
        tracking_uri=tracking_uri or resolved.tracking.uri,
        resume_run_id=run_id,
        keep_status=True,
    )


def _eval(plugin_set: PluginSet, target: str, options: EvalOptions) -> None:
    """The body of ``artplug eval``."""
    import tempfile

    from artplug import checkpoint as ckpt

    _check_attacks(options.attacks)
    path = Path(target)
    with tempfile.TemporaryDirectory(prefix="artplug-eval-") as scratch:
        local = True
        if path.is_dir():
            path = _pick_checkpoint(path)
        elif path.exists():
            pass
        elif _RUN_ID.fullmatch(target):
            path = _download_run_checkpoint(target, Path(scratch), options.tracking_uri)
            local = False
        else:
            raise CheckpointError(f"{target}: no such checkpoint file, run folder or MLflow run id")
        payload = ckpt.load(path)
    source = str(path) if local else f"MLflow run {target} ({path.name})"
    _evaluate_payload(
        plugin_set, payload, source, path.name, options, path.parent if local else None
    )


def _evaluate_payload(
    plugin_set: PluginSet,
    payload: dict[str, Any],
    source: str,
    checkpoint_name: str,
    options: EvalOptions,
    checkpoint_dir: Path | None,
) -> None:
    import contextlib
    import tempfile
    from datetime import datetime

    from artplug import engine
    from artplug.display import Display
    from artplug.evaluate import format_table
    from artplug.recipe import resolve
    from artplug.tracking import NullTracker, Tracker

    if not isinstance(payload.get("recipe"), dict) or "model" not in payload:
        raise CheckpointError(f"{source}: not an artplug training checkpoint (no recipe or model)")
    overrides = list(options.overrides)
    if options.eps is not None:
        overrides.append(f"threat.eps={options.eps!r}")
    if options.n_examples is not None:
        overrides.append(f"eval.test_examples={options.n_examples}")
    if options.attacks:
        overrides.append(f"eval.final_attacks={json.dumps(list(dict.fromkeys(options.attacks)))}")
    overrides.append(f"eval.eps_curve={json.dumps(options.curve)}")
    resolved = resolve(
        payload["recipe"],
        plugin_set.registries,
        source=source,
        overrides=overrides,
        failure_hint=plugin_set.failure_hint(),
    )
    display = Display(enabled=not options.quiet)
    components = engine.build(resolved)
    engine.load_weights(components, payload, source)
    epoch, step = int(payload.get("epoch", 0)), int(payload.get("step", 0))
    run_id = payload.get("tracking_run_id") if not options.no_track else None
    tracker: Tracker = NullTracker()
    if run_id:
        tracker = _attach_tracker(resolved, str(run_id), options.tracking_uri)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = options.out
    if out_dir is None and checkpoint_dir is not None:
        out_dir = checkpoint_dir / f"eval-{stamp}"
    threat = components.threat
    display.line(
        f"artplug eval: {checkpoint_name} (epoch {epoch}) of '{resolved.run.name}' from "
        f"{source}; {threat.norm} eps={threat.eps:.4g}, device {components.device}"
    )

    def log(metrics: Mapping[str, float], at_step: int) -> None:
        tracker.log_metrics(metrics, step=at_step)

    with contextlib.ExitStack() as stack:
        if out_dir is None:  # a downloaded checkpoint: the files only go to MLflow
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="artplug-")))
        else:
            folder = out_dir
            folder.mkdir(parents=True, exist_ok=True)
        tracker.start()
        try:
            accuracy = engine.evaluate_test(components, display)
            n_test = len(components.data.test[0])
            report: dict[str, Any] = {
                "source": source,
                "checkpoint": checkpoint_name,
                "checkpoint_epoch": epoch,
                "split": "test",
                "n_examples": min(n_test, resolved.eval.test_examples or n_test),
                "threat": {"norm": threat.norm, "eps": threat.eps},
                "accuracy": accuracy,
            }
            # Numbers at another eps than the run's must not overwrite the run's own.
            suffix = "" if options.eps is None else f"/eps_{threat.eps:g}"
            log({f"eval/{name}_acc{suffix}": value for name, value in accuracy.items()}, step)
            tracker.set_tags({"artplug.eval.checkpoint": f"{checkpoint_name} (epoch {epoch})"})
            sanity = None
            if options.sanity:
                sanity, report["sanity"] = engine.run_gate(components, tracker, display, log, step)
            if options.curve:
                report["eps_curve"] = engine.run_eps_curve(
                    components, folder, tracker, display, log, step
                )
            (folder / "eval.json").write_text(json.dumps(report, indent=2) + "\n", "utf-8")
            tracker.log_artifact(folder / "eval.json", artifact_path=f"evals/eval-{stamp}")
        finally:
            # With keep_status the tracker leaves the run's status as it found it; without it,
            # the reopened run is closed as FINISHED again (never left RUNNING).
            tracker.end("FINISHED")
    click.echo(format_table(accuracy, title=f"Test accuracy ({threat.norm}, eps={threat.eps:.4g})"))
    click.echo(f"checkpoint: {checkpoint_name} (epoch {epoch}) from {source}")
    _echo_report(report, sanity)
    if out_dir is not None:
        click.echo(f"results in {out_dir}")
    if run_id:
        click.echo(tracker.describe())
    else:
        reason = "--no-track" if options.no_track else "the checkpoint has no MLflow run"
        click.echo(f"not logged to MLflow ({reason})")


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
