"""Workflows: train a recipe end to end, evaluate a checkpoint.

The layer between the command line and the engine (DESIGN §10): ``cli`` parses options and
calls :func:`run_recipe` (``run``, ``resume``, ``sweep``, ``rerun``) or
:func:`evaluate_target` (``eval``); these build the components (:mod:`artplug.engine`), open
the tracker (:mod:`artplug.tracking`), train (:func:`artplug.engine.fit`), then run the final
evaluation, the sanity gate, the eps curve, the plots and model logging (:func:`finish`), and
write ``eval.json`` (:func:`write_eval_json`, its one writer). Output lines go through
``echo`` (``click.echo`` from the CLI), never straight to a terminal.

Layering: cli -> workflows -> engine / evaluate / tracking -> kinds / registry.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shlex
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import artplug
from artplug import distributed, engine
from artplug.display import Display, duration
from artplug.engine import Components, Training, model_is_finite
from artplug.errors import ArtplugError, CheckpointError, DivergenceError, did_you_mean
from artplug.interrupt import StopRequest
from artplug.lab import ERROR_TAG, RUN_ID
from artplug.plugins import PluginSet
from artplug.sanity import CheckResult
from artplug.selection import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_NAME,
    GOOD_CHECKPOINT_NAME,
    choose_checkpoint,
)
from artplug.tracking import NullTracker, Tracker

Echo = Callable[..., None]
"""Prints one line: ``echo(message)``, or ``echo(message, err=True)`` for stderr."""


def _print(message: str = "", err: bool = False) -> None:
    print(message, file=sys.stderr if err else sys.stdout)


def _silent(message: str = "", err: bool = False) -> None:
    """The ``echo`` of a distributed run's ranks other than 0: they print only errors, and
    errors reach the CLI as exceptions."""


@dataclass
class RunResult:
    """What a finished (or interrupted) run leaves behind.

    ``checkpoint`` is the last epoch's checkpoint (what ``resume`` continues from);
    ``used_checkpoint`` and ``used_epoch`` name the one the final evaluation ran on. ``report``
    is the content of ``eval.json``; ``sanity`` the gate's results (``None`` when it did not run);
    ``cost`` the training cost (``eval.json``'s ``cost`` entry, see
    :class:`~artplug.costs.CostLedger`).
    ``rollbacks`` lists the rollbacks ``run.on_nonfinite = "rollback"`` made (each a dict:
    ``step``, ``terms``, ``to_step``, ``lr_multiplier``) and ``lr_multiplier`` is the factor
    they left on the learning rate (``0.5 ** len(rollbacks)``). ``training_complete`` is false
    when ``max_steps`` cut training short of the recipe's epochs (``resume`` may continue it).
    ``wall_time_s`` is the run's whole wall time: the sum of ``wall_segments`` (one per process
    that trained it: a resumed run has several). ``steps`` are the optimizer steps done, of
    ``total_steps`` the recipe asks for.
    """

    run_dir: Path
    final: dict[str, float]
    history: list[dict[str, float]]
    wall_time_s: float
    epochs_done: int
    checkpoint: Path
    used_checkpoint: str = CHECKPOINT_NAME
    used_epoch: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    sanity: list[CheckResult] | None = None
    cost: dict[str, Any] = field(default_factory=dict)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    lr_multiplier: float = 1.0
    training_complete: bool = True
    wall_segments: list[float] = field(default_factory=list)
    steps: int = 0
    total_steps: int = 0
    epochs_total: int = 0


def write_plots(run_dir: Path, name: str, tracker: Tracker, display: Display) -> list[Path]:
    """Draw the run's plots from its ``metrics.jsonl`` into ``plots/``, then log that folder.

    The PNGs land in the run folder first, so they exist even when tracking is off or broken.
    Plotting is a convenience: any failure is reported (stderr, a WARNING line) and the run
    goes on. In a distributed run only rank 0 draws.
    """
    from artplug import plots

    if not distributed.is_writer():
        return []

    try:
        drawn = plots.plot_run(
            plots.read_metrics(run_dir / plots.METRICS_FILE), run_dir / plots.PLOTS_DIR, name=name
        )
    except ImportError as exc:
        display.warn(f"no plots: matplotlib is needed for them ({exc})")
        return []
    except Exception as exc:
        traceback.print_exc()
        display.warn(f"the run's plots could not be drawn ({type(exc).__name__}: {exc})")
        return []
    if drawn:
        tracker.log_artifact(run_dir / plots.PLOTS_DIR, artifact_path=plots.PLOTS_DIR)
    return drawn


# Rows of the test split that go with a logged model to infer its input/output signature.
MODEL_SAMPLE_ROWS = 8


def exportable_model(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` in eval mode and the default memory format, ready to pickle."""
    exported = copy.deepcopy(model).to("cpu")
    return exported.to(memory_format=torch.contiguous_format).eval()


