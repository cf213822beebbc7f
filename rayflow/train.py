"""`python -m rayflow.train [task=demo|teacher|distill] [overrides]`: the main job (Hydra entry point).

With no arguments: the offline demo on built-in MNIST digits (train or reuse a teacher, distil an 8-step
student, evaluate both, log everything to MLflow). `experiment=smoke` runs the same path in under 2 minutes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rayflow.config import ConfigError, JobConfig

ASSETS = Path(__file__).resolve().parent / "assets"
# `${rayflow_asset:teacher-mnist16.pt}` in YAML: a file shipped inside the package (the demo's teacher).
OmegaConf.register_new_resolver("rayflow_asset", lambda name: str(ASSETS / name), replace=True)


def job_from_hydra(cfg: DictConfig) -> JobConfig:
    """Hydra's composed config -> validated JobConfig (the only place that sees DictConfig)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    container.pop("hydra", None)
    return JobConfig.from_dict(container)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        job = job_from_hydra(cfg)
    except ConfigError as e:
        print(f"rayflow: {e}", file=sys.stderr)
        sys.exit(2)
    from rayflow.orchestrate.jobs import run_job  # Ray and torch load only for a valid config

    out = run_job(job)
    summary = {k: v for k, v in out.items() if k != "metrics"}
    print(json.dumps({"metrics": out.get("metrics", {}), **summary}, indent=2, default=str))
    print(
        f"\nMLflow run {out['run_id']} in {out['tracking_uri']} (experiment '{job.tracking.experiment}').\n"
        f"Open it with: mlflow ui --backend-store-uri {out['tracking_uri']}"
    )


if __name__ == "__main__":
    main()
