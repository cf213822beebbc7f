"""`python -m rayflow.report sweep=<name> [tracking.uri=...]`: a sweep's comparison from MLflow.

Reads the newest parent run of the sweep and its trial runs back from the tracking store, writes
`report.md` (a table: metric per step count and learning-rate ratio) and `report.png` (the metric against
k, one line per ratio) into `<run.storage_path>/<sweep>/report/`, and logs both to the parent run.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from rayflow.cli import UserError, entry_point, sweep_from_hydra


@entry_point("tune")
def main(cfg: DictConfig) -> None:
    job, sweep = sweep_from_hydra(cfg)
    from rayflow.orchestrate.report import find_sweep, sweep_report

    uri = job.tracking.resolved_uri()
    try:
        parent = find_sweep(uri, job.tracking.experiment, sweep.name)
        out = sweep_report(uri, parent, os.path.join(job.run.absolute_storage(), sweep.name, "report"),
                           metric=sweep.metric)
    except LookupError as e:
        raise UserError(str(e)) from e
    print(out["table"])
    print(f"Wrote {out['markdown']} and {out['plot']}; logged both to MLflow run {parent} under report/.")


if __name__ == "__main__":
    main()
