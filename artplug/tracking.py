"""Experiment tracking: the :class:`Tracker` protocol, an MLflow implementation and a null one.

The engine talks to a :class:`Tracker` only. :class:`MlflowTracker` is the one place in core that
imports mlflow, and it does so lazily inside its methods, so importing this module (or running
``artplug validate``) costs no mlflow import.

Failure policy: a tracking backend that cannot be reached when the run starts is a user error
(:class:`~artplug.errors.ArtplugError`, one line naming the URI). Once the run has started, a
backend failure never stops or stalls training: every call runs with short HTTP timeouts and no
retries, and the first failure opens a circuit breaker (one warning line on stderr; no call is
tried for :data:`OFFLINE_RETRY_S` seconds). Nothing is lost meanwhile: the engine writes every
metric to the run folder's ``metrics.jsonl`` and the tracker journals its params, tags,
artifacts and final status in ``tracking.jsonl`` next to it (:meth:`MlflowTracker.attach_run_dir`).
:func:`sync_run` (``artplug sync RUN_DIR``) later sends whatever the store lacks; the tracker
tries it by itself when the run ends.

Concurrency: the first use of a local SQLite store (table creation, experiment lookup-or-create)
happens under an exclusive file lock, ``<db>.lock``, so that runs started together never race.
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
from dataclasses import dataclass, field
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

# The run folder's tracking journal: one JSON object per line (params, tags, artifacts, status).
JOURNAL_NAME = "tracking.jsonl"
# The run folder's metric record, written by the engine (one JSON object per line with its step).
METRICS_NAME = "metrics.jsonl"

# MLflow's HTTP client settings while a run trains. MLflow's defaults (7 retries, exponential
# back-off, 120 s timeout) turn a dead server into minutes of stalled training per call; a call
# that fails now is harmless instead, since the run folder keeps the record for `artplug sync`.
# A variable the user set in the environment wins.
_RUN_HTTP = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
}
# While syncing nothing trains, so a slow server may take its time (but a dead one fails fast).
_SYNC_HTTP = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
# How long the tracker leaves an unreachable store alone before it tries one call again.
OFFLINE_RETRY_S = 120.0

# The experiment tag MLflow 3's UI reads to decide what an experiment is (its React source:
# ExperimentKind). Without it MLflow 3.0-3.x guesses, and may open an artplug experiment on an
# empty GenAI "overview" page; "custom_model_development" opens it on its runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI ignores that tag: a global GenAI / "Model training" switch (top left, kept
# in the browser, GenAI at first) decides, and a `workflowType` query parameter in the link
# sets it. Every link artplug prints carries it.
UI_QUERY = "workflowType=machine_learning"
_MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"
# A saved view of the runs table, stored in the experiment as MLflow's UI stores a shared view
# (tag "mlflow.sharedViewState.<key>", opened by "?viewStateShareKey=<key>"): the test
# accuracies, techniques, dataset, threat and description as columns. Without it the table
# shows only run names and dates, and each user must pick the columns by hand.
VIEW_KEY = "artplug"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# The run description MLflow's UI shows on the run page and in the runs table (Markdown).
NOTE_TAG = "mlflow.note.content"
# One tag with every loaded plugin's version ("name==version, ..."), not one tag per plugin.
PLUGINS_TAG = "artplug.plugins"

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

    def attach_run_dir(self, run_dir: str | Path) -> None:
        """Do nothing (the engine's run folder is the whole record)."""

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

    With :meth:`attach_run_dir` the tracker keeps a journal in the run folder, so that a
    tracking outage loses nothing (see the module docstring and :func:`sync_run`).
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
        self.run_dir: Path | None = None
        # The circuit breaker: the first failure of an outage (None while the store answers),
        # and the monotonic time before which no call is tried.
        self._outage: str | None = None
        self._retry_at = 0.0
        self._journal_failed = False
        self._journal_pending: list[dict[str, Any]] = []  # held until the run has started

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
            if self.resume_run_id is not None:
                _require_store(uri, str(self.resume_run_id))
            # Under the store lock: a new SQLite store creates its tables (and MLflow's default
            # experiment) on first open, which two processes must not do at the same time.
            with _store_lock(uri):
                client = mlflow.MlflowClient(tracking_uri=uri)
                experiment_id = (
                    None if self.resume_run_id is not None else self._experiment_id(client)
                )
            if self.resume_run_id is not None:
                # Continue the interrupted run: same id, so its metrics continue one curve.
                run = client.get_run(self.resume_run_id)
                experiment_id = run.info.experiment_id
                if not self.keep_status:
                    client.update_run(run.info.run_id, status="RUNNING")
            else:
                assert experiment_id is not None
                run = client.create_run(
                    experiment_id, run_name=self.run_name, tags=self._creation_tags()
                )
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
        self.experiment_id = str(run.info.experiment_id)
        self._client = client
        self.run_id = run.info.run_id
        self._journal(
            {
                "event": "start",
                "run_id": self.run_id,
                "tracking_uri": _absolute_uri(uri),
                "experiment_id": self.experiment_id,
            }
        )

    def _creation_tags(self) -> dict[str, str]:
        user = _user()
        tags = {"mlflow.user": user} if user else {}
        tags.update(self.initial_tags)
        if self.parent_run_id is not None:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags

    def _experiment_id(self, client: MlflowClient) -> str:
        """The id of the experiment, created if missing; an error if it is deleted."""
        return _experiment_id(client, self.experiment, self.artifact_location)

    def attach_run_dir(self, run_dir: str | Path) -> None:
        """Keep a journal of this run in ``run_dir/tracking.jsonl`` (:data:`JOURNAL_NAME`).

        Call it once the run folder exists, before or after :meth:`start`. From then on every
        parameter, tag, artifact path and the final status is written there before it is sent,
        so that ``artplug sync RUN_DIR`` (:func:`sync_run`) can send whatever the tracking
        store missed; the metrics come from the engine's ``metrics.jsonl`` in the same folder.
        A resumed run appends to the journal it finds. Nothing is written before the run has
        started: a run whose tracking never started has nothing to sync.
        """
        self.run_dir = Path(run_dir)
        self._journal(
            {
                "event": "attach",
                "experiment": self.experiment,
                "run_name": self.run_name,
                "tracking_uri": _absolute_uri(self.tracking_uri) if self.tracking_uri else None,
                "artifact_location": self.artifact_location,
                "parent_run_id": self.parent_run_id,
                "tags": self._creation_tags(),
                "resume_run_id": self.resume_run_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "cwd": os.getcwd(),
            }
        )
        if self.run_id is not None:
            self._journal(
                {
                    "event": "start",
                    "run_id": self.run_id,
                    "tracking_uri": _absolute_uri(self.tracking_uri or ""),
                    "experiment_id": self.experiment_id,
                }
            )

    def _journal(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with the time) to the run folder's journal, if one is attached."""
        if self.run_dir is None or self._journal_failed:
            return
        self._journal_pending.append({"time_ms": _now_ms(), **record})
        if self.run_id is None:
            return
        lines = "".join(json.dumps(r, default=str) + "\n" for r in self._journal_pending)
        self._journal_pending.clear()
        try:
            # Opened per record: records are few (no metrics), and a crash loses no buffer.
            with (self.run_dir / JOURNAL_NAME).open("a", encoding="utf-8") as journal:
                journal.write(lines)
        except OSError as exc:
            self._journal_failed = True
            print(
                f"artplug: warning: cannot write the tracking journal ({_short(exc)}); "
                "`artplug sync` will not know about this run's params, tags and artifacts",
                file=sys.stderr,
            )

    def end(self, status: Status = "FINISHED") -> None:
        """Mark the run terminated with ``status``; idempotent, and a no-op before ``start``.

        After an outage, with a run folder attached, it first tries to send everything the
        store missed (:func:`sync_run`, which also sets the status); if the store is still
        down, :meth:`describe` says how to send it later.
        """
        if self._ended:
            return
        self._ended = True
        self._journal({"event": "end", "status": status})
        if self.run_id is None or self.keep_status:
            return
        if self._outage is not None and self.run_dir is not None:
            try:
                with _http_settings(_RUN_HTTP):
                    result = sync_run(self.run_dir, tracking_uri=self.tracking_uri)
            except Exception:
                # Deliberately broad: the store is still down or broken; the journal keeps all.
                return
            self._outage = None
            print(
                f"artplug: MLflow tracking is back online; sent what it missed: {result.counts()}",
                file=sys.stderr,
            )
            return
        self._retry_at = 0.0  # the status is worth one more try, even during an outage
        self._call("end the run", "set_terminated", status)

    def describe(self) -> str:
        """Where the run is and how to open it, on one line."""
        uri = self.tracking_uri or "MLflow's default tracking URI"
        if self.run_id is None:
            return f"MLflow experiment '{self.experiment}' at {uri} (run not started)"
        where = f"MLflow run {self.run_id} in experiment '{self.experiment}' at {uri}"
        if self._outage is not None:
            later = (
                f"; send what it missed with: artplug sync {self.run_dir}"
                if self.run_dir is not None
                else ""
            )
            return f"{where} (tracking stopped early, MLflow offline: {self._outage}{later})"
        if uri.startswith(("http://", "https://")):
            run_link, table = ui_links(uri, str(self.experiment_id), self.run_id)
            return f"{where}; open: {run_link} (all runs: {table})"
        # `mlflow ui` serves on 127.0.0.1:5000 unless told otherwise.
        _, table = ui_links(_MLFLOW_UI_DEFAULT, str(self.experiment_id))
        return f"{where}; open with: mlflow ui --backend-store-uri {uri}, then {table}"

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
        self._journal({"event": "params", "params": flat})
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
        self._journal({"event": "tags", "tags": flat})
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
        self._journal(
            {"event": "artifact", "path": self._journal_path(local), "artifact_path": artifact_path}
        )
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
        if self._offline():
            self._journal({"event": "model", "logged": False, "reason": "tracking offline"})
            return None
        try:
            with _http_settings(_RUN_HTTP):
                self._log_pytorch_model(model, sample, requirements)
        except Exception as exc:
            # Deliberately broad: an unpicklable module, an old MLflow, a store that refuses the
            # files... the record of the run matters more than its model artifact.
            print(
                f"artplug: warning: the trained model was not logged to MLflow ({_short(exc)}); "
                "the run's checkpoints/ artifacts still hold its weights",
                file=sys.stderr,
            )
            self._journal({"event": "model", "logged": False, "reason": _short(exc)})
            return None
        uri = f"runs:/{self.run_id}/{MODEL_NAME}"
        self._journal({"event": "model", "logged": True, "uri": uri})
        return uri

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

    def _journal_path(self, local: Path) -> str:
        """``local`` relative to the run folder when inside it (folders move), else absolute."""
        resolved = local.resolve()
        if self.run_dir is not None:
            with contextlib.suppress(ValueError):
                return resolved.relative_to(self.run_dir.resolve()).as_posix()
        return str(resolved)

    def _offline(self) -> bool:
        """Whether the circuit breaker is open: the store failed less than a while ago."""
        return self._outage is not None and time.monotonic() < self._retry_at

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> bool:
        """Call ``client.<method>(run_id, *args, **kwargs)`` without ever raising; True if sent.

        A value the store rejects (e.g. a parameter logged twice with different values) is
        reported and skipped. Any other failure means the store is down or broken: warn once,
        and skip every call for :data:`OFFLINE_RETRY_S` seconds (then try one again), so that
        an outage costs the training loop one short timeout per window, not one per call.
        """
        if self._client is None or self.run_id is None:
            raise RuntimeError("MlflowTracker: call start() before logging")
        if self._offline():
            return False
        try:
            with _http_settings(_RUN_HTTP):
                getattr(self._client, method)(self.run_id, *args, **kwargs)
        except Exception as exc:
            # Deliberately broad: whatever the backend raises (connection errors, a locked
            # database, a full disk, ...), training must go on.
            if getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
                print(f"artplug: warning: MLflow rejected a value ({_short(exc)})", file=sys.stderr)
                return False
            self._retry_at = time.monotonic() + OFFLINE_RETRY_S
            if self._outage is None:
                self._outage = f"failed to {what}: {_short(exc, 200)}"
                self._journal({"event": "offline", "reason": self._outage})
                later = (
                    f"; send them later with: artplug sync {self.run_dir}"
                    if self.run_dir is not None
                    else ""
                )
                print(
                    f"artplug: warning: MLflow tracking stopped, the store is offline "
                    f"({self._outage}); training goes on and the run folder keeps every "
                    f"record{later}",
                    file=sys.stderr,
                )
            return False
        return True


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


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _http_settings(values: Mapping[str, str]) -> Iterator[None]:
    """Set MLflow's HTTP client variables to ``values`` inside the block, then restore them.

    MLflow reads them on every request, so this scopes them to the calls in the block; a
    variable the user already set keeps the user's value.
    """
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), or None."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def _absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite file made absolute (it depends on the working directory)."""
    path = _sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else None
    absolute = f"sqlite:///{path.resolve()}"
    return f"{absolute}?{query}" if query else absolute


