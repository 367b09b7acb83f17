"""Experiment tracking: the :class:`Tracker` protocol, an MLflow implementation and a null one.

The engine talks to a :class:`Tracker` only. :class:`MlflowTracker` is the one place in core that
imports mlflow, and it does so lazily inside its methods, so importing this module (or running
``artplug validate``) costs no mlflow import.

Failure policy: a tracking backend that cannot be reached when the run starts is a user error
(:class:`~artplug.errors.ArtplugError`, one line naming the URI). Once the run has started, a
backend failure never stops training: the tracker warns once on stderr and goes quiet, since the
engine keeps everything in its local run folder anyway.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from artplug.errors import ArtplugError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch import Tensor, nn

Status = Literal["FINISHED", "FAILED", "KILLED"]

# MLflow's limits (mlflow.utils.validation), copied so that importing this module stays cheap.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# The name of the run's logged model: load it with mlflow.pytorch.load_model("runs:/<id>/model").
MODEL_NAME = "model"

# How long the start-up reachability probe of an http(s) tracking server may take. Without it a
# typo'd server address only fails after MLflow's HTTP retries with back-off (minutes).
_CONNECT_TIMEOUT_S = 5.0
_GIT_TIMEOUT_S = 5.0

# Keys MLflow accepts everywhere: its own check also allows ':' except on Windows servers, and
# any Unicode word character; plain ASCII keeps keys portable across stores and platforms.
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


class Tracker(Protocol):
    """Where a run's parameters, metrics, tags and artifacts go.

    Call order: ``start()`` once, then any logging calls, then ``end(status)``. ``run_id`` is
    ``None`` until ``start()`` succeeds (and always for a tracker that tracks nothing).
    Implementations must not raise from logging calls once started: training matters more
    than its record.
    """

    run_id: str | None

    def start(self) -> None:
        """Open the run; raise :class:`~artplug.errors.ArtplugError` if the backend is unusable."""
        ...

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log parameters (nested mappings are flattened with :func:`flatten`)."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metric values at ``step``."""
        ...

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (a tag may be overwritten, unlike a parameter)."""
        ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts, under ``artifact_path``."""
        ...

    def log_model(
        self, model: nn.Module, sample: Tensor, *, requirements: Sequence[str] = ()
    ) -> str | None:
        """Log the trained classifier as the run's model; its ``runs:/`` URI, or None if not.

        ``model`` is a CPU module in eval mode and ``sample`` a CPU float32 input batch (for the
        signature); ``requirements`` are extra pip requirements of the model's code. Never
        raises: a model that cannot be logged is reported and the run goes on.
        """
        ...

    def end(self, status: Status = "FINISHED") -> None:
        """Close the run with ``status``; calling it again does nothing."""
        ...

    def describe(self) -> str:
        """One line telling the user where the run is and how to look at it."""
        ...


class NullTracker:
    """A tracker that records nothing (tracking turned off)."""

    run_id: str | None = None

    def start(self) -> None:
        """Do nothing."""

    def log_params(self, params: Mapping[str, object]) -> None:
        """Do nothing."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Do nothing."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Do nothing."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Do nothing."""

    def log_model(
        self, model: nn.Module, sample: Tensor, *, requirements: Sequence[str] = ()
    ) -> str | None:
        """Log nothing; return None."""
        return None

    def end(self, status: Status = "FINISHED") -> None:
        """Do nothing."""

    def describe(self) -> str:
        """Say that tracking is off."""
        return "Tracking is off: nothing is sent to MLflow; results stay in the local run folder."


