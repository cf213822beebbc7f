"""`python -m rayflow.report sweep=<name> [tracking.uri=...]`: a sweep's comparison from MLflow.

Reads the newest parent run of the sweep and its trial runs back from the tracking store, writes
`report.md` (a table: metric per step count and learning-rate ratio) and `report.png` (the metric against
k, one line per ratio) into `<run.storage_path>/<sweep>/report/`, and logs both to the parent run.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from rayflow.train import config_or_exit
from rayflow.tune import configs_from_hydra


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
def main(cfg: DictConfig) -> None:
    job, sweep = config_or_exit(configs_from_hydra, cfg)
    from rayflow.orchestrate.report import find_sweep, sweep_report

    uri = job.tracking.resolved_uri()
    try:
        parent = find_sweep(uri, job.tracking.experiment, sweep.name)
        out = sweep_report(uri, parent, os.path.join(job.run.absolute_storage(), sweep.name, "report"),
                           metric=sweep.metric)
    except LookupError as e:
        print(f"rayflow: {e}", file=sys.stderr)
        sys.exit(2)
    print(out["table"])
    print(f"Wrote {out['markdown']} and {out['plot']}; logged both to MLflow run {parent} under report/.")


if __name__ == "__main__":
    main()
