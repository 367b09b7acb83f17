"""The Python API for notebooks and scripts: :func:`train` a recipe, :func:`evaluate` any model.

``artplug.train(recipe, overrides={...})`` is the ``artplug run`` command as a function: it
goes through the same workflow (:func:`artplug.workflows.run_recipe`), with the overrides
turned into the same ``--set KEY=VALUE`` strings, so a value is validated exactly as on the
command line. ``artplug.evaluate(model, x, y, attacks=[...], threat=...)`` attacks any
``nn.Module`` that takes inputs in [0, 1] with artplug's fixed attack table
(:mod:`artplug.evaluate`).

Errors are exceptions, never ``SystemExit``: a bad recipe or override raises
:class:`~artplug.errors.RecipeError`, a missing dataset :class:`~artplug.errors.DataError`,
bad arguments :class:`ApiError`; all derive from :class:`~artplug.errors.ArtplugError`, whose
``one_line()`` is what the CLI would print after ``Error:``.

``artplug.evaluate`` is also the name of the evaluation module (``import artplug.evaluate``
keeps working, as do ``artplug.evaluate.evaluate`` and ``artplug.evaluate.ATTACKS``); the
package makes that module callable (:func:`make_evaluate_callable`), so that calling it runs
:func:`evaluate` here. For type checkers the package declares ``artplug.evaluate`` to be this
function (under ``TYPE_CHECKING``), so ``artplug.evaluate(...)`` is checked against its
signature; typed code reaches the module's own names with ``import artplug.evaluate as ev``.

Layering: this module sits beside the CLI, on top of :mod:`artplug.workflows`; it imports the
workflow layer (and with it the engine) only inside its functions, so that ``import artplug``
stays light.
"""

from __future__ import annotations

import math
import numbers
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from artplug.errors import ArtplugError, did_you_mean
from artplug.kinds import Threat

if TYPE_CHECKING:
    from artplug.plugins import PluginSet
    from artplug.recipe import ResolvedRecipe

__all__ = [
    "DEFAULT_ATTACKS",
    "ApiError",
    "Evaluation",
    "ThreatLike",
    "TrainResult",
    "evaluate",
    "make_evaluate_callable",
    "overrides_to_set",
    "train",
]

ThreatLike = Threat | tuple[str, float] | Mapping[str, Any]
"""A threat for :func:`evaluate`: ``artplug.Threat("linf", 8/255)``, ``("linf", 8/255)`` or
``{"norm": "linf", "eps": 8/255}``."""

DEFAULT_ATTACKS: tuple[str, ...] = ("clean", "pgd-20")
"""What :func:`evaluate` runs when no ``attacks`` are given: cheap, and a first look only (PGD
alone overstates robustness; add ``"apgd-ce"``, ``"apgd-dlr"`` or ``"autoattack"``)."""

_NORMS = ("linf", "l2")


class ApiError(ArtplugError, ValueError):
    """A bad argument to :func:`train` or :func:`evaluate`.

    Also a ``ValueError``, as the lower-level :func:`artplug.evaluate.evaluate` raises for the
    same mistakes, so that code catching either keeps working.
    """


# ------------------------------------------------------------------------------------------
# train