def log_trained_model(c: Components, tracker: Tracker, display: Display) -> str | None:
    """Log ``c.model`` (as it is now) with the tracker's :meth:`~Tracker.log_model`.

    The logged module is a CPU copy in eval mode: what ``mlflow.pytorch.load_model`` gives back
    is a classifier that takes float32 NCHW batches in [0, 1] (normalisation is inside the
    model) and returns logits. Its signature comes from the first test images. The classes of
    its modules must be importable where it is loaded (artplug, and ``artplug_plugins`` or the
    third-party plugin packages whose transforms changed the network).
    """
    # A tracker written before log_model joined the protocol simply logs no model.
    log_model = getattr(tracker, "log_model", None)
    if log_model is None:
        return None
    model = exportable_model(c.model)
    sample = c.data.test[0][:MODEL_SAMPLE_ROWS].detach().to("cpu", torch.float32).contiguous()
    uri: str | None = log_model(model, sample, requirements=[f"artplug=={artplug.__version__}"])
    if uri is not None:
        display.line(f"model logged to MLflow: mlflow.pytorch.load_model({uri!r})")
    return uri


def write_eval_json(path: Path, report: Mapping[str, Any]) -> None:
    """Write ``report`` as ``eval.json`` at ``path``: the one writer of that file.

    Training (:func:`finish`) rewrites it after each stage (test accuracy, sanity gate, eps
    curve, logged model), so that a failure in a later stage leaves the earlier results;
    ``artplug eval`` (:func:`evaluate_payload`) writes it once.
    """
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def run_gate(
    c: Components,
    tracker: Tracker,
    display: Display,
    log: Callable[[Mapping[str, float], int], None],
    step: int,
) -> tuple[list[CheckResult] | None, dict[str, Any]]:
    """Run the gate on the model as it is now; log, tag and announce its results.

    A failed check marks the run (tags, a WARNING line, ``eval.json``) and nothing more. An
    exception inside the gate is a bug, but the trained model and its evaluation matter more:
    its traceback goes to stderr, the run is tagged ``artplug.sanity = ERROR: ...`` and goes on.
    """
    from artplug import sanity as gate

    settings = c.recipe.eval
    limit = min(settings.sanity_examples, settings.test_examples or settings.sanity_examples)
    x, y = engine.first_test_examples(c, limit)
    try:
        results = gate.run_sanity_gate(
            c.model,
            x,
            y,
            c.eval_threat,
            batch_size=settings.batch_size,
            seed=c.recipe.run.seed,
            device=c.device,
            tolerance=settings.sanity_tolerance,
            black_box=settings.sanity_black_box,
            on_check=lambda name: display.status(f"  sanity gate: {name} on {len(x)} examples"),
        )
    except Exception as exc:
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        tracker.set_tags({"artplug.sanity": f"ERROR: {message}"})
        display.line(f"WARNING: the sanity gate could not run ({message})")
        return None, {"passed": None, "summary": f"ERROR: {message}", "error": message}
    log(gate.gate_metrics(results), step)
    tracker.set_tags(gate.gate_tags(results))
    summary = gate.gate_summary(results)
    display.line(
        f"sanity gate: {summary}" if summary == "passed" else f"WARNING: sanity gate {summary}"
    )
    return results, gate.gate_report(results, len(x), settings.sanity_tolerance)


def run_eps_curve(
    c: Components,
    run_dir: Path,
    tracker: Tracker,
    display: Display,
    log: Callable[[Mapping[str, float], int], None],
    step: int,
) -> dict[str, Any]:
    """Robust accuracy at every ``eval.eps_curve`` radius: metrics, ``eps_curve.png``, points."""
    from artplug import curves

    settings = c.recipe.eval
    x, y = engine.first_test_examples(c, settings.eps_curve_examples or settings.test_examples)
    attack = curves.DEFAULT_ATTACK
    report: dict[str, Any] = {"attack": attack, "norm": c.eval_threat.norm, "n_examples": len(x)}
    try:
        points = curves.robust_accuracy_curve(
            c.model,
            x,
            y,
            c.threat,
            settings.eps_curve,
            attack=attack,
            batch_size=settings.batch_size,
            seed=c.recipe.run.seed,
            device=c.device,
            on_point=lambda eps: display.status(f"  eps curve: {attack} at eps={eps:.4g}"),
        )
    except Exception as exc:
        traceback.print_exc()
        report["error"] = f"{type(exc).__name__}: {exc}"
        display.line(f"WARNING: the eps curve could not be computed ({report['error']})")
        return report
    report["points"] = [[eps, accuracy] for eps, accuracy in points]
    log(curves.curve_metrics(points, attack), step)
    display.line(
        f"eps curve ({attack}): "
        + ", ".join(f"{eps:.4g}: {100 * accuracy:.1f}%" for eps, accuracy in points)
    )
    plot = run_dir / curves.PLOT_NAME
    if not distributed.is_writer():
        return report  # rank 0 draws the plot
    try:
        curves.plot_curve(
            points,
            plot,
            title=f"{c.recipe.run.name}: {attack} accuracy vs {c.threat.norm} eps "
            f"({len(x)} test examples)",
            attack=attack,
            mark_eps=c.eval_threat.eps,
        )
    except ImportError as exc:
        report["plot"] = None
        report["plot_error"] = f"matplotlib is needed for the plot ({exc})"
        display.warn(f"no {curves.PLOT_NAME}: {report['plot_error']}")
        return report
    report["plot"] = curves.PLOT_NAME
    tracker.log_artifact(plot)
    return report


