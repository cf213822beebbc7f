"""The Ray Train controller callback that logs every `ray.train.report` to MLflow, and its spool: what a
tracking outage kept from MLflow is written to a local file that the driver replays after training."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

# ray.train.UserCallback is this class, but exported only while Train V2 is on (the 2.60 default);
# importing it from its home keeps rayflow.track importable with RAY_TRAIN_V2_ENABLED=0.
from ray.train.v2.api.callback import UserCallback

from rayflow.evaluation.grid import SAMPLES_FILE
from rayflow.track.runs import check_uri, client, log_metric_batches, numeric_metrics

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "rayflow.latest_checkpoint"
RETRIED_TAG = "rayflow.tracking_retried"


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
        check_uri(uri)
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
            log_metric_batches(self._mlflow(), self.run_id, op[1], op[2])
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
            log_metric_batches(c, run_id, row["metrics"], row["step"])
        if rows:
            c.set_tag(run_id, RETRIED_TAG, f"{len(rows)} report(s) replayed by the driver after training")
    except Exception as err:
        logger.warning("MLflow at %s still unreachable: %d report(s) of run %s not logged; they stay in %s and are "
                       "replayed when the job is rerun (%s)", uri, len(rows), run_id, spool, err)
        return 0
    os.unlink(spool)
    return len(rows)
