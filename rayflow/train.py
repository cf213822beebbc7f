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


def plain(cfg: DictConfig) -> dict:
    """Hydra's composed config as plain dicts and lists, interpolations resolved, without `hydra`."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    container.pop("hydra", None)
    return container


def job_from_hydra(cfg: DictConfig) -> JobConfig:
    """Hydra's composed config -> validated JobConfig (entry points are the only modules seeing DictConfig)."""
    return JobConfig.from_dict(plain(cfg))


def config_or_exit(parse, cfg: DictConfig):
    """parse(cfg), or exit 2 with the ConfigError's one line (key, value, how to fix it) on stderr."""
    try:
        return parse(cfg)
    except ConfigError as e:
        print(f"rayflow: {e}", file=sys.stderr)
        sys.exit(2)


def exit_on_user_error(fn, *args):
    """fn(*args), or exit 2 with one line when another driver holds the run's lease (no traceback)."""
    from rayflow.orchestrate.lease import LeaseHeld

    try:
        return fn(*args)
    except LeaseHeld as e:
        print(f"rayflow: {e}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    job = config_or_exit(job_from_hydra, cfg)
    from rayflow.orchestrate.jobs import run_job  # Ray and torch load only for a valid config

    out = exit_on_user_error(run_job, job)
    summary = {k: v for k, v in out.items() if k != "metrics"}
    print(json.dumps({"metrics": out.get("metrics", {}), **summary}, indent=2, default=str))
    print(
        f"\nMLflow run {out['run_id']} in {out['tracking_uri']} (experiment '{job.tracking.experiment}').\n"
        f"Open it with: mlflow ui --backend-store-uri {out['tracking_uri']}"
    )


if __name__ == "__main__":
    main()