# ------------------------------------------------------------------------------------------
# Train a recipe end to end


def validate_recipe(resolved: Any) -> None:
    """``artplug validate``'s check beyond the recipe's own: build it on the CPU, without data.

    A technique that rejects its parameters or the model raises a
    :class:`~artplug.errors.RecipeError` naming its place (:func:`artplug.engine.check_build`).
    """
    engine.check_build(resolved)


def train_and_evaluate(
    c: Components,
    tracker: Tracker | None = None,
    *,
    run_dir: Path | None = None,
    display: Display | None = None,
    resume_from: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    stop: StopRequest | None = None,
) -> RunResult:
    """Train ``c`` (:func:`artplug.engine.fit`), then :func:`finish` it: a whole run.

    The arguments are :func:`~artplug.engine.fit`'s. When training ends (or fails) the training
    curves and schedules are drawn into ``plots/`` (:mod:`artplug.plots`) and logged; a
    failure or an interruption still leaves them, since they are what explains it.
    """
    tracker = tracker if tracker is not None else NullTracker()
    display = display if display is not None else Display(enabled=False)
    run_dir = run_dir if run_dir is not None else engine.make_run_dir(c.recipe)
    try:
        # Through the module, so that tests can stand in for the loop.
        training = engine.fit(
            c,
            tracker,
            run_dir=run_dir,
            display=display,
            resume_from=resume_from,
            max_steps=max_steps,
            stop=stop,
        )
    except BaseException:
        write_plots(run_dir, c.recipe.run.name, tracker, display)
        raise
    try:
        return finish(c, training, tracker, display)
    finally:
        training.log.close()


def finish(c: Components, t: Training, tracker: Tracker, display: Display) -> RunResult:
    """After training: plots, the final evaluation, ``eval.json``, gate, curve, model, artifacts.

    The final evaluation runs on the checkpoint that ``eval.select`` picks (the
    catastrophic-overfitting stop, when it triggered, overrides it), then the sanity gate
    (``eval.sanity``) and the eps curve (``eval.eps_curve``). The run's cost totals are logged
    with the test metrics and written to ``eval.json``. The model itself is logged with
    MLflow's PyTorch flavour when ``tracking.log_model`` is on and the tracker tracks
    (:func:`log_trained_model`). Nothing non-finite is ever evaluated.
    """
    recipe, settings, run_dir, step = c.recipe, c.recipe.eval, t.run_dir, t.step
    # Drawn before the final evaluation, so that a failure there still leaves them.
    write_plots(run_dir, recipe.run.name, tracker, display)
    used_checkpoint, used_epoch, reason = choose_checkpoint(
        c, t.policy, t.best_path, t.used_checkpoint, t.used_epoch, t.epoch
    )
    if not model_is_finite(c.model):
        # Cannot happen through the loop's checks; a NaN model must never be evaluated,
        # reported or logged all the same.
        raise DivergenceError(
            f"{used_checkpoint} (epoch {used_epoch}) has non-finite weights; it is not evaluated",
            step=step,
        )
    display.line(f"final evaluation on {used_checkpoint} (epoch {used_epoch}): {reason}")
    final = engine.evaluate_test(c, display)
    # A resumed run's wall time adds up every process that trained it.
    segments = t.wall_segments()
    wall = sum(segments)
    policy = t.policy
    results: dict[str, Any] = {
        "split": "test",
        **engine.final_report_fields(c, final),
        "epochs": t.epoch,
        "wall_time_s": wall,
        "wall_segments_s": segments,
        "checkpoint": used_checkpoint,
        "checkpoint_epoch": used_epoch,
        "checkpoint_reason": reason,
        "best_checkpoint": (
            {
                "file": BEST_CHECKPOINT_NAME,
                "epoch": policy.best_epoch,
                "metric": policy.key,
                "val_accuracy": policy.best_score[0],
                "val_clean_accuracy": policy.best_score[1],
            }
            if policy.best_score is not None and t.best_path.exists()
            else None
        ),
        "early_stop": t.early_stop,
        "catastrophic_overfitting": t.overfit_event,
        "cost": t.ledger.report(),
        # False when --max-steps cut training short: `artplug resume` may continue it.
        "training_complete": not t.truncated,
        "rollbacks": [dict(r) for r in t.rollbacks],
        "lr_multiplier": t.lr_multiplier,
    }
    eval_path = run_dir / "eval.json"
    write_eval_json(eval_path, results)
    t.log(
        {f"test/{k}_acc": v for k, v in final.items()} | {"time/wall_s": wall} | t.ledger.totals(),
        step,
    )
    tracker.set_tags(
        {"artplug.checkpoint.used": used_checkpoint, "artplug.checkpoint.epoch": str(used_epoch)}
    )
    sanity: list[CheckResult] | None = None
    if settings.sanity:
        sanity, results["sanity"] = run_gate(c, tracker, display, t.log, step)
        write_eval_json(eval_path, results)
    describe_results(c, tracker, final, results)
    if settings.eps_curve:
        results["eps_curve"] = run_eps_curve(c, run_dir, tracker, display, t.log, step)
        write_eval_json(eval_path, results)
    if recipe.tracking.log_model and tracker.run_id is not None:
        results["mlflow_model"] = log_trained_model(c, tracker, display)
        write_eval_json(eval_path, results)
    tracker.log_artifact(eval_path)
    tracker.log_artifact(t.checkpoint_path, artifact_path="checkpoints")
    if t.best_path.exists():
        tracker.log_artifact(t.best_path, artifact_path="checkpoints")
    if used_checkpoint == GOOD_CHECKPOINT_NAME:
        tracker.log_artifact(t.good_path, artifact_path="checkpoints")
    tracker.log_artifact(run_dir / "metrics.jsonl")
    return RunResult(
        run_dir,
        final,
        t.history,
        wall,
        t.epoch,
        t.checkpoint_path,
        used_checkpoint=used_checkpoint,
        used_epoch=used_epoch,
        report=results,
        sanity=sanity,
        cost=results["cost"],
        rollbacks=results["rollbacks"],
        lr_multiplier=t.lr_multiplier,
        training_complete=not t.truncated,
        wall_segments=segments,
        steps=t.step,
        total_steps=t.steps_per_epoch * recipe.run.epochs,
        epochs_total=recipe.run.epochs,
    )