@dataclass(repr=False)
class TrainResult:
    """What :func:`train` gives back.

    Attributes:
        model: the trained network, in eval mode, on the device it trained on, with the
            weights of the checkpoint the final evaluation used (``eval.select``). It takes
            float32 NCHW batches in [0, 1] (normalisation is inside) and returns logits.
        metrics: the final test accuracies in [0, 1] by attack (``clean``, ``pgd-20``, ...,
            and ``worst`` with two or more attacks), as logged to MLflow under ``test/<name>_acc``.
        run_dir: the run folder (checkpoints, ``eval.json``, ``metrics.jsonl``, plots).
        run_id: the MLflow run id, or None when the run was not tracked.
        report: the content of ``eval.json``.
        history: the metric records of training, one dict per logging call.
        threat: the threat the final evaluation used, ready for :func:`evaluate`.
        recipe: the resolved recipe (every default filled in).
        test_data: the test split ``(x, y)`` on the CPU, x in [0, 1].
        training_complete: False when ``max_steps`` cut training short.
        wall_time_s: the run's wall time.
    """

    model: nn.Module
    metrics: dict[str, float]
    run_dir: Path
    run_id: str | None
    report: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    threat: Threat = field(default_factory=lambda: Threat("linf", 0.0))
    recipe: ResolvedRecipe | None = None
    test_data: tuple[Tensor, Tensor] | None = None
    training_complete: bool = True
    wall_time_s: float = 0.0

    def __repr__(self) -> str:
        # The default dataclass repr would print the whole network and the test tensors.
        metrics = ", ".join(f"{name}={value:.4f}" for name, value in self.metrics.items())
        return (
            f"TrainResult(run_id={self.run_id!r}, run_dir={str(self.run_dir)!r}, "
            f"metrics={{{metrics}}})"
        )


def overrides_to_set(overrides: Mapping[str, Any] | None) -> list[str]:
    """``{"optim.lr": 0.05}`` as the ``--set`` strings the CLI would pass: ``["optim.lr=0.05"]``.

    Values are written in TOML (:func:`artplug.recipe.toml_value`), so strings, numbers,
    booleans, lists and tables (dicts, as inline tables) mean what they mean in a recipe file;
    a ``pathlib.Path`` becomes its string and numpy scalars their Python value. Keys are the
    dotted keys of ``--set`` (``loss.0.beta``). Raises :class:`ApiError` for a value TOML
    cannot hold (``None``, arbitrary objects) or a key that is not a non-empty string.
    """
    from artplug.recipe import toml_value

    out: list[str] = []
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or not key.strip() or "=" in key:
            raise ApiError(f"overrides: {key!r} is not a dotted recipe key like 'optim.lr'")
        try:
            text = toml_value(_plain(value))
        except TypeError:
            raise ApiError(
                f"overrides[{key!r}]: {type(value).__name__} has no TOML form; use a string, "
                "number, bool, list or dict"
            ) from None
        out.append(f"{key}={text}")
    return out


