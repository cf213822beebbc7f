"""Checks of a job's inputs on the driver, before any lease, MLflow run or Ray start: a missing data folder, teacher
file or tracking server fails in a second with one line that says how to fix it, not minutes later in a worker."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from rayflow.config import JobConfig
from rayflow.files import sha256_file

TRACKING_TIMEOUT_S = 5.0


class PreflightError(ValueError):
    """An input the job cannot run without; the message says what and how to fix it."""


def check_job(job: JobConfig, *, needs_teacher: bool) -> None:
    """The data source, the teacher file (when the job distils from a given one) and the tracking store."""
    check_data(job)
    if needs_teacher and job.teacher.checkpoint and job.task != "teacher":
        check_teacher(job)
    check_tracking(job.tracking.resolved_uri())


def check_data(job: JobConfig) -> None:
    d = job.data
    if d.source in ("mnist", "digits", "shapes") or not d.path or "://" in d.path:
        return  # built-in, or remote storage (listed by the pipeline itself)
    if d.source == "image_folder":
        from rayflow.data.sources import list_class_files

        try:
            list_class_files(d.path)
        except ValueError as e:
            raise PreflightError(str(e)) from None
        return
    if not os.path.exists(d.path):
        raise PreflightError(f"data.path {d.path!r} does not exist; FIX THIS by pointing data.path at your "
                             f"{d.source} shards (make them with `python -m rayflow.prepare`)")
    if os.path.isdir(d.path) and not any(not n.startswith((".", "_")) for n in os.listdir(d.path)):
        raise PreflightError(f"data.path {d.path!r} is an empty folder; FIX THIS by pointing it at your {d.source} "
                             "shards (make them with `python -m rayflow.prepare`)")


def check_teacher(job: JobConfig) -> None:
    path = job.teacher.checkpoint
    if "://" in path:
        return
    if not os.path.exists(path):
        raise PreflightError(f"teacher checkpoint {path!r} does not exist; FIX THIS by setting teacher.checkpoint to "
                             "a file written by `python -m rayflow.train task=teacher` (or your own, with "
                             "teacher.adapter)")
    if job.teacher.sha256 and os.path.isfile(path) and sha256_file(path) != job.teacher.sha256:
        raise PreflightError(f"teacher checkpoint {path} has SHA-256 {sha256_file(path)}, not teacher.sha256="
                             f"{job.teacher.sha256}; FIX THIS by pointing at the right file or updating teacher.sha256")


def check_tracking(uri: str) -> None:
    """An http(s) tracking server must answer; a sqlite store's folder must exist."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=TRACKING_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            return  # it answered (a proxy or an older server without /health): reachable
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PreflightError(
                f"the MLflow tracking server {uri} is unreachable ({reason}); FIX THIS by starting it "
                "(`mlflow server --host 127.0.0.1 --port PORT`) or setting tracking.uri"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.path.isdir(folder):
            raise PreflightError(f"the folder of the MLflow store {uri} does not exist; FIX THIS by creating "
                                 f"{folder} or setting tracking.uri")
