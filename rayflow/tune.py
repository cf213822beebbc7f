"""`python -m rayflow.tune [sweep=<name>] [training overrides]`: a Ray Tune sweep of distillation runs.

Every trial is a full distillation on Ray Train with the trial's values of the swept keys (the same dotted
keys `python -m rayflow.train` takes), evaluated during training (early stopping) and at the end. MLflow
gets a parent run per sweep and a child run per trial; the comparison (markdown table + PNG) is logged to
the parent when the sweep ends, and `python -m rayflow.report sweep=<name>` rewrites it at any time.
Relaunching the same command resumes an interrupted sweep.
"""

from __future__ import annotations

import json
import sys

from omegaconf import DictConfig

from rayflow.cli import entry_point, sweep_from_hydra


@entry_point("tune")
def main(cfg: DictConfig) -> None:
    job, sweep = sweep_from_hydra(cfg)
    from rayflow.orchestrate.sweep import run_sweep  # Ray and torch load only for a valid config

    out = run_sweep(job, sweep)
    print(json.dumps(out.to_dict(), indent=2, default=str))
    if out.report.get("table"):
        print("\n" + out.report["table"])
    if not out.complete:
        print(f"\nSweep '{sweep.name}' interrupted; run the same command again to resume it.", file=sys.stderr)
        sys.exit(130)
    print(f"MLflow parent run {out.parent_run_id} in {out.tracking_uri} (experiment "
          f"'{job.tracking.experiment}').")
    if not out.tracking_uri.startswith(("http://", "https://")):
        print(f"Serve it with: mlflow ui --backend-store-uri {out.tracking_uri}")
    print(f"Compare the trials: {out.mlflow_ui}")

if __name__ == "__main__":
    main()
