"""A whole job: teacher training and/or distillation on Ray Train, evaluation, MLflow tracking."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import ray
import torch

from rayflow import track
from rayflow.config import JobConfig, with_overrides
from rayflow.files import export_path
from rayflow.malloc import keep_freed_memory
from rayflow.orchestrate.evaluate import cache_dir, evaluate
from rayflow.orchestrate.lease import hold
from rayflow.orchestrate.preflight import check_job
from rayflow.orchestrate.training import BEST_METRIC, export_student, export_teacher, run_training

logger = logging.getLogger(__name__)


def ensure_ray() -> None:
    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) joins the cluster; otherwise a local one is started.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


@dataclass(frozen=True)
class Exported:
    """One trained and exported role: the export file, its SHA-256, what the workers returned, and for a
    distillation with in-training evaluation the best checkpoint's export."""

    path: str
    sha256: str
    train: dict
    best_path: str | None = None
    best_sha256: str | None = None


@dataclass
class JobResult:
    """What `run_job` hands back (and `rayflow.train` prints): the MLflow run, the exports, the final metrics."""

    run_id: str
    tracking_uri: str
    teacher_path: str | None = None
    teacher: Exported | None = None  # when this job trained its teacher
    student: Exported | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    mlflow_ui: str = ""

    def to_dict(self) -> dict:
        """The flat summary printed as JSON (keys scripts read: teacher_path, student_path, *_train, *_sha256)."""
        out = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "teacher_path": self.teacher_path,
               "metrics": self.metrics, "wall_s": self.wall_s, "mlflow_ui": self.mlflow_ui}
        if self.teacher is not None:
            out |= {"teacher_train": self.teacher.train, "teacher_sha256": self.teacher.sha256}
        if self.student is not None:
            out |= {"student_path": self.student.path, "distill_train": self.student.train,
                    "student_sha256": self.student.sha256}
            if self.student.best_path:
                out |= {"student_best_path": self.student.best_path, "student_best_sha256": self.student.best_sha256}
        return out


def train_and_export(job: JobConfig, role: str, export, export_dir: str, run_id: str, *, callbacks=()) -> Exported:
    """Train `role` as run `<name>-<role>`, export its EMA weights, log them to MLflow.

    Teacher metrics get the prefix 'teacher.' so both phases of a demo share one MLflow run's charts.
    `callbacks` are further Ray Train callbacks (a sweep's Tune reporting)."""
    uri = job.tracking.resolved_uri()
    prefix = "teacher." if role == "teacher" else ""
    # what the controller could not log during an MLflow outage; replayed here after training
    spool = os.path.join(cache_dir(job), "mlflow-spool", f"{run_id}-{role}.jsonl")
    track.replay_spool(uri, run_id, spool)  # leftovers of an earlier attempt of this run
    res = run_training(job, role, f"{job.run.name}-{role}",
                       callbacks=[track.MLflowReportCallback(uri, run_id, prefix=prefix, spool=spool), *callbacks])
    track.replay_spool(uri, run_id, spool)
    _log_skipped(uri, run_id, prefix, res.skipped, export_dir, role)
    path, digest = export(job, res.checkpoint_dir, export_dir)
    artifact = "teacher" if role == "teacher" else "student"
    track.log_artifact_file(uri, run_id, path, artifact)
    if not (role == "distill" and res.best_checkpoint_dir):
        return Exported(path, digest, res.return_value)
    # the best in-training evaluation, kept beside the last
    best, best_digest = export_student(job, res.best_checkpoint_dir, export_dir, "student_best")
    track.log_artifact_file(uri, run_id, best, artifact)
    m = res.best_metrics
    track.log_metrics(uri, run_id, {f"best.{BEST_METRIC}": m[BEST_METRIC], "best.images_seen": m["images_seen"]},
                      step=int(m["images_seen"]))
    track.set_tags(uri, run_id, {"rayflow.best_checkpoint": res.best_checkpoint_dir})
    return Exported(path, digest, res.return_value, best, best_digest)


