"""The MLflow runs API, for the driver (and, through `rayflow.track.callback`, the Ray Train controller): create
or resume runs, log params, tags, metrics and artifacts, find runs and their children, end them.

Every function takes the tracking URI and a run id and talks to MLflow through its own `MlflowClient`,
never through the fluent global "active run": a Tune driver holds a parent run and several child runs in
one process. Use `sqlite:////absolute/path.db` or `http://host:port` (MLflow 3's file store is disabled).

`mlflow` is imported inside the functions, not at module level: importing it costs seconds.
"""

from __future__ import annotations

import importlib.metadata
import logging
import numbers
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from rayflow.evaluation.grid import save_image_grid

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "rayflow.run_key"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# A run in one of these states was interrupted, so rerunning the job resumes into it.
RESUMABLE_STATUSES = ("RUNNING", "FAILED", "KILLED")

# MLflow's limits (mlflow.utils.validation): log_batch takes <= 100 params, <= 100 tags and <= 1000
# metrics per call; param values are capped at 6000 characters and tag values at 8000.
_MAX_PARAMS_PER_BATCH = 100
_MAX_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_CHARS = 6000
_MAX_TAG_CHARS = 8000


class TrackingLike(Protocol):
    """What `start_run` needs of `rayflow.config.TrackingConfig`."""

    experiment: str

    def resolved_uri(self) -> str: ...


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------


def client(uri: str) -> MlflowClient:
    """An `MlflowClient` bound to `uri`, after checking that the URI is one MLflow 3 accepts."""
    from mlflow import MlflowClient

    check_uri(uri)
    return MlflowClient(tracking_uri=uri)


def check_uri(uri: str) -> None:
    """Raise a one-line error for a tracking URI that not every process can open (relative sqlite, file store)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # sqlite:///rel.db is relative to the cwd: the Ray Train controller runs in another directory.
        raise ValueError(
            f"tracking uri {uri!r} is a relative sqlite path; FIX THIS by using "
            "sqlite:////absolute/path.db (four slashes) so every process opens the same file"
        )
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(
            f"tracking uri {uri!r} points at MLflow's file store, which MLflow 3 disables; "
            "FIX THIS by using sqlite:////absolute/path.db or http://host:port"
        )


def _tracking_uri(tracking: TrackingLike | str) -> str:
    return tracking if isinstance(tracking, str) else tracking.resolved_uri()


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store live next to the .db file; a server decides its own."""
    if not uri.startswith("sqlite:////"):
        return None
    # Without this MLflow puts them under ./mlruns of whichever process created the experiment.
    db_path = uri[len("sqlite:///") :]
    return os.path.join(os.path.dirname(db_path), "mlartifacts", experiment)


def get_or_create_experiment(uri: str, name: str) -> str:
    """The id of experiment `name`, created (artifacts next to a sqlite db) when missing."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; FIX THIS by restoring it "
                f"(MlflowClient.restore_experiment({exp.experiment_id!r})) or choosing "
                "another tracking.experiment"
            )
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_artifact_location(uri, name))
    except MlflowException:
        # Another driver (a parallel Tune trial) created it between our get and create.
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def search_all_runs(uri: str, experiment_id: str, filter_string: str = "", order_by: str = "DESC") -> Iterator:
    """Every run of the experiment matching filter_string, by start time (order_by ASC or DESC), page by page."""
    c, token = client(uri), None
    while True:
        page = c.search_runs([experiment_id], filter_string=filter_string,
                             order_by=[f"attributes.start_time {order_by}"], max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def find_run(
    uri: str, experiment_id: str, run_name: str, run_key: str, *, statuses: Iterable[str] = RESUMABLE_STATUSES
) -> str | None:
    """The newest run in the experiment with this name and `rayflow.run_key` tag whose status is one of
    `statuses` (by default: interrupted runs, which a rerun of the same job resumes), or None."""
    wanted = set(statuses)
    # Filter on the tag in MLflow's query language only when quoting is safe; the rest in Python.
    where = f"tags.`{RUN_KEY_TAG}` = '{run_key}'" if "'" not in run_key else ""
    for run in search_all_runs(uri, experiment_id, where):
        if run.info.run_name == run_name and run.data.tags.get(RUN_KEY_TAG) == run_key and run.info.status in wanted:
            return run.info.run_id
    return None


def start_run(
    tracking: TrackingLike | str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    *,
    experiment: str | None = None,
    run_key: str | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create (or resume) an MLflow run and log params and provenance tags; returns the run id.

    `tracking` is a `TrackingConfig` (its resolved URI and experiment are used) or a URI string with
    `experiment=`. The run is identified by `run_name` plus the tag `rayflow.run_key` (`run_key`, else
    `tags["rayflow.run_key"]`, else `run_name`): if an interrupted run (RUNNING, FAILED or KILLED) with
    both already exists, it is set RUNNING again and reused, so rerunning a job resumes its run instead
    of making a duplicate. `parent_run_id` nests the run (Tune trials under a sweep).
    """
    import mlflow

    uri = _tracking_uri(tracking)
    experiment = experiment or getattr(tracking, "experiment", None)
    if not experiment:
        raise ValueError("no MLflow experiment name; FIX THIS by passing a TrackingConfig or experiment=...")
    # The driver's own fluent calls (mlflow.get_run, a notebook poking at results) then see the same store.
    mlflow.set_tracking_uri(uri)
    experiment_id = get_or_create_experiment(uri, experiment)
    key = run_key or (tags or {}).get(RUN_KEY_TAG) or run_name

    all_tags = {**_provenance_tags(), **(tags or {}), RUN_KEY_TAG: key}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id

    c = client(uri)
    run_id = find_run(uri, experiment_id, run_name, key)
    if run_id is None:
        run_id = c.create_run(experiment_id, run_name=run_name).info.run_id
        logged: dict[str, str] = {}
    else:
        logger.info("resuming MLflow run %s (%s, key %s)", run_id, run_name, key)
        c.update_run(run_id, status="RUNNING")
        logged = c.get_run(run_id).data.params
    _log_params(c, run_id, params, logged)
    _log_tags(c, run_id, all_tags)
    return run_id


