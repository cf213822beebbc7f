"""`python -m rayflow.train [task=demo|teacher|distill] [overrides]`: the main job (Hydra entry point).

With no arguments: the offline demo on built-in MNIST digits (train or reuse a teacher, distil an 8-step
student, evaluate both, log everything to MLflow). `experiment=smoke` runs the same path in under 2 minutes.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from rayflow.cli import entry_point, job_from_hydra


@entry_point("config")
def main(cfg: DictConfig) -> None:
    job = job_from_hydra(cfg)
    from rayflow.orchestrate.jobs import run_job  # Ray and torch load only for a valid config

    out = run_job(job).to_dict()
    summary = {k: v for k, v in out.items() if k != "metrics"}
    print(json.dumps({"metrics": out["metrics"], **summary}, indent=2, default=str))
    print(f"\nMLflow run {out['run_id']} in {out['tracking_uri']} (experiment '{job.tracking.experiment}').")
    if not out["tracking_uri"].startswith(("http://", "https://")):
        print(f"Serve it with: mlflow ui --backend-store-uri {out['tracking_uri']}")
    print(f"Open the runs table: {out['mlflow_ui']}")


if __name__ == "__main__":
    main()