def _require_store(uri: str, what: str) -> None:
    """Fail (one line) instead of opening a SQLite store that does not exist: opening creates it."""
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ArtplugError(
            f"{what}: no such MLflow run at tracking URI '{uri}' (there is no tracking database "
            f"{path}); pass a checkpoint file or run folder, or point MLFLOW_TRACKING_URI / "
            "--tracking-uri at the store that holds the run"
        )


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<db>.lock`` next to a SQLite store; nothing for other stores.

    MLflow creates a new SQLite store's tables on first open and two processes doing that at
    once fail with "table ... already exists", losing one run; the lock serialises the first
    open and the experiment lookup-or-create. (No lock where ``fcntl`` does not exist.)
    """
    path = _sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None or not path.absolute().parent.is_dir():
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if missing; an error if it is deleted."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return str(
                client.create_experiment(
                    name, artifact_location=artifact_location, tags=experiment_tags()
                )
            )
        except MlflowException:
            # Another process created it in the meantime (a server store, where the file lock
            # of a local store does not reach): "already exists", so look it up again.
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise ArtplugError(
            f"MLflow experiment '{name}' at '{client.tracking_uri}' is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or choose "
            "another experiment name"
        )
    for key, value in experiment_tags().items():
        if key not in (found.tags or {}):
            # An experiment made before artplug tagged them (or by other code): tag it once. A
            # kind or view someone chose is left alone; a store that refuses still takes the run.
            with contextlib.suppress(MlflowException):
                client.set_experiment_tag(found.experiment_id, key, value)
    return str(found.experiment_id)


def experiment_tags() -> dict[str, str]:
    """The tags artplug gives an experiment: its kind and the runs-table view (see VIEW_TAG)."""
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, VIEW_TAG: json.dumps(runs_view_state())}


def runs_view_state() -> dict[str, Any]:
    """The runs-table view artplug stores in each experiment, as MLflow's UI reads it.

    Columns: ``test/clean_acc`` and ``test/worst_acc`` (the headline numbers), the tag
    ``artplug.sanity`` (the gate's verdict travels with them), the tag ``artplug.techniques``
    and the description first; then every other ``test/<attack>_acc`` of the attack table
    (the UI drops those no run has) and the parameters ``data.dataset``, ``model.arch``,
    ``threat.norm``, ``threat.eps`` and ``run.epochs``. Newest runs first.
    """
    from artplug.evaluate import ATTACKS

    attacks = ["clean", "worst", *(name for name in ATTACKS if name != "clean")]
    metrics = [f"metrics.`test/{name}_acc`" for name in attacks]
    tags = [f"tags.`{name}`" for name in ("artplug.techniques", "artplug.sanity")]
    params = [
        f"params.`{name}`"
        for name in ("data.dataset", "model.arch", "threat.norm", "threat.eps", "run.epochs")
    ]
    description = "attributes.`Description`"
    # The headline first, so that a narrow window shows it without scrolling: clean and worst
    # accuracy with the sanity gate's verdict beside them (a failed gate means the worst case
    # may be overstated), the techniques, the description; then the other attacks and params.
    columns = [*metrics[:2], tags[1], tags[0], description, *metrics[2:], *params]
    widths = {column: 110 for column in metrics} | {description: 420, tags[0]: 170, tags[1]: 130}
    return {
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": widths,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }


def ui_links(base: str, experiment_id: str, run_id: str | None = None) -> tuple[str, str]:
    """Links into MLflow's UI at ``base``: (the run's page, the experiment's runs table).

    Both open in MLflow's "Model training" mode (:data:`UI_QUERY`); the table opens with
    artplug's columns (:data:`VIEW_KEY`). Without ``run_id`` the first is the table too.
    """
    root = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    table = f"{root}/runs?viewStateShareKey={VIEW_KEY}&{UI_QUERY}"
    return (f"{root}/runs/{run_id}?{UI_QUERY}" if run_id else table), table


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
    ``artplug.version``, ``artplug.plugins`` (every plugin as ``name==version``, sorted, comma
    separated: one tag however many plugins are installed), ``torch.version``, ``torch.cuda``
    (the CUDA version torch was built with, or ``none``), ``device`` (``cpu``, or the GPU's
    name for a CUDA device), and, inside a git work tree, ``git.commit``, ``git.dirty`` and
    MLflow's own ``mlflow.source.git.commit``.
    """
    import torch

    from artplug import __version__

    tags = {"artplug.version": __version__, PLUGINS_TAG: plugins_text(plugins)}
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


def plugins_text(plugins: Mapping[str, str]) -> str:
    """``{"b": "2", "a": "1"}`` as ``a==1, b==2``: the value of the ``artplug.plugins`` tag."""
    return ", ".join(f"{name}=={version}" for name, version in sorted(plugins.items())) or "none"


def creation_note(tracker: object) -> str | None:
    """The description a tracker was given for its run at creation (``artplug rerun``), if any."""
    tags = getattr(tracker, "initial_tags", None)
    note = tags.get(NOTE_TAG) if isinstance(tags, Mapping) else None
    return str(note) if note else None


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f}%" if math.isfinite(value) else str(value)


