"""MLflow tracking, on the driver and the Ray Train controller only (workers just `ray.train.report`).

Every function takes the tracking URI and a run id and talks to MLflow through its own `MlflowClient`,
never through the fluent global "active run": a Tune driver holds a parent run and several child runs in
one process. Use `sqlite:////absolute/path.db` or `http://host:port` (MLflow 3's file store is disabled).

`mlflow` is imported inside the functions, not at module level: importing it costs seconds.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import numbers
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

# ray.train.UserCallback is this class, but exported only while Train V2 is on (the 2.60 default);
# importing it from its home keeps track.py importable with RAY_TRAIN_V2_ENABLED=0.
from ray.train.v2.api.callback import UserCallback

from rayflow.evaluation.grid import SAMPLES_FILE, save_image_grid

__all__ = ["save_image_grid"]  # re-exported: sample scripts and tests use it through track

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "rayflow.run_key"
CHECKPOINT_TAG = "rayflow.latest_checkpoint"
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

    _check_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _check_uri(uri: str) -> None:
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
# Where to look: MLflow UI links
# ---------------------------------------------------------------------------------------------------

# What `mlflow ui --backend-store-uri <database uri>` (and a bare `mlflow server`) serves by default.
LOCAL_UI_BASE = "http://127.0.0.1:5000"
# MLflow's SQLAlchemy stores: a database, not a server, so the UI is whatever `mlflow ui` the user starts on it.
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def ui_urls(
    tracking_uri: str, experiment_id: str, run_ids: list[str] | None = None, *, ui_base: str | None = None
) -> dict[str, str]:
    """Links into the MLflow UI (MLflow 3.17; its pages are hash routes of one single-page app):

    - ``"runs"``: the experiment's runs table, ``<base>/#/experiments/<experiment_id>/runs`` (a bare
      ``mlflow ui`` lands on a GenAI overview page instead; a sweep's trials sit nested under its parent run);
    - ``"compare"``, only when ``run_ids`` is given and not empty: the compare view of those runs (params,
      metrics side by side), ``<base>/#/compare-runs?runs=<JSON list of run ids>&experiments=<JSON list of
      experiment ids>``, the JSON lists percent-encoded (the route the UI's own Compare button opens).

    The base: ``ui_base`` when given (an SSH tunnel, a proxy); else, for an ``http(s)://`` tracking URI, that
    server itself (its path prefix kept, any ``user:password@`` dropped so no secret lands in a log); for a
    database URI (``sqlite:////abs/mlflow.db``, ``postgresql://...``) ``http://127.0.0.1:5000``, which is where
    ``mlflow ui --backend-store-uri <tracking_uri>`` serves it (start that first; ``--port`` moves it: then pass
    ``ui_base``).
    """
    from urllib.parse import quote, urlsplit, urlunsplit

    if ui_base is None:
        parts = urlsplit(tracking_uri)
        if parts.scheme in ("http", "https"):
            netloc = parts.hostname or ""
            if ":" in netloc:  # an IPv6 literal
                netloc = f"[{netloc}]"
            if parts.port is not None:
                netloc += f":{parts.port}"
            ui_base = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        elif parts.scheme.split("+", 1)[0] in _DATABASE_SCHEMES:
            ui_base = LOCAL_UI_BASE
        else:
            raise ValueError(
                f"no MLflow UI address is known for tracking uri {tracking_uri!r}; FIX THIS by passing "
                "ui_base='http://host:port' (where your MLflow UI is served)"
            )
    experiment_id = str(experiment_id)
    if not experiment_id:
        raise ValueError("ui_urls needs the experiment id (MlflowClient.get_experiment_by_name(name).experiment_id)")
    root = ui_base.rstrip("/") + "/#"
    urls = {"runs": f"{root}/experiments/{quote(experiment_id, safe='')}/runs"}
    if run_ids:
        as_json = lambda ids: quote(json.dumps([str(i) for i in ids], separators=(",", ":")), safe="")  # noqa: E731
        urls["compare"] = f"{root}/compare-runs?runs={as_json(run_ids)}&experiments={as_json([experiment_id])}"
    return urls


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
    _log_metrics(client(uri), run_id, numeric_metrics(metrics), step)


def _log_metrics(c: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
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


# ---------------------------------------------------------------------------------------------------
# Ray Train controller callback
# ---------------------------------------------------------------------------------------------------


class MLflowReportCallback(UserCallback):
    """Logs every `ray.train.report` of rank 0 to an MLflow run, from the Ray Train controller.

    Build it on the driver with the run from `start_run` and pass it in `RunConfig(callbacks=[...])`.
    Ray pickles it into the controller actor, so it holds only strings and opens its MLflow client on
    first use. Metrics are logged at step = rank 0's `images_seen` (comparable across worker counts and
    resumes); a reported checkpoint's path goes into the tag `rayflow.latest_checkpoint`, its sample grid
    (in-training evaluation) into images/progress/.

    A tracking outage never stops training: what could not be logged is queued (in order) and retried at
    every later report, with short timeouts so a dead server does not stall the controller; the queue is
    also spooled to `spool` (a local JSON-lines file) so the driver can replay it after training
    (`replay_spool`). A run that needed retries gets the tag `rayflow.tracking_retried` (reports delayed).
    """

    MAX_QUEUE = 10_000  # reports; beyond that the oldest are dropped (and counted in the warning)

    def __init__(self, uri: str, run_id: str, prefix: str = "", *, spool: str | None = None) -> None:
        _check_uri(uri)
        self.uri = uri
        self.run_id = run_id
        self.prefix = prefix
        self.spool = spool
        self._client: MlflowClient | None = None
        self._reports = 0  # fallback step when a report has no images_seen
        self._queue: list[tuple] = []  # ("metrics", {name: value}, step) | ("tag", key, value) | ("grid", ...)
        self._retried = 0  # reports that were logged late
        self._dropped = 0
        self._failing = False

    def __getstate__(self) -> dict[str, Any]:
        # Clients hold DB engines and sessions, which neither pickle nor survive a process hop.
        return {**self.__dict__, "_client": None}

    def _mlflow(self) -> MlflowClient:
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def _log_sample_grid(self, path: str, filesystem: Any, step: int) -> None:
        """The in-training evaluation's PNG (inside the checkpoint) as images/progress/<prefix>step_<N>.png."""
        src = f"{path.rstrip('/')}/{SAMPLES_FILE}"
        if filesystem.get_file_info(src).type.name != "File":
            return  # no evaluation at this checkpoint, or Train already deleted it
        with tempfile.TemporaryDirectory(prefix="rayflow-grid-") as tmp:
            name = f"{self.prefix}step_{int(step):010d}.png".replace("/", "_")  # a file name, not a path
            local = os.path.join(tmp, name)
            with filesystem.open_input_stream(src) as f, open(local, "wb") as out:
                out.write(f.read())
            self._mlflow().log_artifact(self.run_id, local, "images/progress")

    def _apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "metrics":
            _log_metrics(self._mlflow(), self.run_id, op[1], op[2])
        elif kind == "tag":
            self._mlflow().set_tag(self.run_id, op[1], op[2])
        else:  # grid
            self._log_sample_grid(op[1], op[2], op[3])

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any | None) -> None:
        """Queue rank 0's numeric metrics (step images_seen), the checkpoint tag and grid; flush the queue."""
        self._reports += 1
        rank0 = metrics[0] if metrics else {}
        if "images_seen" in rank0:
            step = int(rank0["images_seen"])
        else:
            step = self._reports
            logger.warning("report without images_seen; logging MLflow step %d (report count). FIX THIS by "
                           "reporting images_seen from the training loop", step)
        if rank0:
            self._queue.append(("metrics", numeric_metrics(rank0, self.prefix), step))
        if checkpoint is not None:
            self._queue.append(("tag", CHECKPOINT_TAG, checkpoint.path))
            self._queue.append(("grid", checkpoint.path, checkpoint.filesystem, step))
        if len(self._queue) > self.MAX_QUEUE:
            self._dropped += len(self._queue) - self.MAX_QUEUE
            del self._queue[: len(self._queue) - self.MAX_QUEUE]
        self.flush()

    def flush(self) -> bool:
        """Log the queue in order; on the first failure keep the rest (and spool it). True when empty."""
        with _short_http_retries():
            while self._queue:
                try:
                    self._apply(self._queue[0])
                except Exception as err:  # broad on purpose: a tracking outage must not kill a training run
                    if not self._failing:
                        logger.warning("MLflow logging to run %s at %s failed (%s); training continues, %d "
                                       "report(s) queued for retry", self.run_id, self.uri, err, len(self._queue))
                    self._failing = True
                    self._write_spool()
                    return False
                self._queue.pop(0)
        if self._failing:  # an outage is over: say so on the run
            self._retried += 1
            self._failing = False
            try:
                self._mlflow().set_tag(self.run_id, RETRIED_TAG, f"reports logged late after an outage; "
                                       f"{self._dropped} dropped from a full queue")
            except Exception:
                pass
            logger.warning("MLflow at %s reachable again; queued reports logged", self.uri)
        self._write_spool()
        return True

    def _write_spool(self) -> None:
        if not self.spool:
            return
        rows = [{"metrics": op[1], "step": op[2]} for op in self._queue if op[0] == "metrics"]
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.spool)), exist_ok=True)
            tmp = f"{self.spool}.tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(tmp, self.spool)
        except OSError as err:
            logger.warning("could not write the MLflow spool %s: %s", self.spool, err)


RETRIED_TAG = "rayflow.tracking_retried"


class _short_http_retries:
    """MLflow's HTTP client retries ~7 times with backoff (minutes) by default; inside the training
    controller a dead server must cost seconds per report, so lower the budget around our calls."""

    SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.SETTINGS}
        for k, v in self.SETTINGS.items():
            os.environ.setdefault(k, v)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)


def replay_spool(uri: str, run_id: str, spool: str) -> int:
    """Log the metrics a training controller could not (see MLflowReportCallback); returns how many
    reports were replayed, and removes the spool once they are in. Warns and keeps it when MLflow is down."""
    if not os.path.isfile(spool):
        return 0
    with open(spool) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    try:
        c = client(uri)
        for row in rows:
            _log_metrics(c, run_id, row["metrics"], row["step"])
        if rows:
            c.set_tag(run_id, RETRIED_TAG, f"{len(rows)} report(s) replayed by the driver after training")
    except Exception as err:
        logger.warning("MLflow at %s still unreachable: %d report(s) of run %s not logged; they stay in %s and are "
                       "replayed when the job is rerun (%s)", uri, len(rows), run_id, spool, err)
        return 0
    os.unlink(spool)
    return len(rows)