def _log_params(c: MlflowClient, run_id: str, params: Mapping[str, Any], logged: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    new = {k: _clip(v, _MAX_PARAM_CHARS) for k, v in params.items()}
    # MLflow params are immutable: a resumed run keeps its first values. A changed value (e.g. a longer
    # train_images to extend training) goes into a tag so the run still says what it was resumed with.
    changed = {k: v for k, v in new.items() if k in logged and logged[k] != v}
    for k, v in changed.items():
        logger.warning(
            "MLflow run %s already has param %s=%r; the resumed job uses %r (recorded as tag rayflow.resumed_param.%s)",
            run_id,
            k,
            logged[k],
            v,
            k,
        )
    fresh = [Param(k, v) for k, v in new.items() if k not in logged]
    for batch in _chunks(fresh, _MAX_PARAMS_PER_BATCH):
        c.log_batch(run_id, params=batch)
    if changed:
        _log_tags(c, run_id, {f"rayflow.resumed_param.{k}": v for k, v in changed.items()})


def _log_tags(c: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    entities = [RunTag(k, _clip(v, _MAX_TAG_CHARS)) for k, v in tags.items()]
    for batch in _chunks(entities, _MAX_TAGS_PER_BATCH):
        c.log_batch(run_id, tags=batch)


def _clip(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _provenance_tags() -> dict[str, str]:
    import rayflow

    tags = {"rayflow.git_commit": _git_commit(), "rayflow.version": rayflow.__version__}
    for dist in ("torch", "ray", "mlflow"):
        try:
            tags[f"rayflow.{dist}_version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            tags[f"rayflow.{dist}_version"] = "unknown"
    return tags


def _git_commit() -> str:
    """HEAD of the checkout rayflow is imported from; "unknown" for an installed wheel or without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set (or overwrite) tags of a run."""
    _log_tags(client(uri), run_id, tags)


def child_runs(uri: str, parent_run_id: str) -> list:
    """The runs nested under `parent_run_id` (MLflow `Run` objects), oldest first."""
    experiment_id = client(uri).get_run(parent_run_id).info.experiment_id
    return list(search_all_runs(uri, experiment_id, f"tags.`mlflow.parentRunId` = '{parent_run_id}'", "ASC"))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    if status not in RUN_STATUSES:
        raise ValueError(f"end_run status {status!r} is not terminal; FIX THIS by using one of {RUN_STATUSES}")
    client(uri).set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------------------------
# Metrics and artifacts
# ---------------------------------------------------------------------------------------------------


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The entries that MLflow can log as metrics (numbers, bools, 0-d arrays), as floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, numbers.Real):
            out[prefix + key] = float(value)
    return out


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Log the numeric entries of `metrics` at `step` (non-numeric values are skipped)."""
    log_metric_batches(client(uri), run_id, numeric_metrics(metrics), step)


def log_metric_batches(c: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log numeric metrics at `step` through an open client, in batches of MLflow's size limit."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entities = [Metric(k, v, now, int(step)) for k, v in metrics.items()]
    for batch in _chunks(entities, _MAX_METRICS_PER_BATCH):
        c.log_batch(run_id, metrics=batch)


def log_artifact_file(uri: str, run_id: str, path: str, artifact_path: str | None = None) -> None:
    """Upload a local file (or directory) into the run's artifacts, under `artifact_path`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"artifact {path!r} does not exist; FIX THIS by writing it before logging it")
    c = client(uri)
    if os.path.isdir(path):
        c.log_artifacts(run_id, path, artifact_path)
    else:
        c.log_artifact(run_id, path, artifact_path)


def log_image_grid(
    uri: str, run_id: str, images: np.ndarray | torch.Tensor, name: str, *, artifact_path: str = "images"
) -> str:
    """Log images (N, C, H, W) in [-1, 1] as one PNG grid `<artifact_path>/<name>.png`; returns that path."""
    filename = name if name.lower().endswith(".png") else f"{name}.png"
    with tempfile.TemporaryDirectory(prefix="rayflow-grid-") as tmp:
        local = os.path.join(tmp, filename)
        save_image_grid(images, local)
        client(uri).log_artifact(run_id, local, artifact_path)
    return f"{artifact_path}/{filename}"

