"""A Ray Tune sweep in which every trial is a full distillation run on Ray Train (Tune wraps a driver
function that builds the TorchTrainer, the pattern Ray 2.60 documents for Tune over Train).

MLflow: one parent run per sweep (its config, the teacher baseline, the report) and one nested child run
per trial (the trial's full flattened config as params, its training and in-training evaluation metrics
over images seen, its final evaluation). Relaunching the same sweep name resumes the Tune experiment,
each unfinished trial's Train run from its latest checkpoint, and the same MLflow runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from rayflow import track
from rayflow.config import ConfigError, JobConfig, SweepConfig, with_overrides
from rayflow.orchestrate.jobs import Exported, ensure_ray, evaluate_and_log, resolve_teacher, train_and_export
from rayflow.orchestrate.lease import hold
from rayflow.orchestrate.preflight import check_job
from rayflow.orchestrate.report import (
    KEYS_TAG,
    OVERRIDES_TAG,
    ROLE_TAG,
    STATUS_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    sweep_report,
)
from rayflow.orchestrate.training import export_student

logger = logging.getLogger(__name__)

SPACE_FILE = "rayflow_sweep.json"  # beside Tune's experiment state: what the sweep was launched with


@dataclass
class SweepResult:
    """What `run_sweep` hands back (and `rayflow.tune` prints): the MLflow parent run, the trials, the report."""

    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    complete: bool = False  # False: interrupted; relaunching the same sweep resumes it
    trials: int = 0
    errors: int = 0
    teacher_path: str | None = None
    teacher: Exported | None = None  # when the sweep trained its teacher
    report: dict = field(default_factory=dict)  # sweep_report's table and files (complete sweeps)
    mlflow_ui: str = ""  # the trials side by side
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        """The flat summary printed as JSON (the report's table is printed apart)."""
        out = {"parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri,
               "experiment_path": self.experiment_path, "teacher_path": self.teacher_path, "trials": self.trials,
               "errors": self.errors, "complete": self.complete, "mlflow_ui": self.mlflow_ui, "wall_s": self.wall_s}
        if self.teacher is not None:
            out |= {"teacher_train": self.teacher.train, "teacher_sha256": self.teacher.sha256}
        return out


def trial_key(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}/{trial_id}"


def trial_run_name(overrides: dict[str, Any]) -> str:
    """'steps=4 lr_ratio=2.0' for {'distill.steps': 4, 'distill.lr_ratio': 2.0}."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(overrides.items()))


def _search_space(sweep: SweepConfig) -> dict[str, Any]:
    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {key: make[kind](list(values)) for key, spec in sweep.space.items() for kind, values in spec.items()}


def _portable(job: JobConfig) -> JobConfig:
    """A copy with paths made absolute on the driver: Tune runs each trial in its own working directory."""
    paths: dict[str, Any] = {"tracking.uri": job.tracking.resolved_uri(),
                             "run.storage_path": job.run.absolute_storage()}
    if job.data.path and "://" not in job.data.path:
        paths["data.path"] = os.path.abspath(os.path.expanduser(job.data.path))
    if job.teacher.checkpoint:
        paths["teacher.checkpoint"] = os.path.abspath(os.path.expanduser(job.teacher.checkpoint))
    return with_overrides(job, paths)


def run_trial(config: dict[str, Any], *, base: dict, sweep: dict, parent_run_id: str, teacher_path: str) -> None:
    """One Tune trial: distil with the trial's overrides on Ray Train, then evaluate the student."""
    from ray.tune.integration.ray_train import TuneReportCallback

    swept = {k: config[k] for k in sweep["space"]}
    trial_id = tune.get_context().get_trial_id()
    job = JobConfig.from_dict(base)
    job = with_overrides(job, {**swept, "teacher.checkpoint": teacher_path, "run.name": trial_id,
                               "run.storage_path": os.path.join(job.run.storage_path, f"{sweep['name']}-trials")})
    uri = job.tracking.resolved_uri()
    overrides = " ".join(f"{k}={v}" for k, v in sorted(swept.items()))
    run_id = track.start_run(
        job.tracking,
        trial_run_name(swept),
        job.flat(),
        tags={SWEEP_TAG: sweep["name"], ROLE_TAG: "trial", TRIAL_TAG: trial_id, OVERRIDES_TAG: overrides},
        run_key=trial_key(sweep["name"], trial_id),
        parent_run_id=parent_run_id,
    )
    # Only success is closed here. A failed trial is closed by the driver's TrialRunsCallback, which also
    # closes trials the scheduler stops: closing from both sides raced (a stopped trial's function saw an
    # exception while the driver marked it early-stopped, leaving "failed" on a FINISHED run).
    export_dir = os.path.join(job.run.absolute_storage(), trial_id, "export")
    student = train_and_export(job, "distill", export_student, export_dir, run_id, callbacks=[TuneReportCallback()])
    metrics = evaluate_and_log(job, run_id, None, student.path)
    track.set_tags(uri, run_id, {STATUS_TAG: "completed"})
    track.end_run(uri, run_id, "FINISHED")
    # No images_seen here: the scheduler has judged the training curve; this is the final evaluation.
    tune.report({**track.numeric_metrics(metrics), "trial_done": 1.0})


class TrialRunsCallback(tune.Callback):
    """Driver side: closes the MLflow child run of a trial that the scheduler stopped early (its driver
    function was killed before it could) and of one that errored."""

    def __init__(self, uri: str, experiment_id: str, sweep_name: str) -> None:
        self.uri, self.experiment_id, self.sweep_name = uri, experiment_id, sweep_name

    def _close(self, trial: Any, status: str, tag: str) -> None:
        key = trial_key(self.sweep_name, trial.trial_id)
        try:
            for run in track.search_all_runs(self.uri, self.experiment_id, f"tags.`{track.RUN_KEY_TAG}` = '{key}'"):
                if run.info.status == "RUNNING":
                    track.set_tags(self.uri, run.info.run_id, {STATUS_TAG: tag})
                    track.end_run(self.uri, run.info.run_id, status)
        except Exception as err:  # tracking trouble must not end the sweep
            logger.warning("could not close MLflow run of trial %s: %s", trial.trial_id, err)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # A scheduler stop marks the last result done; a trial stopped because the sweep was interrupted
        # has no such result and stays open for the resumed sweep.
        if (trial.last_result or {}).get("done"):
            self._close(trial, "FINISHED", "early_stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED", "failed")


def _check_same_sweep(path: str, launched: dict) -> None:
    """A relaunch resumes Tune's saved search space: refuse one whose sweep settings changed."""
    saved_file = os.path.join(path, SPACE_FILE)
    if not os.path.isfile(saved_file):
        return
    with open(saved_file) as f:
        saved = json.load(f)
    if saved != launched:
        diff = sorted(k for k in set(saved) | set(launched) if saved.get(k) != launched.get(k))
        raise ConfigError(
            f"sweep '{launched['sweep']['name']}' at {path} was launched with other settings (differs in "
            f"{diff}); FIX THIS by choosing another sweep.name or deleting that directory to start over"
        )


def run_sweep(job: JobConfig, sweep: SweepConfig) -> SweepResult:
    """Launch or resume the sweep (`SweepResult.complete` is False when it was interrupted).

    The sweep's lease (sweep.name in run.storage_path) is held throughout; its trials take none."""
    check_job(job, needs_teacher=True)
    with hold(job.run.absolute_storage(), sweep.name):
        return _run_sweep(job, sweep)


def _run_sweep(job: JobConfig, sweep: SweepConfig) -> SweepResult:
    ensure_ray()
    # Training reports carry the evaluation metric only every run.eval_every_images; the scheduler skips
    # the others, which Tune's strict check would turn into an error.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    t_start = time.perf_counter()
    # the teacher trains (when it must) as Train run <sweep>-teacher
    every = job.run.eval_every_images or sweep.eval_every_images
    job = with_overrides(_portable(job), {"run.name": sweep.name, "run.eval_every_images": every})
    uri = job.tracking.resolved_uri()
    storage = job.run.absolute_storage()
    path = os.path.join(storage, sweep.name)
    launched = json.loads(json.dumps({"job": job.to_dict(), "sweep": sweep.to_dict()}))
    _check_same_sweep(path, launched)

    parent = track.start_run(
        job.tracking,
        sweep.name,
        {**job.flat(), **{f"sweep.{k}": v for k, v in sweep.to_dict().items()}},
        tags={SWEEP_TAG: sweep.name, ROLE_TAG: "parent", "rayflow.task": "sweep",
              KEYS_TAG: ",".join(sweep.space)},
        run_key=f"sweep/{sweep.name}",
    )
    out = SweepResult(parent, uri, path)
    try:
        out.teacher_path, out.teacher = resolve_teacher(job, parent, os.path.join(path, "export"))
        if sweep.teacher_baseline and "eval.teacher_ancestral.fd" not in track.client(uri).get_run(parent).data.metrics:
            evaluate_and_log(job, parent, out.teacher_path, None)
        grid = _tuner(job, sweep, parent, out.teacher_path, path, launched).fit()
        out.trials, out.errors, out.complete = len(grid), grid.num_errors, _finished(grid, sweep)
        if not out.complete:
            _close_interrupted(uri, parent, sweep.name)
            track.end_run(uri, parent, "KILLED")
            logger.warning("sweep %s interrupted; relaunch the same command to resume it", sweep.name)
            return out
        out.report = sweep_report(uri, parent, os.path.join(path, "report"), metric=sweep.metric)
        trials = [r.info.run_id for r in track.child_runs(uri, parent)]
        urls = track.ui_urls(uri, track.get_or_create_experiment(uri, job.tracking.experiment), trials)
        out.mlflow_ui = urls.get("compare", urls["runs"])
        out.wall_s = time.perf_counter() - t_start
        track.log_metrics(uri, parent, {"sweep.wall_s": out.wall_s, "sweep.trials": len(grid)}, step=0)
        track.end_run(uri, parent, "FAILED" if grid.num_errors else "FINISHED")
    except BaseException:
        _close_interrupted(uri, parent, sweep.name)
        track.end_run(uri, parent, "FAILED")
        raise
    return out


def _finished(grid: tune.ResultGrid, sweep: SweepConfig) -> bool:
    """Whether every trial of the sweep ran: Tune returns normally after a SIGINT too (state saved, running
    trials stopped and reported TERMINATED), so look at the trials themselves. A trial that ended (normally
    or stopped by the scheduler) has a last result marked done; trials not yet generated are missing."""
    expected = sweep.num_samples
    for spec in sweep.space.values():
        if "grid" in spec:
            expected *= len(spec["grid"])
    return len(grid) >= expected and all(r.error is not None or (r.metrics or {}).get("done") for r in grid)


def _close_interrupted(uri: str, parent: str, sweep_name: str) -> None:
    """Mark child runs still RUNNING as KILLED: the resumed sweep sets them RUNNING again."""
    try:
        for run in track.child_runs(uri, parent):
            if run.info.status == "RUNNING":
                track.end_run(uri, run.info.run_id, "KILLED")
    except Exception as err:
        logger.warning("could not mark the child runs of sweep %s as KILLED: %s", sweep_name, err)


def _tuner(job: JobConfig, sweep: SweepConfig, parent: str, teacher: str, path: str, launched: dict) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=job.to_dict(), sweep=sweep.to_dict(), parent_run_id=parent,
                             teacher_path=teacher),
        {"cpu": sweep.trial_cpus},
    )
    if tune.Tuner.can_restore(path):
        logger.info("resuming sweep %s from %s", sweep.name, path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    if sweep.scheduler == "asha":
        # Rungs at grace * rf^i up to half the run; with stop_last_trials=False a trial that passed the last
        # rung trains to the end and gets its final evaluation.
        max_t = max(sweep.grace_images, job.distill.train_images // sweep.reduction_factor)
        scheduler = ASHAScheduler(time_attr="images_seen", max_t=max_t, grace_period=sweep.grace_images,
                                  reduction_factor=sweep.reduction_factor, stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, SPACE_FILE), "w") as f:
        json.dump(launched, f, indent=1, sort_keys=True)
    experiment_id = track.get_or_create_experiment(job.tracking.resolved_uri(), job.tracking.experiment)
    return tune.Tuner(
        trainable,
        param_space=_search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            # An explicit search algorithm ignores TuneConfig's limit: it needs its own.
            search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials),
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=os.path.dirname(path),
            callbacks=[TrialRunsCallback(job.tracking.resolved_uri(), experiment_id, sweep.name)],
            failure_config=tune.FailureConfig(max_failures=0),  # Train retries workers; a broken trial stays broken
        ),
    )