def describe_results(
    c: Components, tracker: Tracker, final: Mapping[str, float], report: Mapping[str, Any]
) -> None:
    """Rewrite the run's description (``mlflow.note.content``) with its final test results.

    :func:`artplug.engine.start_tracking` wrote what the run is; this adds the accuracies of
    the final attacks (``worst`` included) and the sanity gate's summary, so that the MLflow
    runs table and run page show the headline numbers (:func:`artplug.tracking.run_description`).
    """
    from artplug.tracking import NOTE_TAG, creation_note, run_description

    if tracker.run_id is None:
        return
    sanity = report.get("sanity")
    threat = c.eval_threat
    note = run_description(
        c.recipe,
        eval_norm=threat.norm,
        eval_eps=threat.eps,
        results=final,
        n_examples=report.get("n_examples"),
        sanity=sanity.get("summary") if isinstance(sanity, Mapping) else None,
        complete=bool(report.get("training_complete", True)),
        note=creation_note(tracker),
    )
    tracker.set_tags({NOTE_TAG: note})


def resolve_saved(
    plugin_set: PluginSet,
    raw: Mapping[str, Any],
    source: str,
    overrides: Sequence[str],
    *,
    check_out_dir: bool = False,
) -> Any:
    """A parsed recipe (from a checkpoint or an MLflow run) resolved with ``overrides``.

    ``check_out_dir``: the recipe will create a run folder in ``run.out_dir`` (rerun, fork).
    """
    from artplug.recipe import resolve

    return resolve(
        raw,
        plugin_set.registries,
        source=source,
        overrides=overrides,
        failure_hint=plugin_set.failure_hint(),
        check_out_dir=check_out_dir,
    )


RESUME_COMMAND_TAG = "artplug.resume_command"
FORKED_FROM_TAG = "artplug.forked_from"
FORKED_FROM_CHECKPOINT_TAG = "artplug.forked_from_checkpoint"
FORK_FILE = "forked_from.json"


def _finished_reason(folder: Path) -> str | None:
    """Why the run in ``folder`` counts as finished (its final report exists), else None.

    An ``eval.json`` written after a ``--max-steps`` smoke run says ``training_complete:
    false``: that run may be continued. Any other ``eval.json`` (also one from before the
    field existed) marks a finished run.
    """
    report = folder / "eval.json"
    if not report.is_file():
        return None
    try:
        complete = json.loads(report.read_text(encoding="utf-8")).get("training_complete", True)
    except (ValueError, AttributeError):
        complete = True
    return None if complete is False else f"{folder} is a finished run (it has {report.name})"