def run_description(
    recipe: Any,
    *,
    eval_norm: str,
    eval_eps: float,
    results: Mapping[str, float] | None = None,
    n_examples: int | None = None,
    sanity: str | None = None,
    complete: bool = True,
    note: str | None = None,
) -> str:
    """The run's description (the ``mlflow.note.content`` tag): Markdown, the summary first.

    The first line says what ran: techniques, dataset and model, threat (the evaluation eps,
    and the training one when it differs) and epochs; with ``results`` (the final test
    accuracies) it goes on with them (``worst`` included) and the sanity gate's summary, so
    that the runs table and the run page show the headline numbers without opening the
    metrics. ``note`` (a description given when the run was created, e.g. by ``artplug
    rerun``) follows as a second paragraph. ``recipe`` is a
    :class:`~artplug.recipe.ResolvedRecipe`.
    """
    from artplug.evaluate import eps_text

    threat = f"{eval_norm} eps={eps_text(eval_eps)}"
    if float(recipe.threat.eps) != float(eval_eps) or recipe.threat.norm != eval_norm:
        threat += f" (trained at {recipe.threat.norm} eps={eps_text(recipe.threat.eps)})"
    epochs = int(recipe.run.epochs)
    parts = [
        recipe.summary() or "no technique",
        f"{recipe.data.dataset} ({recipe.model.arch})",
        threat,
        f"{epochs} epoch{'s' if epochs != 1 else ''}",
    ]
    line = " · ".join(parts)
    if results:
        where = f"test, {n_examples} examples" if n_examples else "test"
        accuracies = ", ".join(f"{name} {_percent(acc)}" for name, acc in results.items())
        line += f" — {where}: {accuracies}"
        if sanity:
            line += f" · sanity gate {sanity}"
        if not complete:
            line += " · training cut short (max_steps)"
    return f"{line}\n\n{note}" if note else line


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
    # Looking a run up must not create an empty store (an mlflow.db in the working directory).
    _require_store(uri, run_id)
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