def _log_skipped(uri: str, run_id: str, prefix: str, skipped: list, export_dir: str, role: str) -> None:
    """Files the source skipped while training: their count as a metric, the list (path, reason) as an artifact."""
    track.log_metrics(uri, run_id, {f"{prefix}data.skipped_files": len(skipped)}, step=0)
    if skipped:
        path = os.path.join(export_dir, f"skipped-{role}.json")
        os.makedirs(export_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump([{"path": s.path, "reason": s.reason} for s in skipped], f, indent=1)
        track.log_artifact_file(uri, run_id, path, "data")
        logger.warning("%d file(s) were skipped while training %s (listed in %s)", len(skipped), role, path)


def evaluate_and_log(job: JobConfig, run_id: str, teacher_path: str | None, student_path: str | None) -> dict:
    """The final evaluation (see `evaluate`) on the driver, its metrics and sample grids logged to the run."""
    uri = job.tracking.resolved_uri()
    if job.resources.torch_threads:  # sampling on the driver: more threads than cores slow it down
        torch.set_num_threads(job.resources.torch_threads)
    if job.resources.keep_freed_memory:
        keep_freed_memory()
    ev = evaluate(job, teacher_path, student_path, cache_dir(job))
    track.log_metrics(uri, run_id, ev["metrics"], step=0)
    for name, x in ev["samples"].items():
        track.log_image_grid(uri, run_id, x[: job.tracking.sample_grid].numpy(), name, artifact_path="images/samples")
    return ev["metrics"]


def resolve_teacher(job: JobConfig, run_id: str, export_dir: str) -> tuple[str, Exported | None]:
    """The teacher file to distil from, and its export when this job trained it: teacher.checkpoint, else one
    trained by this job (task=teacher always trains; otherwise a teacher already exported to export_dir is reused)."""
    if job.teacher.checkpoint and job.task != "teacher":
        return job.teacher.checkpoint, None
    teacher_path = export_path(export_dir, "teacher")
    if job.task == "teacher" or not os.path.isfile(teacher_path):
        trained = train_and_export(job, "teacher", export_teacher, export_dir, run_id)
        return trained.path, trained
    return teacher_path, None


def run_job(job: JobConfig) -> JobResult:
    """Run job.task ('demo', 'teacher' or 'distill'); returns the MLflow run, the exports and the final metrics.

    Holds the run's lease throughout (`lease.hold`): a second driver of the same run.name is refused before it
    starts Ray or touches MLflow; LeaseHeld says who holds it."""
    check_job(job, needs_teacher=True)
    with hold(job.run.absolute_storage(), job.run.name):
        return _run_job(job)


def _run_job(job: JobConfig) -> JobResult:
    ensure_ray()
    t_start = time.perf_counter()
    uri = job.tracking.resolved_uri()
    run_id = track.start_run(job.tracking, job.run.name, job.flat(), tags={"rayflow.task": job.task})
    result = JobResult(run_id, uri)
    try:
        export_dir = os.path.join(job.run.absolute_storage(), job.run.name, "export")
        result.teacher_path, result.teacher = resolve_teacher(job, run_id, export_dir)
        if job.task in ("demo", "distill"):
            job = with_overrides(job, {"teacher.checkpoint": result.teacher_path})
            result.student = train_and_export(job, "distill", export_student, export_dir, run_id)
            if job.data.scorable:
                result.metrics = evaluate_and_log(job, run_id, result.teacher_path, result.student.path)
            else:  # the student is exported and logged; scoring it needs prompts and a metric of the user's
                logger.warning("no evaluation: captions of data.source=%s have no content rayflow can check; "
                               "sample your prompts with `python -m rayflow.sample eval.captions=[...]`",
                               job.data.source)
        result.wall_s = time.perf_counter() - t_start
        track.log_metrics(uri, run_id, {"job.wall_s": result.wall_s}, step=0)
        track.end_run(uri, run_id, "FINISHED")
        # what a person opens: the experiment's runs table (a bare `mlflow ui` lands on a GenAI overview page)
        result.mlflow_ui = track.ui_urls(uri, track.get_or_create_experiment(uri, job.tracking.experiment))["runs"]
    except BaseException:
        track.end_run(uri, run_id, "FAILED")
        raise
    return result