def check_resumable(path: Path, payload: Mapping[str, Any], allow_unsafe_pickle: bool) -> None:
    """Refuse (ResumeError, exit 2) to continue anything but the latest state of an open run.

    Continuing writes into ``path``'s folder: from a finished run it would overwrite the
    results; from an older checkpoint it would overwrite the newer checkpoint-last.pt and
    re-train steps already done. ``--fork`` is the way to do either.
    """
    from artplug import checkpoint as ckpt
    from artplug.errors import ResumeError

    folder = path.parent
    fork = f"use 'artplug resume --fork {shlex.quote(str(path))}' to start a new run from it"
    finished = _finished_reason(folder)
    if finished is not None:
        raise ResumeError(f"refused: {finished}; continuing would overwrite its results; {fork}")
    last = folder / CHECKPOINT_NAME
    if path.name == CHECKPOINT_NAME or not last.is_file():
        return
    latest = ckpt.load(last, purpose="eval", allow_unsafe_pickle=allow_unsafe_pickle)
    step, latest_step = int(payload["step"]), int(latest.get("step", 0))
    if step != latest_step:
        raise ResumeError(
            f"refused: {path} (step {step}) is not the latest checkpoint of {folder} "
            f"({CHECKPOINT_NAME} is at step {latest_step}); resume continues only from "
            f"{last}, or {fork}"
        )