# -- artplug sync ---------------------------------------------------------------------------


@dataclass
class SyncResult:
    """What :func:`sync_run` sent: counts per kind, the run, and notes for the user."""

    run_id: str
    tracking_uri: str
    created: bool = False
    metrics: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    status: str | None = None
    notes: list[str] = field(default_factory=list)

    def counts(self) -> str:
        """The counts on one line, e.g. ``12 metric values, 0 params, 3 tags, 2 artifact files``."""
        parts = [
            f"{self.metrics} metric values",
            f"{self.params} params",
            f"{self.tags} tags",
            f"{self.artifacts} artifact files",
        ]
        if self.status is not None:
            parts.append(f"status {self.status}")
        return ", ".join(parts)

    def summary(self) -> str:
        """One line for the CLI: the run, what was sent, and the notes."""
        verb = "created" if self.created else "synced"
        line = f"{verb} MLflow run {self.run_id} at {self.tracking_uri}: sent {self.counts()}"
        return "; ".join([line, *self.notes])


def read_journal(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/tracking.jsonl``, oldest first (an unreadable line is skipped).

    A line cut short (the process died while writing it) is the only expected bad line.
    """
    path = Path(run_dir) / JOURNAL_NAME
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "event" in record:
                records.append(record)
    return records


def _metric_identity(step: int, value: float) -> tuple[int, float, bool]:
    """How a metric value compares with a stored one: NaN as a flag, ±inf as MLflow stores it."""
    if math.isnan(value):
        return (step, 0.0, True)
    if math.isinf(value):
        # SQL stores cannot hold infinities; MLflow keeps the largest finite double instead.
        return (step, math.copysign(sys.float_info.max, value), False)
    return (step, value, False)


def _local_metrics(run_dir: Path) -> dict[str, dict[tuple[int, float, bool], float]]:
    """Every metric value of ``metrics.jsonl`` per (sanitized) key, as the tracker sent it."""
    path = run_dir / METRICS_NAME
    found: dict[str, dict[tuple[int, float, bool], float]] = {}
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            step = int(record.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut short by a crash
        flat: dict[str, float] = {}
        for key, value in record.items():
            with contextlib.suppress(TypeError, ValueError):
                flat[sanitize_key(key)] = float(value)  # as MlflowTracker.log_metrics does
        for key, value in flat.items():
            found.setdefault(key, {})[_metric_identity(step, value)] = value
    return found


def _process_alive(record: Mapping[str, Any]) -> bool:
    """Whether the process of an ``attach`` record still runs (only knowable on its host)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    pid = int(record["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _artifact_files(local: Path, artifact_path: str | None) -> list[tuple[Path, str]]:
    """``(file, artifact folder)`` pairs that ``log_artifact(local, artifact_path)`` uploads."""
    base = artifact_path.strip("/") if artifact_path else ""
    if local.is_file():
        return [(local, base)]
    pairs = []
    for file in sorted(local.rglob("*")):
        if file.is_file():
            parent = file.parent.relative_to(local).as_posix()
            folder = "/".join(part for part in (base, parent) if part and part != ".")
            pairs.append((file, folder))
    return pairs


def sync_run(run_dir: str | Path, *, tracking_uri: str | None = None) -> SyncResult:
    """Send whatever the tracking store lacks of the run recorded in ``run_dir``.

    ``run_dir`` is a run folder with a tracking journal (``tracking.jsonl``, written by an
    :class:`MlflowTracker` with :meth:`~MlflowTracker.attach_run_dir`) and the engine's
    ``metrics.jsonl``. The run goes to ``tracking_uri``, by default the one the run used.
    Compared with what the store holds, this sends: metric values missing at their (key, step)
    (so syncing twice sends nothing twice), params the run lacks, tags whose value differs,
    artifact files missing or of another size; then the final status from the journal
    (FINISHED, FAILED or KILLED). A run whose process is gone without an end record becomes
    FAILED. When the store has no run for the folder yet (the run started elsewhere, or the
    store was replaced), the run is created and the journal remembers its id.

    Raises :class:`~artplug.errors.ArtplugError` (one line) when the folder has no journal,
    the run is still in progress, or the store cannot be reached.
    """
    import mlflow

    folder = Path(run_dir)
    if not (folder / JOURNAL_NAME).is_file():
        raise ArtplugError(
            f"{folder}: no tracking journal ({JOURNAL_NAME}) in this folder; give the run "
            "folder of an `artplug run` that was tracked with MLflow"
        )
    records = read_journal(folder)
    attaches = [r for r in records if r["event"] == "attach"]
    if not attaches:
        raise ArtplugError(f"{folder / JOURNAL_NAME}: the journal does not name its run")
    attach = attaches[-1]
    after_attach = records[records.index(attach) :]
    ends = [r for r in after_attach if r["event"] == "end"]
    if not ends and _process_alive(attach):
        raise ArtplugError(
            f"{folder}: the run is still in progress (process {attach['pid']}); sync it once "
            "it has ended"
        )
    # The store the run was tracked in; and every (store, run id) pair the journal knows,
    # including runs that an earlier sync created in another store.
    starts = [r for r in records if r["event"] == "start" and r.get("tracking_uri")]
    runs = [r for r in records if r["event"] in ("start", "sync") and r.get("run_id")]

    _quiet_store_setup_logs()
    if tracking_uri is not None:
        uri = _absolute_uri(tracking_uri)
    elif starts:
        uri = str(starts[-1]["tracking_uri"])
    else:
        uri = str(attach.get("tracking_uri") or _absolute_uri(mlflow.get_tracking_uri()))
    known = [r["run_id"] for r in runs if r.get("tracking_uri") == uri]
    run_id: str | None = str(known[-1]) if known else None

    result = SyncResult(run_id="", tracking_uri=uri)
    with _http_settings(_SYNC_HTTP):
        _probe_http(uri)
        try:
            with _store_lock(uri):
                client = mlflow.MlflowClient(tracking_uri=uri)
                run = None
                if run_id is not None:
                    try:
                        run = client.get_run(run_id)
                    except Exception as exc:
                        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                            raise
                        result.notes.append(f"run {run_id} is not in this store: created anew")
                if run is None:
                    experiment_id = _experiment_id(
                        client, str(attach["experiment"]), attach.get("artifact_location")
                    )
                    run = client.create_run(
                        experiment_id,
                        start_time=int(attaches[0]["time_ms"]),
                        tags=dict(attach.get("tags") or {}),
                        run_name=str(attach.get("run_name") or folder.name),
                    )
                    result.created = True
                    # Remembered at once: a sync that fails later must not create a second run.
                    _append_journal(
                        folder,
                        {"event": "sync", "run_id": run.info.run_id, "tracking_uri": uri},
                    )
        except ArtplugError:
            raise
        except Exception as exc:
            raise ArtplugError(
                f"cannot sync {folder} to MLflow at '{uri}': {_short(exc, 400)}. Start the "
                "tracking server, or pass --tracking-uri"
            ) from exc
        result.run_id = run_id = str(run.info.run_id)
        try:
            _sync_contents(client, run, folder, records, after_attach, result)
        except Exception as exc:
            raise ArtplugError(
                f"sync of {folder} to MLflow run {run_id} at '{uri}' stopped: {_short(exc, 400)}; "
                "run it again to send the rest (nothing is sent twice)"
            ) from exc
    _append_journal(
        folder,
        {
            "event": "sync",
            "run_id": run_id,
            "tracking_uri": uri,
            "sent": {
                "metrics": result.metrics,
                "params": result.params,
                "tags": result.tags,
                "artifacts": result.artifacts,
            },
            "status": result.status,
        },
    )
    return result


def _sync_contents(
    client: MlflowClient,
    run: Any,
    folder: Path,
    records: Sequence[Mapping[str, Any]],
    after_attach: Sequence[Mapping[str, Any]],
    result: SyncResult,
) -> None:
    """The body of :func:`sync_run` once the run is known: params, tags, metrics, files, status."""
    from mlflow.entities import Metric, Param, RunTag

    run_id = str(run.info.run_id)
    # Params: immutable in MLflow; the first value journaled is the one the run used.
    params: dict[str, str] = {}
    for record in records:
        if record["event"] == "params":
            for key, value in dict(record.get("params") or {}).items():
                params.setdefault(str(key), str(value))
    stored_params = run.data.params
    missing_params = [Param(k, v) for k, v in params.items() if k not in stored_params]
    clashes = sorted(k for k, v in params.items() if k in stored_params and stored_params[k] != v)
    if clashes:
        result.notes.append(
            f"{len(clashes)} params differ in the store and were left as they are "
            f"({', '.join(clashes[:3])}{', ...' if len(clashes) > 3 else ''})"
        )
    for params_chunk in _chunks(missing_params, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params_chunk)
    result.params = len(missing_params)

    # Tags: may change during a run; the last value journaled wins.
    tags: dict[str, str] = {}
    for record in records:
        if record["event"] == "tags":
            tags.update({str(k): str(v) for k, v in dict(record.get("tags") or {}).items()})
    stored_tags = run.data.tags
    changed_tags = [RunTag(k, v) for k, v in tags.items() if stored_tags.get(k) != v]
    for tags_chunk in _chunks(changed_tags, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tags_chunk)
    result.tags = len(changed_tags)

    # Metrics: compared per key on (step, value), so that a second sync sends nothing again.
    timestamp = _now_ms()
    missing: list[Metric] = []
    for key, values in _local_metrics(folder).items():
        stored = {_metric_identity(m.step, m.value) for m in client.get_metric_history(run_id, key)}
        for identity, value in sorted(values.items()):
            if identity not in stored:
                missing.append(Metric(key, value, timestamp, identity[0]))
    for metrics_chunk in _chunks(missing, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics_chunk)
    result.metrics = len(missing)

    # Artifacts: every file the run logged, uploaded when the store lacks it (or its size
    # differs: metrics.jsonl, say, was uploaded before the run's last lines were written).
    listings: dict[str, dict[str, int | None]] = {}
    seen: set[tuple[str, str]] = set()
    for record in records:
        if record["event"] != "artifact":
            continue
        local = Path(str(record["path"]))
        local = local if local.is_absolute() else folder / local
        if not local.exists():
            result.notes.append(f"artifact {local} no longer exists locally: not sent")
            continue
        for file, target in _artifact_files(local, record.get("artifact_path")):
            name = f"{target}/{file.name}" if target else file.name
            if (name, str(file)) in seen:
                continue
            seen.add((name, str(file)))
            if target not in listings:
                try:
                    listing = client.list_artifacts(run_id, target or None)
                except Exception:  # an artifact folder the store has never seen
                    listing = []
                listings[target] = {info.path: info.file_size for info in listing}
            if listings[target].get(name, -1) == file.stat().st_size:
                continue
            client.log_artifact(run_id, str(file), target or None)
            listings[target][name] = file.stat().st_size
            result.artifacts += 1

    models = [r for r in after_attach if r["event"] == "model"]
    if models and not models[-1].get("logged"):
        result.notes.append(
            "the trained model was not logged to MLflow while offline; its weights are in the "
            "checkpoints/ artifacts"
        )

    # Status: the journal's, else the process is gone without closing its run: FAILED.
    ends = [r for r in after_attach if r["event"] == "end"]
    if ends:
        status, end_ms = str(ends[-1]["status"]), int(ends[-1]["time_ms"])
    else:
        status, end_ms = "FAILED", int(after_attach[-1]["time_ms"])
        with contextlib.suppress(OSError):
            end_ms = max(end_ms, int((folder / METRICS_NAME).stat().st_mtime * 1000))
        result.notes.append("the run's process ended without closing the run: marked FAILED")
    if run.info.status != status:
        client.set_terminated(run_id, status, end_time=end_ms)
        result.status = status


def _append_journal(folder: Path, record: Mapping[str, Any]) -> None:
    """Append one record to ``folder``'s journal (used by sync, outside any tracker)."""
    line = json.dumps({"time_ms": _now_ms(), **record}, default=str)
    with (folder / JOURNAL_NAME).open("a", encoding="utf-8") as journal:
        journal.write(line + "\n")