class MlflowTracker:
    """Tracks a run in MLflow through ``mlflow.MlflowClient``.

    The client API (not the fluent ``mlflow.start_run``) keeps no global active run, so two
    trackers never interfere and nothing leaks into user code that also uses mlflow.

    ``tracking_uri=None`` means MLflow's own default, which honours ``MLFLOW_TRACKING_URI``
    (MLflow 3: ``sqlite:///mlflow.db`` in the working directory, so ``mlflow ui`` started in
    that folder shows the runs). ``artifact_location`` is used only when the experiment is
    created here; MLflow's default is ``./mlruns/<experiment id>`` next to a local store.
    ``parent_run_id`` makes the new run a nested child of that run (MLflow's
    ``mlflow.parentRunId`` tag: the UI shows it under its parent, as ``artplug sweep`` does);
    ``tags`` are set when the run is created (not on a resumed run).
    """

    def __init__(
        self,
        experiment: str,
        run_name: str,
        tracking_uri: str | None = None,
        *,
        artifact_location: str | None = None,
        resume_run_id: str | None = None,
        keep_status: bool = False,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.initial_tags = dict(tags or {})
        self.resume_run_id = resume_run_id
        # With keep_status (evaluating a finished run later), the run's status is left as found.
        self.keep_status = keep_status
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: MlflowClient | None = None
        self._ended = False
        self._broken: str | None = None  # why tracking stopped, once a backend call failed

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Create the experiment if missing and open a run named ``run_name`` in it.

        With ``resume_run_id``, reopen that run instead (status back to RUNNING).

        Raises :class:`~artplug.errors.ArtplugError` (one line, naming the URI and the fix) if
        the store cannot be opened or reached. Calling it again once started does nothing.
        """
        if self.run_id is not None:
            return
        import mlflow

        _quiet_store_setup_logs()
        uri = self.tracking_uri or mlflow.get_tracking_uri()
        try:
            _probe_http(uri)
            client = mlflow.MlflowClient(tracking_uri=uri)
            if self.resume_run_id is not None:
                # Continue the interrupted run: same id, so its metrics continue one curve.
                run = client.get_run(self.resume_run_id)
                experiment_id = run.info.experiment_id
                if not self.keep_status:
                    client.update_run(run.info.run_id, status="RUNNING")
            else:
                experiment_id = self._experiment_id(client)
                user = _user()
                tags = {"mlflow.user": user} if user else {}
                tags.update(self.initial_tags)
                if self.parent_run_id is not None:
                    tags["mlflow.parentRunId"] = self.parent_run_id
                run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        except ArtplugError:
            raise
        except Exception as exc:
            # Any failure here means "this store is unusable"; the exception classes vary with
            # the backend (sqlalchemy, requests, boto, MlflowException, ...).
            # A long limit: MLflow's own advice often comes last (e.g. for file stores).
            cause = _short(exc, 800).rstrip(".")
            raise ArtplugError(
                f"cannot start MLflow tracking at '{uri}': {cause}. Fix the tracking URI (the "
                "recipe's [tracking] table or MLFLOW_TRACKING_URI), start the tracking server, "
                'or turn tracking off (--no-track, or backend = "none" in [tracking])'
            ) from exc
        self.tracking_uri = uri
        self.experiment_id = experiment_id
        self._client = client
        self.run_id = run.info.run_id

    def _experiment_id(self, client: MlflowClient) -> str:
        """The id of the experiment, created if missing; an error if it is deleted."""
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return str(
                    client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location
                    )
                )
            except MlflowException:
                # Another process may have created it in the meantime.
                found = client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise ArtplugError(
                f"MLflow experiment '{self.experiment}' at '{client.tracking_uri}' is deleted; "
                f"restore it (mlflow experiments restore --experiment-id {found.experiment_id}) "
                "or choose another experiment name"
            )
        return str(found.experiment_id)

    def end(self, status: Status = "FINISHED") -> None:
        """Mark the run terminated with ``status``; idempotent, and a no-op before ``start``."""
        if self.run_id is None or self._ended:
            return
        self._ended = True
        if self.keep_status:
            return
        self._call("end the run", "set_terminated", status)

    def describe(self) -> str:
        """Where the run is and how to open it, on one line."""
        uri = self.tracking_uri or "MLflow's default tracking URI"
        if self.run_id is None:
            return f"MLflow experiment '{self.experiment}' at {uri} (run not started)"
        where = f"MLflow run {self.run_id} in experiment '{self.experiment}' at {uri}"
        if self._broken is not None:
            return f"{where} (tracking stopped early: {self._broken})"
        if uri.startswith(("http://", "https://")):
            link = f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
            return f"{where}; open: {link}"
        return f"{where}; open with: mlflow ui --backend-store-uri {uri}"

    # -- logging ---------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log parameters, flattened, as strings truncated to MLflow's 6000-character limit.

        Long or structured values belong in artifacts (the resolved recipe is logged whole);
        a truncated value ends with ``...``. Keys are sanitized (:func:`sanitize_key`).
        """
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        for key, value in flatten(params).items():
            flat[sanitize_key(key)] = _truncate(value, MAX_PARAM_VALUE_LENGTH)
        entities = [Param(key, value) for key, value in flat.items()]
        for chunk in _chunks(entities, MAX_PARAMS_TAGS_PER_BATCH):
            self._call("log params", "log_batch", params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metric values at ``step`` (one timestamp for the whole call)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        flat = {sanitize_key(key): float(value) for key, value in metrics.items()}
        entities = [Metric(key, value, timestamp, int(step)) for key, value in flat.items()]
        for chunk in _chunks(entities, MAX_METRICS_PER_BATCH):
            self._call("log metrics", "log_batch", metrics=chunk)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags (values truncated to MLflow's 8000-character limit)."""
        from mlflow.entities import RunTag

        flat = {
            sanitize_key(key): _truncate(str(value), MAX_TAG_VALUE_LENGTH)
            for key, value in tags.items()
        }
        entities = [RunTag(key, value) for key, value in flat.items()]
        for chunk in _chunks(entities, MAX_PARAMS_TAGS_PER_BATCH):
            self._call("set tags", "log_batch", tags=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy the file or folder ``path`` into the run's artifacts under ``artifact_path``.

        A missing local path is reported on stderr and skipped (it does not stop tracking).
        """
        local = Path(path)
        if not local.exists():
            print(f"artplug: MLflow artifact not logged, no such file: {local}", file=sys.stderr)
            return
        if local.is_dir():
            self._call("log artifacts", "log_artifacts", str(local), artifact_path)
        else:
            self._call("log an artifact", "log_artifact", str(local), artifact_path)

    def log_model(
        self, model: nn.Module, sample: Tensor, *, requirements: Sequence[str] = ()
    ) -> str | None:
        """Log ``model`` with MLflow's PyTorch flavour as the run's model :data:`MODEL_NAME`.

        The module is pickled (cloudpickle, ``serialization_format="pickle"``), so loading it
        needs the classes of its modules importable (artplug and the plugins that built it);
        the signature is inferred from ``sample`` (a float32 NCHW batch) and the model's output
        on it. Returns ``runs:/<run id>/model``, or None when tracking has stopped or logging
        failed; a failure is reported on stderr and the run goes on (its ``checkpoints/``
        artifacts still hold the weights).
        """
        if self._client is None or self.run_id is None:
            raise RuntimeError("MlflowTracker: call start() before logging")
        if self._broken is not None:
            return None
        try:
            self._log_pytorch_model(model, sample, requirements)
        except Exception as exc:
            # Deliberately broad: an unpicklable module, an old MLflow, a store that refuses the
            # files... the record of the run matters more than its model artifact.
            print(
                f"artplug: warning: the trained model was not logged to MLflow ({_short(exc)}); "
                "the run's checkpoints/ artifacts still hold its weights",
                file=sys.stderr,
            )
            return None
        return f"runs:/{self.run_id}/{MODEL_NAME}"

    def _log_pytorch_model(
        self, model: nn.Module, sample: Tensor, requirements: Sequence[str]
    ) -> None:
        import logging

        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        assert self._client is not None and self.tracking_uri is not None
        if not hasattr(self._client, "create_logged_model"):
            raise ArtplugError(f"logging the model needs MLflow 3 (found {mlflow.__version__})")
        with torch.no_grad():
            outputs = model(sample)
        signature = infer_signature(sample.numpy(), outputs.numpy())
        # The fluent log_model would file the model under the default experiment when no run is
        # active (this tracker never activates one); creating the LoggedModel here, in the run's
        # experiment and linked to the run, keeps "runs:/<id>/model" resolvable.
        logged = self._client.create_logged_model(
            str(self.experiment_id), name=MODEL_NAME, source_run_id=self.run_id
        )
        # log_model resolves its client from the global tracking URI: point it at this store for
        # the call only. Its warning about pickled models is what docs/tracking.md explains.
        pytorch_logger = logging.getLogger("mlflow.pytorch")
        level = pytorch_logger.level
        pytorch_logger.setLevel(logging.ERROR)
        try:
            with _global_tracking_uri(self.tracking_uri):
                mlflow.pytorch.log_model(
                    model,
                    name=MODEL_NAME,
                    signature=signature,
                    run_id=self.run_id,
                    model_id=logged.model_id,
                    serialization_format="pickle",
                    # Explicit requirements: inferring them loads the model in a subprocess.
                    pip_requirements=[
                        *mlflow.pytorch.get_default_pip_requirements(),
                        *requirements,
                    ],
                )
        finally:
            pytorch_logger.setLevel(level)

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> None:
        """Call ``client.<method>(run_id, *args, **kwargs)`` without ever raising.

        A value the store rejects (e.g. a parameter logged twice with different values) is
        reported and skipped; any other failure means the backend is gone or broken: warn once
        and stop tracking.
        """
        if self._client is None or self.run_id is None:
            raise RuntimeError("MlflowTracker: call start() before logging")
        if self._broken is not None:
            return
        try:
            getattr(self._client, method)(self.run_id, *args, **kwargs)
        except Exception as exc:
            # Deliberately broad: whatever the backend raises (connection errors, a locked
            # database, a full disk, ...), training must go on.
            if getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
                print(f"artplug: warning: MLflow rejected a value ({_short(exc)})", file=sys.stderr)
                return
            self._broken = f"failed to {what}: {_short(exc)}"
            print(
                f"artplug: warning: MLflow tracking stopped ({self._broken}); training goes on "
                "and the local run folder keeps everything",
                file=sys.stderr,
            )


# -- helpers -------------------------------------------------------------------------------

T = TypeVar("T")


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _short(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or "(no message)"
    text = f"{type(exc).__name__}: {text}"
    return _truncate(text, limit)


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers (no passwd entry, no env vars)
        return None


def _probe_http(uri: str) -> None:
    """Fail fast if an http(s) tracking server does not accept connections."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    import urllib.request

    # Behind a proxy a direct connection may fail although MLflow (through the proxy) works.
    proxies = urllib.request.getproxies()
    if parts.scheme in proxies and not urllib.request.proxy_bypass(parts.hostname):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ArtplugError(
            f"cannot reach the MLflow tracking server at '{uri}' ({_short(exc)}). Start the "
            "server (mlflow server ...), fix the tracking URI (the recipe's [tracking] table or "
            "MLFLOW_TRACKING_URI), or turn tracking off (--no-track)"
        ) from exc


def sanitize_key(key: str) -> str:
    """``key`` made acceptable to MLflow as a param, metric or tag name.

    Characters outside ``A-Za-z0-9 _ - . / space`` become ``_``; empty, ``.`` and ``..`` path
    segments (which MLflow rejects) are dropped or replaced; the result has at most 250
    characters.
    """
    cleaned = _KEY_BAD_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]
    segments = []
    # MLflow also rejects keys that change under posixpath.normpath (they could escape the
    # run's folder in a file store): empty, "." and ".." segments.
    for segment in cleaned.split("/"):
        if segment in ("", "."):
            continue  # "a//b", "a/./b", a leading or trailing "/"
        segments.append("_" if segment == ".." else segment)
    return "/".join(segments) or "_"


def _scalar(value: object) -> str:
    """A scalar as a parameter string: ``true``/``false`` for bools (as in TOML), ``None``."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf": json.dumps would write "NaN"/"Infinity"
    return str(value)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into dotted keys with string values, for MLflow params.

    Nested mappings become dotted keys (``optim.lr``); a list holding tables is indexed
    (``loss.0.beta``; its scalar items become ``loss.<i>``); a list of scalars is one value in
    JSON (``[0.1, 0.2]``); ``None`` becomes ``"None"`` and bools ``"true"``/``"false"``; an empty
    table or list is kept as ``{}``/``[]`` so the key still shows up.
    """
    out: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if value:
                out.update(flatten(value, name))
            else:
                out[name] = "{}"
        elif isinstance(value, list | tuple):
            if any(isinstance(item, Mapping) for item in value):
                for index, item in enumerate(value):
                    if isinstance(item, Mapping):
                        out.update(flatten(item, f"{name}.{index}"))
                    else:
                        out[f"{name}.{index}"] = _scalar(item)
            else:
                out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = _scalar(value)
    return out


def _git(*args: str) -> str | None:
    """Output of ``git <args>`` in the working directory, or None if git is unavailable."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=os.getcwd(),
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None  # git missing, not a repository, or hung (e.g. a network file system)
    return done.stdout


def provenance_tags(*, device: str, plugins: Mapping[str, str]) -> dict[str, str]:
    """Tags that say what produced a run.

    ``plugins`` maps each plugin distribution name to its version. The result holds
    ``artplug.version``, ``artplug.plugin.<name>``, ``torch.version``, ``torch.cuda`` (the CUDA
    version torch was built with, or ``none``), ``device`` (``cpu``, or the GPU's name for a
    CUDA device), and, inside a git work tree, ``git.commit``, ``git.dirty`` and MLflow's own
    ``mlflow.source.git.commit``.
    """
    import torch

    from artplug import __version__

    tags = {"artplug.version": __version__}
    for name, version in sorted(plugins.items()):
        tags[f"artplug.plugin.{name}"] = version
    tags["torch.version"] = str(torch.__version__)
    tags["torch.cuda"] = torch.version.cuda or "none"
    tags["device"] = device
    if device.startswith("cuda") and torch.cuda.is_available():
        tags["device"] = torch.cuda.get_device_name(torch.device(device))
    commit = _git("rev-parse", "HEAD")
    if commit is not None and commit.strip():
        tags["git.commit"] = commit.strip()
        tags["mlflow.source.git.commit"] = commit.strip()
        # Untracked files are ignored: the run itself creates some (mlflow.db, run folders) in
        # the working directory, and they say nothing about the code that ran.
        status = _git("status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["git.dirty"] = "true" if status.strip() else "false"
    return tags


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global (fluent) tracking URI at ``uri`` inside the block, then restore it.

    Both places MLflow keeps it are restored exactly: its module-level URI and the
    ``MLFLOW_TRACKING_URI`` variable, which ``mlflow.set_tracking_uri`` also writes (MLflow's
    own ``_use_tracking_uri`` would unset a variable the user had set).
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri = utils._tracking_uri
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_uri
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _quiet_store_setup_logs() -> None:
    # A new sqlite store prints INFO lines while creating its tables; they would break the
    # one-line error convention and add noise to every first run.
    import logging

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def download_checkpoints(run_id: str, dest: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Download the ``checkpoints/`` artifacts of MLflow run ``run_id`` into ``dest``.

    Returns the local folder. Raises :class:`~artplug.errors.ArtplugError` (one line) when the
    run or its checkpoints cannot be found.
    """
    import mlflow

    _quiet_store_setup_logs()
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except Exception as exc:
        raise ArtplugError(
            f"{run_id}: no such MLflow run at '{uri}' ({_short(exc, 200)}); pass a checkpoint "
            "file or run folder, or set MLFLOW_TRACKING_URI / --tracking-uri"
        ) from None
    try:
        folder = client.download_artifacts(run_id, "checkpoints", str(dest))
    except Exception as exc:
        raise ArtplugError(
            f"{run_id}: the run has no checkpoints/ artifact ({_short(exc, 200)})"
        ) from None
    return Path(folder)