def load_resumable(
    checkpoint: str, *, fork: bool, allow_unsafe_pickle: bool = False
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``artplug resume`` continues (a file, or a run folder's last one).

    Without ``fork`` it must be the latest state of an unfinished run
    (:func:`check_resumable`); a fork may start from any checkpoint.
    """
    from artplug import checkpoint as ckpt

    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    payload = ckpt.load(path, purpose="resume", allow_unsafe_pickle=allow_unsafe_pickle)
    if not fork:
        check_resumable(path, payload, allow_unsafe_pickle)
    return path, payload


def check_world_size(path: Path, payload: Mapping[str, Any], world_size: int | None = None) -> None:
    """Refuse (ResumeError) to continue a checkpoint with another number of processes.

    ``world_size``: the processes that will continue it (default: this run's, from torchrun's
    environment). Each rank continues its own random streams, which the checkpoint holds for
    the world size that wrote it; ``--fork`` starts a new run from it with any number.
    """
    from artplug.errors import ResumeError

    saved = int(payload.get("world_size", 1))
    now = world_size if world_size is not None else distributed.env_world_size()
    if saved != now:
        launch = f"--nproc {saved}" if saved > 1 else "one process (no --nproc, no torchrun)"
        raise ResumeError(
            f"refused: {path} was written by a run of {saved} process(es), this one has {now}; "
            f"resume it with {launch}, or use 'artplug resume --fork {shlex.quote(str(path))}' "
            "to start a new run from it"
        )


def _resume_command(run_dir: Path, no_track: bool) -> str:
    """The exact command that continues the run in ``run_dir``."""

    command = f"artplug resume {shlex.quote(str(run_dir / CHECKPOINT_NAME))}"
    return command + (" --no-track" if no_track else "")


def run_recipe(
    plugin_set: PluginSet,
    resolved: Any,
    *,
    no_track: bool,
    quiet: bool,
    max_steps: int | None,
    resume: tuple[Path, dict[str, Any]] | None = None,
    fork: bool = False,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    record_failure: bool = False,
    echo: Echo = _print,
    on_finished: Callable[[Components, RunResult], None] | None = None,
) -> str | None:
    """Train, evaluate and track one resolved recipe; print the results; return the run id.

    ``on_finished(components, result)`` is called once a run has finished and its tracking
    ended, before the results are printed: :func:`artplug.train` (:mod:`artplug.api`) takes
    the trained model and the results from there.

    ``tracking_uri`` overrides the recipe's; ``parent_run_id`` and ``tags`` go to the new
    MLflow run (``artplug sweep``, ``artplug rerun``). With ``record_failure`` a run that fails
    before its tracking started (e.g. a dataset that cannot be found) still gets a FAILED
    MLflow run, so that a sweep shows every combination it tried.

    ``resume`` (checkpoint path, payload) continues that run in its folder and MLflow run;
    with ``fork`` it starts a new folder and MLflow run from the checkpoint instead, tagged
    ``artplug.forked_from`` (and ``forked_from.json`` in the folder). SIGTERM and SIGINT stop
    training at a step boundary (:mod:`artplug.interrupt`): the run is KILLED, tagged
    ``artplug.resume_command``, and the command is printed. A fresh run folder that holds
    nothing after a failure is removed.
    """
    from artplug.evaluate import format_table
    from artplug.interrupt import stop_on_signals
    from artplug.tracking import MlflowTracker

    display = Display(quiet=quiet)
    continuing = resume is not None and not fork
    # A distributed run (torchrun): rank 0 writes the run folder, MLflow and the output; the
    # other ranks compute alongside it, silently, with a private scratch folder.
    writer = distributed.is_writer()
    if not writer:
        display, echo, no_track = Display(enabled=False), _silent, True
    if continuing and resume:
        check_world_size(resume[0], resume[1])
    run_tags = dict(tags or {})
    if resume is not None and fork:
        run_tags[FORKED_FROM_TAG] = str(resume[1].get("tracking_run_id") or "")
        run_tags[FORKED_FROM_CHECKPOINT_TAG] = str(resume[0].resolve())
    tracker: Tracker
    if no_track or resolved.tracking.backend == "none":
        tracker = NullTracker()
    else:
        tracker = MlflowTracker(
            resolved.tracking.experiment,
            resolved.run.name,
            tracking_uri=tracking_uri or resolved.tracking.uri,
            resume_run_id=resume[1].get("tracking_run_id") if continuing and resume else None,
            parent_run_id=parent_run_id,
            tags=run_tags,
        )
    run_dir: Path | None = None
    created = False
    status = "FAILED"
    stop = distributed.make_stop()  # every rank of a distributed run stops at the same step
    try:
        with stop_on_signals(stop):
            components = engine.build(resolved)
            # The folder is made only once the components are built, so that a recipe that
            # cannot be built (dataset missing, bad plugin) leaves no empty run folder.
            if components.world is not None and not components.world.writer:
                run_dir = distributed.scratch_dir(components.world)
            elif continuing and resume:
                run_dir = resume[0].parent
            else:
                run_dir = engine.make_run_dir(resolved)
                created = True
            if resume:
                where = f"epoch {resume[1]['epoch']}, step {resume[1]['step']}"
                display.line(
                    f"forking {resume[0]} ({where}) into a new run"
                    if fork
                    else f"resuming from {resume[0]} ({where})"
                )
            display.line(
                f"artplug run '{resolved.run.name}': {resolved.summary()} on "
                f"{resolved.data.dataset} ({resolved.model.arch}), {resolved.threat.norm} "
                f"eps={resolved.threat.eps:.4g}, {resolved.run.epochs} epochs, "
                f"device {components.device}"
            )
            display.line(f"run folder: {run_dir}")
            if isinstance(tracker, MlflowTracker):
                tracker.attach_run_dir(run_dir)  # its journal there lets `artplug sync` fill gaps
            engine.start_tracking(components, tracker, plugin_set.versions())
            if resume and fork:
                link = {
                    "run_id": resume[1].get("tracking_run_id"),
                    "checkpoint": str(resume[0].resolve()),
                    "run_dir": str(resume[0].parent.resolve()),
                    "epoch": int(resume[1]["epoch"]),
                    "step": int(resume[1]["step"]),
                }
                (run_dir / FORK_FILE).write_text(json.dumps(link, indent=2) + "\n", "utf-8")
                tracker.log_artifact(run_dir / FORK_FILE)
            result = train_and_evaluate(
                components,
                tracker,
                run_dir=run_dir,
                display=display,
                max_steps=max_steps,
                resume_from=resume[1] if resume else None,
                stop=stop,
            )
        status = "FINISHED"
    except KeyboardInterrupt as exc:
        distributed.hold_signals()  # a distributed rank records its end, undisturbed
        status = "KILLED"
        # torchrun stops every rank with a signal when one of them failed: that is a failure.
        peer = distributed.peer_failure(exc)
        if peer is not None:
            status = "FAILED"
            if tracker.run_id is not None:
                tracker.set_tags({ERROR_TAG: one_line(peer)})
            raise peer from None
        if run_dir is not None and (run_dir / CHECKPOINT_NAME).exists():
            command = _resume_command(run_dir, no_track)
            if tracker.run_id is not None:
                tracker.set_tags({RESUME_COMMAND_TAG: command})
            display.clear()  # the hint must not start after a half-overwritten status line
            echo(f"to continue this run: {command}", err=True)
        raise
    except Exception as exc:
        distributed.hold_signals()
        # In a distributed run a rank's failure breaks every other rank's next collective:
        # the first failure is reported (torchrun's store) and named by the others.
        peer = distributed.peer_failure(exc)
        if peer is None:
            distributed.report_failure(one_line(exc))
        if record_failure and tracker.run_id is None:
            # Failed before engine.start_tracking: open the run now so the failure is on record.
            with contextlib.suppress(ArtplugError):
                tracker.start()
                tracker.log_params(resolved.to_dict())
        if tracker.run_id is not None:
            tracker.set_tags({ERROR_TAG: one_line(peer if peer is not None else exc)})
        if peer is not None:
            raise peer from exc
        raise
    finally:
        if status != "FINISHED" and run_dir is not None:
            if created and engine.remove_if_unused(run_dir):
                display.line(f"run {status.lower()} before training; nothing was kept")
            else:
                # Keep what the run produced: the last checkpoint and the metrics so far.
                for name in (CHECKPOINT_NAME, "metrics.jsonl", "recipe.resolved.toml"):
                    path = run_dir / name
                    if path.exists():
                        tracker.log_artifact(
                            path, artifact_path="checkpoints" if name.endswith(".pt") else None
                        )
                display.line(f"run {status.lower()}; its files are kept in {run_dir}")
        tracker.end(status)  # type: ignore[arg-type]
    if on_finished is not None:
        on_finished(components, result)
    display.clear()  # the table must not start after a half-overwritten status line
    echo(
        format_table(
            result.final,
            title=_table_title(
                result.report,
                f"Test accuracy ({resolved.threat.norm}, eps={resolved.threat.eps:.4g})",
            ),
        )
    )
    _echo_report(result.report, result.sanity, echo)
    if result.rollbacks:
        echo(
            f"diverged {len(result.rollbacks)} time(s) and rolled back; the learning rate was "
            f"multiplied by {result.lr_multiplier:g}"
        )
    stopped = _max_steps_line(result, max_steps, _resume_command(result.run_dir, no_track))
    if stopped is not None:
        echo(stopped)
    wall = wall_time_text(result.wall_segments or [result.wall_time_s])
    echo(f"{wall}; files in {result.run_dir}")
    echo(tracker.describe())
    return tracker.run_id


def wall_time_text(segments: Sequence[float]) -> str:
    """``wall time 7.4s``, or for a resumed run ``wall time 3:12 in 2 segments (1:40 + 1:32)``."""
    text = f"wall time {duration(sum(segments))}"
    if len(segments) > 1:
        parts = " + ".join(duration(seconds) for seconds in segments)
        text += f" in {len(segments)} segments ({parts})"
    return text


def _max_steps_line(result: RunResult, max_steps: int | None, resume: str) -> str | None:
    """The line saying that ``--max-steps`` stopped training early, else ``None``."""
    if max_steps is None or result.steps < max_steps or result.steps >= result.total_steps:
        return None
    head = f"stopped after {result.steps} of {result.total_steps} steps (--max-steps)"
    if result.training_complete:
        # The cut fell in the last epoch: the run counts as finished and cannot be resumed.
        return f"{head}, in the last epoch: that epoch is incomplete; the run counts as finished"
    steps_per_epoch = result.total_steps // max(result.epochs_total, 1)
    if steps_per_epoch and result.steps % steps_per_epoch:
        # The cut epoch was checkpointed as done (a --max-steps run is a smoke test, not an
        # interruption): say so, rather than promise the rest of that epoch.
        return (
            f"{head}: training incomplete; {resume} continues it from epoch "
            f"{result.epochs_done + 1} (the rest of epoch {result.epochs_done} is not trained)"
        )
    return f"{head}: training incomplete; {resume} continues it"


def one_line(exc: BaseException) -> str:
    """An exception as the one line the CLI would print for it (without ``Error:``)."""
    from artplug.tracking import _short

    if isinstance(exc, ArtplugError):
        return exc.one_line()
    return _short(exc, 1000)


def _table_title(report: Mapping[str, Any], fallback: str) -> str:
    """The final table's title from ``eval.json``'s fields: evaluation and training eps, N.

    ``fallback`` when the report lacks them (a report written before these fields existed).
    """
    from artplug.evaluate import table_title

    try:
        threat, n = report["threat"], int(report["n_examples"])
        return table_title(
            threat["norm"],
            float(threat["eps"]),
            n,
            int(report.get("test_split_size", n)),
            train_eps=report.get("train_eps"),
        )
    except (KeyError, TypeError, ValueError):
        return fallback


def _echo_report(report: dict[str, Any], sanity: Any, echo: Echo) -> None:
    """What follows the accuracy table: the checkpoint used, the sanity gate, the eps curve."""
    from artplug.sanity import gate_lines

    if "checkpoint_reason" in report:
        echo(
            f"checkpoint: {report['checkpoint']} (epoch {report['checkpoint_epoch']}); "
            f"{report['checkpoint_reason']}"
        )
    if sanity:
        for line in gate_lines(sanity):
            echo(line)
    elif isinstance(report.get("sanity"), dict) and report["sanity"].get("error"):
        echo(f"WARNING: the sanity gate could not run ({report['sanity']['error']})")
    curve = report.get("eps_curve")
    if isinstance(curve, dict):
        if "points" in curve:
            points = ", ".join(f"{eps:.4g}: {100 * acc:.1f}%" for eps, acc in curve["points"])
            plot = f"; plot {curve['plot']}" if curve.get("plot") else ""
            echo(f"eps curve ({curve['attack']}, {curve['norm']}): {points}{plot}")
        if curve.get("error"):
            echo(f"WARNING: the eps curve could not be computed ({curve['error']})")


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
    allow_unsafe_pickle: bool = False


def _check_attacks(names: Sequence[str]) -> None:
    from artplug.evaluate import ATTACKS

    for name in names:
        if name not in ATTACKS:
            hint = did_you_mean(name, ATTACKS)
            raise ArtplugError(
                f"--attack {name}: unknown attack{hint}; known: {', '.join(ATTACKS)}"
            )


def _pick_checkpoint(folder: Path) -> Path:
    """A run folder's checkpoint-best.pt, else its checkpoint-last.pt."""

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


def evaluate_target(
    plugin_set: PluginSet, target: str, options: EvalOptions, echo: Echo = _print
) -> None:
    """``artplug eval``: evaluate ``target`` (a checkpoint file, run folder or MLflow run id)."""
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
        elif RUN_ID.fullmatch(target):
            path = _download_run_checkpoint(target, Path(scratch), options.tracking_uri)
            local = False
        else:
            raise CheckpointError(f"{target}: no such checkpoint file, run folder or MLflow run id")
        source = str(path) if local else f"MLflow run {target} ({path.name})"
        # Safe load (weights_only): a downloaded checkpoint is as untrusted as any file.
        payload = ckpt.load(
            path, purpose="eval", allow_unsafe_pickle=options.allow_unsafe_pickle, source=source
        )
    evaluate_payload(
        plugin_set, payload, source, path.name, options, path.parent if local else None
    )


def evaluate_payload(
    plugin_set: PluginSet,
    payload: dict[str, Any],
    source: str,
    checkpoint_name: str,
    options: EvalOptions,
    checkpoint_dir: Path | None,
    echo: Echo = _print,
) -> None:
    """Evaluate a loaded checkpoint ``payload``; print, write ``eval.json``, log to its run.

    The model is rebuilt from the recipe stored in the checkpoint, with ``options`` (eps, N,
    attacks, curve) as overrides. Numbers at another eps than the run's are logged under their
    own keys, so they never overwrite the run's own.
    """
    import dataclasses
    import tempfile
    from datetime import datetime

    from artplug import checkpoint as ckpt
    from artplug.evaluate import format_table

    if not distributed.is_writer():
        # Sharded evaluation (torchrun): rank 0 writes eval.json, logs and prints.
        options = dataclasses.replace(options, no_track=True, out=None, quiet=True)
        checkpoint_dir, echo = None, _silent
    ckpt.check_payload(payload, source, "eval")
    overrides = list(options.overrides)
    if options.eps is not None:
        # The evaluation radius only: the recipe's training threat stays what it was.
        overrides.append(f"eval.eps={options.eps!r}")
    if options.n_examples is not None:
        overrides.append(f"eval.test_examples={options.n_examples}")
    if options.attacks:
        overrides.append(f"eval.final_attacks={json.dumps(list(dict.fromkeys(options.attacks)))}")
    overrides.append(f"eval.eps_curve={json.dumps(options.curve)}")
    resolved = resolve_saved(plugin_set, payload["recipe"], source, overrides)
    display = Display(enabled=distributed.is_writer(), quiet=options.quiet)
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
    threat = components.eval_threat
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
            report: dict[str, Any] = {
                "source": source,
                "checkpoint": checkpoint_name,
                "checkpoint_epoch": epoch,
                "split": "test",
                **engine.final_report_fields(components, accuracy),
            }
            # Numbers at another eps than the run's must not overwrite the run's own.
            suffix = "" if options.eps is None else f"/eps_{threat.eps:g}"
            log({f"eval/{name}_acc{suffix}": value for name, value in accuracy.items()}, step)
            tracker.set_tags({"artplug.eval.checkpoint": f"{checkpoint_name} (epoch {epoch})"})
            sanity = None
            if options.sanity:
                sanity, report["sanity"] = run_gate(components, tracker, display, log, step)
            if options.curve:
                report["eps_curve"] = run_eps_curve(components, folder, tracker, display, log, step)
            write_eval_json(folder / "eval.json", report)
            tracker.log_artifact(folder / "eval.json", artifact_path=f"evals/eval-{stamp}")
        finally:
            # With keep_status the tracker leaves the run's status as it found it; without it,
            # the reopened run is closed as FINISHED again (never left RUNNING).
            tracker.end("FINISHED")
    display.clear()  # the table must not start after a half-overwritten status line
    echo(format_table(accuracy, title=engine.final_table_title(components)))
    echo(f"checkpoint: {checkpoint_name} (epoch {epoch}) from {source}")
    _echo_report(report, sanity, echo)
    if out_dir is not None:
        echo(f"results in {out_dir}")
    if run_id:
        echo(tracker.describe())
    else:
        reason = "--no-track" if options.no_track else "the checkpoint has no MLflow run"
        echo(f"not logged to MLflow ({reason})")
