"""MLflow tracking, on the driver and the Ray Train controller only (workers just `ray.train.report`).

`runs` is the runs API the driver calls (start, resume, log, search, end), `ui` builds the links into the
MLflow UI, and `callback` is the Ray Train controller callback that logs every report (with its spool for
tracking outages). Callers use `from rayflow import track`; this package re-exports their public names.
"""

from rayflow.evaluation.grid import save_image_grid  # re-exported: sample scripts and tests use it through track
from rayflow.track.callback import CHECKPOINT_TAG, RETRIED_TAG, MLflowReportCallback, replay_spool
from rayflow.track.runs import (
    RESUMABLE_STATUSES,
    RUN_KEY_TAG,
    RUN_STATUSES,
    TrackingLike,
    child_runs,
    client,
    end_run,
    find_run,
    get_or_create_experiment,
    log_artifact_file,
    log_image_grid,
    log_metrics,
    numeric_metrics,
    search_all_runs,
    set_tags,
    start_run,
)
from rayflow.track.ui import LOCAL_UI_BASE, ui_urls

__all__ = [
    "CHECKPOINT_TAG",
    "LOCAL_UI_BASE",
    "RESUMABLE_STATUSES",
    "RETRIED_TAG",
    "RUN_KEY_TAG",
    "RUN_STATUSES",
    "MLflowReportCallback",
    "TrackingLike",
    "child_runs",
    "client",
    "end_run",
    "find_run",
    "get_or_create_experiment",
    "log_artifact_file",
    "log_image_grid",
    "log_metrics",
    "numeric_metrics",
    "replay_spool",
    "save_image_grid",
    "search_all_runs",
    "set_tags",
    "start_run",
    "ui_urls",
]