def _plain(value: Any) -> Any:
    """``value`` with paths, numpy scalars and tuples turned into plain TOML-able data."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None:
        # TOML has no null; leaving the key out of the table is how a recipe says "default".
        raise TypeError("None")
    return value


def train(
    recipe: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    track: bool = True,
    max_steps: int | None = None,
    threads: int | None = None,
    quiet: bool = False,
    tracking_uri: str | None = None,
    plugins: PluginSet | None = None,
) -> TrainResult:
    """Train ``recipe`` as ``artplug run`` does and return the model and its results.

    Args:
        recipe: the recipe file (TOML).
        overrides: dotted keys to values, e.g. ``{"run.epochs": 2, "optim.lr": 0.05,
            "perturbation": {"use": "none"}}``; each becomes ``--set KEY=VALUE`` (see
            :func:`overrides_to_set`) and is validated as on the command line.
        track: log the run to MLflow (``track=False`` is ``--no-track``).
        max_steps: stop after this many optimizer steps (a smoke test; ``--max-steps``).
        threads: CPU threads torch may use (``--threads``; ``run.threads``). Process-wide, so
            it stays set after the call.
        quiet: no progress lines (stderr) and no results table (stdout); warnings still go
            to stderr.
        tracking_uri: an MLflow tracking URI instead of the recipe's.
        plugins: the plugin set to resolve techniques with; default: the installed plugins
            (:func:`artplug.plugins.load_plugins`).

    Returns:
        a :class:`TrainResult`.

    Raises:
        RecipeError: the recipe or an override is invalid (every problem listed).
        DataError, CheckpointError, PluginError, ArtplugError: as the CLI reports them.
        ApiError: a bad argument (an override TOML cannot hold, ``max_steps < 1``).
        DivergenceError: training diverged (``run.on_nonfinite = "stop"``).
        KeyboardInterrupt: the run was interrupted; its folder keeps the last checkpoint.
    """
    from artplug.plugins import load_plugins, report_warnings
    from artplug.recipe import load_recipe
    from artplug.workflows import run_recipe

    for name, value in (("max_steps", max_steps), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ApiError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if value is not None and value < 1:
            raise ApiError(f"{name} must be >= 1, got {value}")
    settings = overrides_to_set(overrides)
    if threads is not None:
        settings.append(f"run.threads={threads}")  # last, so that it wins (as --threads)
    if plugins is None:
        plugins = load_plugins()
        report_warnings(plugins)
    resolved = load_recipe(
        recipe, plugins.registries, settings, failure_hint=plugins.failure_hint()
    )
    finished: list[TrainResult] = []

    def keep(components: Any, result: Any) -> None:
        finished.append(
            TrainResult(
                model=components.model.eval(),
                metrics=dict(result.final),
                run_dir=Path(result.run_dir),
                run_id=None,
                report=dict(result.report),
                history=list(result.history),
                threat=components.eval_threat,
                recipe=components.recipe,
                test_data=components.data.test,
                training_complete=bool(result.training_complete),
                wall_time_s=float(result.wall_time_s),
            )
        )

    run_id = run_recipe(
        plugins,
        resolved,
        no_track=not track,
        quiet=quiet,
        max_steps=max_steps,
        tracking_uri=tracking_uri,
        echo=_silent if quiet else _stdout,
        on_finished=keep,
    )
    if not finished:  # run_recipe returns only after a finished run; a bug otherwise
        raise RuntimeError("the run ended without a result")
    finished[0].run_id = run_id
    return finished[0]


def _silent(message: str = "", err: bool = False) -> None:
    """An ``echo`` that prints nothing (``quiet=True``)."""


def _stdout(message: str = "", err: bool = False) -> None:
    print(message, file=sys.stderr if err else sys.stdout)


# ------------------------------------------------------------------------------------------
# evaluate


@dataclass(frozen=True)
class Evaluation(Mapping[str, float]):
    """What :func:`evaluate` gives back: a read-only mapping of attack name to accuracy.

    ``evaluation["pgd-20"]`` is the robust accuracy in [0, 1] under that attack (an example
    counts only if the model gets it right both clean and attacked); ``worst`` (present with
    two or more non-clean attacks) counts an example only if it survives every attack.
    ``str(evaluation)`` is the table the CLI prints.
    """

    accuracy: dict[str, float]
    threat: Threat
    n_examples: int

    def __getitem__(self, name: str) -> float:
        return self.accuracy[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.accuracy)

    def __len__(self) -> int:
        return len(self.accuracy)

    def __str__(self) -> str:
        from artplug.evaluate import eps_text, format_table

        title = (
            f"Accuracy ({self.threat.norm}, eps={eps_text(self.threat.eps)}; "
            f"{self.n_examples} examples)"
        )
        return format_table(self.accuracy, title=title)


def _threat(threat: ThreatLike) -> Threat:
    """``threat`` as a :class:`~artplug.kinds.Threat`; ApiError when it is not one."""
    norm: Any
    eps: Any
    if isinstance(threat, Threat):
        norm, eps = threat.norm, threat.eps
    elif isinstance(threat, Mapping):
        if set(threat) != {"norm", "eps"}:
            raise ApiError(f"threat: expected keys 'norm' and 'eps', got {sorted(threat)}")
        norm, eps = threat["norm"], threat["eps"]
    elif isinstance(threat, tuple) and len(threat) == 2:
        norm, eps = threat
    else:
        raise ApiError(
            f"threat: expected artplug.Threat('linf', 8/255), ('linf', 8/255) or "
            f"{{'norm': 'linf', 'eps': 8/255}}, got {threat!r}"
        )
    if norm not in _NORMS:
        raise ApiError(f"threat: norm {norm!r} is not one of {', '.join(_NORMS)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ApiError(f"threat: eps must be a number, got {eps!r}")
    if not (math.isfinite(float(eps)) and float(eps) >= 0):
        raise ApiError(f"threat: eps must be finite and >= 0, got {eps!r}")
    return Threat(norm, float(eps))


def _tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise ApiError(f"{name}: expected a torch tensor or a numpy array, got {type(value).__name__}")


def evaluate(
    model: nn.Module,
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    *,
    threat: ThreatLike,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    n_examples: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Evaluation:
    """Accuracy of ``model`` on ``(x, y)`` under each of ``attacks`` at ``threat``.

    ``model`` is any ``nn.Module`` that maps float32 inputs in [0, 1] (normalisation inside the
    model) to logits; ``x`` holds such inputs (N, C, H, W for the image attacks), ``y`` the
    class indices; tensors or numpy arrays. ``attacks`` name entries of artplug's attack table
    (:data:`artplug.evaluate.ATTACKS`: ``clean``, ``fgsm``, ``pgd-20``, ``pgd-50``,
    ``apgd-ce``, ``apgd-dlr``, ``square``, ``autoattack``, ...). ``n_examples`` keeps the first
    N examples, in order (as RobustBench does). ``device`` defaults to where the model's
    parameters are. The model's train/eval flags, ``requires_grad`` and ``.grad`` are restored
    afterwards; the result is reproducible for a given ``seed``.

    Raises :class:`ApiError` (also a ``ValueError``) for an unknown attack, a malformed threat
    or inputs outside [0, 1], before any attack runs.
    """
    from artplug.engine import evaluate_with_worst
    from artplug.evaluate import ATTACKS

    if not isinstance(model, nn.Module):
        raise ApiError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    names = [attacks] if isinstance(attacks, str) else list(attacks)
    if not names:
        raise ApiError(f"attacks: name at least one of {', '.join(ATTACKS)}")
    for name in names:
        if name not in ATTACKS:
            raise ApiError(
                f"attacks: unknown attack {name!r}{did_you_mean(str(name), ATTACKS)}; "
                f"known: {', '.join(ATTACKS)}"
            )
    the_threat = _threat(threat)
    xs, ys = _tensor(x, "x"), _tensor(y, "y")
    if n_examples is not None:
        if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
            raise ApiError(f"n_examples must be an integer >= 1 or None, got {n_examples!r}")
        xs, ys = xs[:n_examples], ys[:n_examples]
    if xs.dtype == torch.uint8:
        raise ApiError("x: uint8 pixels; pass x.float() / 255 (inputs must lie in [0, 1])")
    if not xs.dtype.is_floating_point:
        raise ApiError(f"x: expected floating point inputs in [0, 1], got dtype {xs.dtype}")
    try:
        accuracy = evaluate_with_worst(
            model,
            xs,
            ys,
            the_threat,
            names,
            batch_size=batch_size,
            seed=seed,
            device=torch.device(device) if device is not None else None,
        )
    except ApiError:
        raise
    except ValueError as exc:
        # The evaluation module's input checks (shapes, dtypes, range): user errors.
        raise ApiError(str(exc)) from exc
    return Evaluation(accuracy=accuracy, threat=the_threat, n_examples=len(xs))


# ------------------------------------------------------------------------------------------
# ``artplug.evaluate(...)``: the evaluation module, callable


class _CallableEvaluateModule(types.ModuleType):
    """The class given to the ``artplug.evaluate`` module, so that calling it runs :func:`evaluate`.

    ``artplug.evaluate`` has long been a module (``import artplug.evaluate as ev``,
    ``artplug.evaluate.evaluate(...)``, ``monkeypatch.setattr(artplug.evaluate, ...)``); a
    function of the same name in the package would be overwritten by the import system each
    time the submodule is imported, and would break those callers. A callable module serves
    both.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Evaluation:
        return evaluate(*args, **kwargs)


def make_evaluate_callable(module: types.ModuleType) -> None:
    """Make ``module`` (``artplug.evaluate``) callable as :func:`evaluate`; idempotent."""
    if not isinstance(module, _CallableEvaluateModule):
        module.__class__ = _CallableEvaluateModule
