"""A sweep's comparison read back from MLflow: a markdown table and a PNG plot of the evaluation metric
against the student's step count, one line per value of the other swept keys (the learning-rate ratio)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from rayflow import track

SWEEP_TAG = "rayflow.sweep"
ROLE_TAG = "rayflow.sweep_role"  # parent | trial
TRIAL_TAG = "rayflow.trial_id"
STATUS_TAG = "rayflow.trial_status"  # completed | early_stopped | failed
OVERRIDES_TAG = "rayflow.overrides"  # the trial as `python -m rayflow.train` arguments
KEYS_TAG = "rayflow.sweep_keys"  # on the parent: the swept keys, comma-separated

STEPS_KEY = "distill.steps"
REPORT_MD, REPORT_PNG = "report.md", "report.png"


@dataclass
class TrialRow:
    name: str
    values: dict[str, str]  # swept key -> param value as logged
    status: str  # completed | early_stopped | failed | interrupted
    images_seen: float
    proxy: float  # the sweep metric at the trial's last in-training evaluation
    final: dict[str, float] = field(default_factory=dict)  # eval.student.* of the final evaluation


def find_sweep(uri: str, experiment: str, sweep_name: str) -> str:
    """The newest parent run of sweep `sweep_name` in the experiment."""
    c = track.client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = [] if exp is None else c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`{ROLE_TAG}` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise LookupError(
            f"no sweep named {sweep_name!r} in MLflow experiment {experiment!r} at {uri}; FIX THIS by "
            "launching it with `python -m rayflow.tune sweep=...` or pointing tracking.uri/experiment at its store"
        )
    return runs[0].info.run_id


def final_metric_name(metric: str) -> str:
    """eval.proxy_fd (in training, few samples) -> eval.student.fd (final evaluation, eval_samples)."""
    return "eval.student." + metric.removeprefix("eval.").removeprefix("proxy_")


def collect(uri: str, parent_run_id: str, metric: str) -> tuple[list[str], list[TrialRow], dict[str, float]]:
    """(swept keys, one row per trial, the parent's metrics) from MLflow."""
    parent = track.client(uri).get_run(parent_run_id)
    keys = [k for k in parent.data.tags.get(KEYS_TAG, "").split(",") if k]
    rows = []
    for run in track.child_runs(uri, parent_run_id):
        m, tags = run.data.metrics, run.data.tags
        status = tags.get(STATUS_TAG) or ("interrupted" if run.info.status in ("RUNNING", "KILLED") else "failed")
        rows.append(TrialRow(
            name=run.info.run_name,
            values={k: run.data.params.get(k, "?") for k in keys},
            status=status,
            images_seen=m.get("images_seen", float("nan")),
            proxy=m.get(metric, float("nan")),
            final={k.removeprefix("eval.student."): v for k, v in m.items() if k.startswith("eval.student.")},
        ))
    return keys, rows, parent.data.metrics


def _axes(keys: list[str]) -> tuple[str, list[str]]:
    x = STEPS_KEY if STEPS_KEY in keys else keys[0]
    return x, [k for k in keys if k != x]


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _fmt(v: float, digits: int = 4) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def markdown_table(keys: list[str], rows: list[TrialRow], metric: str, parent_metrics: dict[str, float]) -> str:
    x, series = _axes(keys)
    stat = final_metric_name(metric).rsplit(".", 1)[-1]
    head = [*series, x, "status", "images", f"{metric} (last)", f"final {stat}", "accuracy", "precision",
            "recall", "s / 1k samples"]
    order = sorted(rows, key=lambda r: ([_num(r.values[k]) for k in series], _num(r.values[x])))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in order:
        f = r.final
        cells = [*(r.values[k] for k in series), r.values[x], r.status, _fmt(r.images_seen, 8), _fmt(r.proxy),
                 _fmt(f.get(stat, math.nan)), _fmt(f.get("accuracy", math.nan), 3),
                 _fmt(f.get("precision", math.nan), 3), _fmt(f.get("recall", math.nan), 3),
                 _fmt(f.get("s_per_1k", math.nan), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    base = parent_metrics.get(f"eval.teacher_ancestral.{stat}")
    if base is not None:
        nfe = parent_metrics.get("eval.teacher_ancestral.nfe", math.nan)
        lines += ["", f"Teacher baseline (ancestral, {_fmt(nfe)} steps): {stat} {_fmt(base)}."]
    ddim = parent_metrics.get(f"eval.teacher_ddim.{stat}")
    if ddim is not None:
        lines += [f"Teacher DDIM at {_fmt(parent_metrics.get('eval.teacher_ddim.nfe', math.nan))} steps: "
                  f"{stat} {_fmt(ddim)}."]
    lines += ["", f"'final {stat}': the trial's final evaluation (run.eval_samples samples); '{metric} (last)': "
              "its last in-training evaluation (run.eval_proxy_samples samples, what early stopping used). "
              "Early-stopped trials have no final evaluation."]
    return "\n".join(lines) + "\n"


def plot(keys: list[str], rows: list[TrialRow], metric: str, parent_metrics: dict[str, float], path: str) -> None:
    """Final metric (hollow marker: last in-training value of an early-stopped trial) against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, series = _axes(keys)
    stat = final_metric_name(metric).rsplit(".", 1)[-1]
    groups: dict[tuple, list[TrialRow]] = {}
    for r in rows:
        groups.setdefault(tuple(r.values[k] for k in series), []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, members in sorted(groups.items(), key=lambda kv: [_num(v) for v in kv[0]]):
        members.sort(key=lambda r: _num(r.values[x]))
        xs = [_num(r.values[x]) for r in members]
        ys = [r.final.get(stat, r.proxy) for r in members]
        name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(series, label)) or "trials"
        line, = ax.plot(xs, ys, marker="o", label=name)
        hollow = [(a, b) for a, b, r in zip(xs, ys, members) if stat not in r.final]
        if hollow:
            ax.scatter(*zip(*hollow), s=70, facecolors="white", edgecolors=line.get_color(), zorder=3)
    base = parent_metrics.get(f"eval.teacher_ancestral.{stat}")
    if base is not None:
        nfe = parent_metrics.get("eval.teacher_ancestral.nfe", math.nan)
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"teacher, {_fmt(nfe)} steps")
    if x == STEPS_KEY:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{stat} (hollow: early-stopped, last {metric})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def sweep_report(uri: str, parent_run_id: str, out_dir: str, *, metric: str) -> dict[str, Any]:
    """Write report.md and report.png into out_dir and log both to the parent run under 'report/'."""
    keys, rows, parent_metrics = collect(uri, parent_run_id, metric)
    if not rows:
        raise LookupError(f"sweep run {parent_run_id} has no trial runs yet; FIX THIS by letting the sweep run")
    os.makedirs(out_dir, exist_ok=True)
    md, png = os.path.join(out_dir, REPORT_MD), os.path.join(out_dir, REPORT_PNG)
    table = markdown_table(keys, rows, metric, parent_metrics)
    with open(md, "w") as f:
        f.write(table)
    plot(keys, rows, metric, parent_metrics, png)
    for p in (md, png):
        track.log_artifact_file(uri, parent_run_id, p, "report")
    return {"markdown": md, "plot": png, "table": table, "trials": len(rows)}
