"""`python -m rayflow.evaluate [eval.checkpoint=PATH] [eval.model=student|teacher] [eval.sampler=...] [eval.steps=N]`:
score any checkpoint (a teacher at N steps, a student at k steps) as the final evaluation of a run does.

Same config as `python -m rayflow.train` (experiment=..., data=..., model=... must describe the checkpoint's
network). Without eval.checkpoint it evaluates this run.name's exported student (or teacher). Prints the metrics
as JSON and writes them to eval.out (default .rayflow/eval/<run.name>/<row>-<steps>steps.json) with a PNG grid
of the samples beside it; eval.mlflow=true also logs them to an MLflow run `<run.name>-eval-<row>-<steps>steps`.
With eval.inception_weights set, FID and Inception Score are included.
"""

from __future__ import annotations

import json
import os

from omegaconf import DictConfig

from rayflow.cli import entry_point, job_from_hydra, typed_overrides
from rayflow.config import EvalTarget, JobConfig
from rayflow.exports import apply_meta, read_meta, warn_bare


def job_and_target(cfg: DictConfig, command: str) -> tuple[JobConfig, EvalTarget]:
    """Hydra's config -> (validated JobConfig, the checkpoint and sampling that `command` uses). A rayflow export
    says what network, data shape and step count it holds: those come from the file (see rayflow.exports)."""
    from rayflow.orchestrate.generate import load_for_sampling

    job = job_from_hydra(cfg)
    target = job.eval.target(job, command)
    meta = read_meta(target.checkpoint)
    if meta is not None:
        job = apply_meta(job, meta, target.checkpoint, typed_overrides())
        target = job.eval.target(job, command)
    load_for_sampling(job, target.checkpoint, target.model)  # a file that does not fit fails here, before Ray
    if meta is None and target.checkpoint.endswith(".pt"):
        warn_bare(target.checkpoint)
    return job, target


@entry_point("config")
def main(cfg: DictConfig) -> None:
    job, target = job_and_target(cfg, "evaluate")
    from rayflow import track  # Ray, torch and MLflow load only for a valid config
    from rayflow.orchestrate.evaluate import evaluate_checkpoint
    from rayflow.orchestrate.jobs import ensure_ray

    ensure_ray()
    ev = evaluate_checkpoint(job, target)
    stem = f"{ev['name']}-{target.steps}steps"
    out = os.path.abspath(job.eval.out or os.path.join(".rayflow", "eval", job.run.name, f"{stem}.json"))
    grid = os.path.splitext(out)[0] + ".png"
    x = ev["samples"][ev["name"]]
    track.save_image_grid(x[: job.tracking.sample_grid], grid)
    result = {"checkpoint": target.checkpoint, "model": target.model, "sampler": target.sampler,
              "steps": target.steps, "samples": target.samples, "seed": target.seed, "metrics": ev["metrics"],
              "classifier_sha256": ev["classifier_sha256"], "fid_reference": ev["fid_reference"],
              "metrics_file": out, "grid": grid}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    if job.eval.mlflow:
        uri = job.tracking.resolved_uri()
        run_id = track.start_run(job.tracking, f"{job.run.name}-eval-{stem}", job.flat(),
                                 tags={"rayflow.task": "evaluate"})
        try:
            track.log_metrics(uri, run_id, ev["metrics"], step=0)
            track.log_artifact_file(uri, run_id, out, "eval")
            track.log_artifact_file(uri, run_id, grid, "eval")
            track.end_run(uri, run_id, "FINISHED")
        except BaseException:
            track.end_run(uri, run_id, "FAILED")
            raise
        result |= {"run_id": run_id, "tracking_uri": uri}
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
