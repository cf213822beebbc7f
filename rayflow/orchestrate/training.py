"""One Ray Train run (teacher training or distillation) and the export of its result."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from rayflow.config import JobConfig
from rayflow.core.moment_matching import adam_preconditioner
from rayflow.data.sources import SkipLog, SkippedFile
from rayflow.exports import SUFFIX, describe, write_export
from rayflow.models import save_state_dict
from rayflow.orchestrate.datasets import source_dataset, train_dataset
from rayflow.orchestrate.evaluate import cache_dir, prepare_reference
from rayflow.orchestrate.generate import eval_conditions
from rayflow.orchestrate.precondition import PRECOND_EPS, teacher_preconditioner
from rayflow.teachers import PRECOND_NAME
from rayflow.worker.loop import STATE_FILE, WorkerSpec, train_loop_per_worker


@dataclass
class TrainOutcome:
    run_dir: str  # <storage_path>/<name>
    checkpoint_dir: str | None  # latest checkpoint directory (local storage) or URI
    return_value: dict
    best_checkpoint_dir: str | None = None  # best by BEST_METRIC when in-training evaluation ran
    best_metrics: dict | None = None
    skipped: list[SkippedFile] = field(default_factory=list)  # files the source dropped (data.on_bad_image=skip)


logger = logging.getLogger(__name__)

# In-training evaluation's score: Train keeps the best checkpoints by it (and always the latest).
BEST_METRIC, BEST_MODE = "eval.proxy_fd", "min"


def run_training(job: JobConfig, role: str, name: str, *, callbacks=()) -> TrainOutcome:
    """Train `role` ('teacher' or 'distill') on Ray Train as run `name`; rerunning the same name resumes."""
    r = job.resources
    reference, cond, labels = None, None, None
    if role == "distill" and job.run.eval_every_images:
        # Bytes, not a path: workers on other nodes cannot read the driver's disk.
        with open(prepare_reference(job, cache_dir(job)), "rb") as f:
            reference = f.read()
        cond, labels, _ = eval_conditions(job, job.run.eval_proxy_samples)  # text: encoded here, once
        cond, labels = cond.numpy(), labels.numpy()
    precond = teacher_preconditioner(job) if role == "distill" else None
    skip_log = SkipLog()  # the decode tasks of every epoch and restart report into it; a file counts once
    per_worker = {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if r.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": WorkerSpec(job, role, reference, cond, labels,
                                              None if precond is None else ray.put(precond))},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=job.run.absolute_storage(),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2,
                **({"checkpoint_score_attribute": BEST_METRIC, "checkpoint_score_order": BEST_MODE} if reference
                   else {}),
            ),
            callbacks=list(callbacks),
        ),
        datasets={"train": _train_data(job, os.path.join(job.run.absolute_storage(), name), skip_log)},
        # Train replaces a dataset's execution options with its ingest defaults, dropping the pipeline's
        # preserve_order; Ray Data then hands blocks to ranks by arrival and locality, and a resumed rank would
        # skip other batches than the ones it had consumed.
        dataset_config=ray.train.DataConfig(execution_options=_ordered_ingest(), enable_shard_locality=False),
    )
    result = trainer.fit()
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    out = TrainOutcome(os.path.join(job.run.absolute_storage(), name), ckpt, result.return_value or {},
                       skipped=_skipped(skip_log))
    if reference:
        scored = [(c, m) for c, m in result.best_checkpoints or [] if BEST_METRIC in m]
        if scored:
            best, metrics = min(scored, key=lambda cm: cm[1][BEST_METRIC])
            out.best_checkpoint_dir, out.best_metrics = best.path, metrics
    return out


def _skipped(skip_log: SkipLog) -> list[SkippedFile]:
    # The training result is safe on storage by now: losing the skip records must not fail the run.
    try:
        return skip_log.skipped()
    except ray.exceptions.RayError as err:
        logger.warning("the record of skipped files was lost (%s); see the workers' logs for 'skipped' lines", err)
        return []


def _train_data(job: JobConfig, run_dir: str, skip_log: SkipLog | None = None):
    """The training dataset as a function: Train calls it at every worker-group start (the first one, each
    restart after a failure, a rerun of the same name).

    Data order and flips of epoch e derive from (seed, e), and a dataset counts its first pass as the epoch it
    was built with. Built at the epoch of the checkpoint the workers resume from, it replays that epoch's order,
    so their skipping of the batches the checkpoint had consumed is exact; one dataset built for the whole run
    would start a restart inside epoch e with epoch 0's order and skip or repeat images.
    """
    d = job.data
    source = source_dataset(d, skip_log=skip_log)  # on the driver: a bad path or file fails before workers start

    def make():
        return train_dataset(d, source=source, epoch=_resume_epoch(run_dir))

    return make


def _ordered_ingest():
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _resume_epoch(run_dir: str) -> int:
    # Train's own record of the run's checkpoints; its latest is the one the workers restore.
    try:
        latest = ray.train.Result.from_path(run_dir).metrics
    except RuntimeError:  # no record yet: a fresh run
        return 0
    return int((latest or {}).get("epoch", 0))


def load_checkpoint_state(checkpoint_dir: str) -> dict:
    """The worker state saved in a checkpoint directory (weights only)."""
    return torch.load(os.path.join(checkpoint_dir, STATE_FILE), map_location="cpu", weights_only=True)


def export_teacher(job: JobConfig, checkpoint_dir: str, out_dir: str) -> tuple[str, str]:
    """Write the teacher's EMA weights as `teacher.safetensors` (with the metadata that describes it, see
    rayflow.exports) and, as `teacher_precond.pt`, the parameter-space preconditioner 1 / (sqrt(Adam v) + 1e-8) by
    parameter name. Returns (path, sha256)."""
    state = load_checkpoint_state(checkpoint_dir)
    weights = state["ema"]["module"]
    path = os.path.join(out_dir, "teacher" + SUFFIX)
    digest = write_export(weights, path, describe(job, "teacher"))
    # parameters are the floating-point state entries in registration order (buffers: none in rayflow's nets)
    names = [k for k in state["models"]["teacher"] if k in weights and weights[k].is_floating_point()]
    precond = adam_preconditioner(state["optimizers"]["teacher"], names, eps=PRECOND_EPS)  # raises on a mismatch
    save_state_dict(precond, os.path.join(out_dir, PRECOND_NAME))
    return path, digest


def export_student(job: JobConfig, checkpoint_dir: str, out_dir: str, name: str = "student") -> tuple[str, str]:
    """Write the student's EMA weights as `<name>.safetensors`, described (k, network, schedule; rayflow.exports).
    Returns (path, sha256)."""
    state = load_checkpoint_state(checkpoint_dir)
    path = os.path.join(out_dir, name + SUFFIX)
    return path, write_export(state["ema"]["module"], path, describe(job, "student"))
