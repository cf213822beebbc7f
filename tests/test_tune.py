"""`python -m rayflow.tune` end to end on the session's Ray head, tracked by a real `mlflow server`.

One 4-trial sweep (k in {1, 2} x lr ratio in {0.5, 2}, the smoke experiment) is checked for its MLflow
parent/child runs and its report; a 2-trial sweep is interrupted with SIGINT and resumed by relaunching.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tune_cmd(storage: Path, uri: str, *overrides: str, module: str = "rayflow.tune") -> list[str]:
    return [sys.executable, "-m", module, "experiment=smoke", "sweep=smoke", f"run.storage_path={storage}",
            f"tracking.uri={uri}", *overrides]


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, sweep: str) -> tuple[object, list]:
    """(parent run, child runs) of the newest sweep of that name."""
    c = _client(uri)
    exp = c.get_experiment_by_name("rayflow")
    parents = c.search_runs([exp.experiment_id], filter_string=f"tags.`rayflow.sweep` = '{sweep}' and "
                            "tags.`rayflow.sweep_role` = 'parent'")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    children = c.search_runs([exp.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


@pytest.fixture(scope="module")
def sweep_run(ray_cluster, mlflow_server, tmp_path_factory):
    storage = tmp_path_factory.mktemp("sweep") / "runs"
    t0 = time.perf_counter()
    proc = subprocess.run(_tune_cmd(storage, mlflow_server), cwd=ROOT, env=ray_cluster["env"],
                          capture_output=True, text=True, timeout=1500)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"4-trial smoke sweep: {wall:.0f} s")
    return storage, proc.stdout


@pytest.mark.slow  # a real 4-trial / 2-trial sweep: minutes
def test_every_trial_is_a_child_run_with_params_and_metrics(sweep_run, mlflow_server):
    parent, children = _runs(mlflow_server, "smoke")
    assert parent.info.status == "FINISHED"
    # the sweep ends by printing the compare view of its trials, on the tracking server itself
    line = next(ln for ln in sweep_run[1].splitlines() if ln.startswith("Compare the trials: "))
    assert line.startswith(f"Compare the trials: {mlflow_server}/#/compare-runs?runs=")
    assert all(c.info.run_id in line for c in children)
    assert parent.data.tags["rayflow.sweep_keys"] == "distill.steps,distill.lr_ratio"
    assert "eval.teacher_ancestral.fd" in parent.data.metrics  # the baseline, evaluated once
    grid = {(p.data.params["distill.steps"], p.data.params["distill.lr_ratio"]) for p in children}
    assert grid == {("1", "0.5"), ("1", "2.0"), ("2", "0.5"), ("2", "2.0")}
    param_keys = {frozenset(c.data.params) for c in children}
    assert len(param_keys) == 1, "trials must share param names for MLflow's compare view"
    assert {"distill.steps", "distill.lr_ratio", "data.source", "run.eval_every_images"} <= next(iter(param_keys))
    completed = 0
    for c in children:
        tags, m = c.data.tags, c.data.metrics
        assert tags["rayflow.sweep"] == "smoke" and tags["rayflow.trial_id"]
        assert tags["rayflow.overrides"] == (f"distill.lr_ratio={c.data.params['distill.lr_ratio']} "
                                             f"distill.steps={c.data.params['distill.steps']}")
        assert c.info.status == "FINISHED", (c.info.run_name, c.info.status)
        assert "eval.proxy_fd" in m and m["eval.proxy_fd"] > 0  # what ASHA ranked by
        if tags["rayflow.trial_status"] == "completed":
            completed += 1
            assert m["images_seen"] == 1024 and m["eval.student.fd"] > 0
            assert m["eval.student.nfe"] == float(c.data.params["distill.steps"])
            client = _client(mlflow_server)
            history = client.get_metric_history(c.info.run_id, "eval.proxy_fd")
            assert sorted(h.step for h in history) == [512, 1024]  # every eval_every_images, and at the end
            # each in-training evaluation's sample grid, and the best checkpoint's weights beside the last
            grids = {a.path for a in client.list_artifacts(c.info.run_id, "images/progress")}
            assert grids == {"images/progress/step_0000000512.png", "images/progress/step_0000001024.png"}
            weights = {a.path for a in client.list_artifacts(c.info.run_id, "student")}
            assert weights == {"student/student.safetensors", "student/student_best.safetensors"}
            best = min(h.value for h in history)
            assert m["best.eval.proxy_fd"] == pytest.approx(best)
        else:
            # stopped by ASHA at a rung: before the last image, or (on a loaded box, when the stop decision lands
            # at the last report) before the final evaluation
            assert tags["rayflow.trial_status"] == "early_stopped"
            assert m["images_seen"] < 1024 or "eval.student.fd" not in m, (m["images_seen"], sorted(m))
    assert completed >= 1  # the first trial to reach the rung always continues


@pytest.mark.slow  # a real 4-trial / 2-trial sweep: minutes
def test_report_table_and_plot_are_written_and_logged(sweep_run, mlflow_server):
    storage, stdout = sweep_run
    report = storage / "smoke" / "report"
    table = (report / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "status" not in line]
    assert len(rows) == 4 and table in stdout
    assert (report / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parent, _ = _runs(mlflow_server, "smoke")
    logged = {a.path for a in _client(mlflow_server).list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report/report.md", "report/report.png"}


@pytest.mark.slow  # a real 4-trial / 2-trial sweep: minutes
def test_report_command_rereads_the_sweep(sweep_run, mlflow_server, ray_cluster):
    storage, _ = sweep_run
    proc = subprocess.run(_tune_cmd(storage, mlflow_server, module="rayflow.report"), cwd=ROOT,
                          env=ray_cluster["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| distill.lr_ratio | distill.steps | status |" in proc.stdout
    missing = subprocess.run(_tune_cmd(storage, mlflow_server, "sweep.name=nope", module="rayflow.report"),
                             cwd=ROOT, env=ray_cluster["env"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no sweep named 'nope'" in missing.stderr


@pytest.mark.slow  # a real 4-trial / 2-trial sweep: minutes
def test_interrupted_sweep_resumes_where_it_stopped(ray_cluster, mlflow_server, tmp_path):
    storage = tmp_path / "runs"
    # two trials, run to the end (fifo), so the first one finishes before the interrupt
    cmd = _tune_cmd(storage, mlflow_server, "sweep.name=resume", "sweep.scheduler=fifo", "~sweep.space",
                    "+sweep.space={distill.steps: {grid: [1, 2]}}", "sweep.teacher_baseline=false")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ray_cluster["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 1200
        while True:  # interrupt once the first trial is done and the second has started
            assert proc.poll() is None, proc.communicate()[1][-5000:]
            assert time.time() < deadline, "the first trial did not finish in time"
            try:
                _, children = _runs(mlflow_server, "resume")
            except (AssertionError, AttributeError):
                children = []
            if len(children) == 2 and any(c.info.status == "FINISHED" for c in children):
                break
            time.sleep(2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-5000:]
    assert "interrupted; run the same command again" in err
    parent, children = _runs(mlflow_server, "resume")
    assert parent.info.status == "KILLED"
    done_first = {c.info.run_id: c.info.end_time for c in children if c.info.status == "FINISHED"}
    assert len(done_first) == 1

    again = subprocess.run(cmd, cwd=ROOT, env=ray_cluster["env"], capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-5000:]
    assert "resuming sweep resume" in again.stdout + again.stderr
    parent, children = _runs(mlflow_server, "resume")
    assert parent.info.status == "FINISHED" and len(children) == 2  # the same runs, resumed, no duplicates
    assert all(c.info.status == "FINISHED" and c.data.tags["rayflow.trial_status"] == "completed" for c in children)
    for c in children:
        if c.info.run_id in done_first:  # the finished trial was not run again
            assert c.info.end_time == done_first[c.info.run_id]
        else:  # the interrupted trial went on from its checkpoint, to exactly the configured images
            assert c.data.metrics["images_seen"] == 1024
    state = json.loads((storage / "resume" / "rayflow_sweep.json").read_text())
    assert state["sweep"]["name"] == "resume"


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    import rayflow.train  # noqa: F401  (registers the rayflow_asset resolver)
    from rayflow.cli import sweep_from_hydra as configs_from_hydra

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return configs_from_hydra(compose("tune", overrides=list(overrides)))


def test_shipped_sweeps_compose_into_valid_configs():
    job, sweep = _compose("sweep=steps_lr")
    assert sweep.space == {"distill.steps": {"grid": [1, 2, 4, 8]}, "distill.lr_ratio": {"grid": [0.5, 1.0, 2.0]}}
    assert job.data.source == "mnist" and job.teacher.checkpoint  # the main job's distillation
    job, sweep = _compose("experiment=smoke", "sweep=smoke", "sweep.teacher_baseline=false")
    assert sweep.name == "smoke" and not sweep.teacher_baseline and job.data.source == "digits"
    # the text demo's guidance sweep: every grid value validates into a text-conditional job
    job, sweep = _compose("experiment=text_demo", "sweep=guidance")
    assert sweep.space["teacher.guidance_scale"] == {"grid": [1.0, 2.0, 4.0]} and job.data.text


@pytest.mark.parametrize(
    "override, message",
    [
        ("+sweep.space={distill.stepz: {grid: [1]}}", "'sweep.space.distill.stepz'"),
        ("+sweep.space={run.name: {grid: [a, b]}}", "leaving run.name out of the space"),
        ("+sweep.space={distill.lr_ratio: {range: [1, 2]}}", "giving exactly one of"),
        ("+sweep.space={distill.lr_ratio: {loguniform: [0, 2]}}", "low bound > 0"),
        ("+sweep.space={distill.steps: {grid: [4, 0]}}", "value 0 makes an invalid job"),
        ("sweep.scheduler=hyperband", "'sweep.scheduler'"),
        ("sweep.max_concurrent_trials=0", "'sweep.max_concurrent_trials'"),
    ],
)
def test_bad_sweeps_fail_before_anything_starts(override, message):
    from rayflow.config import ConfigError

    replace = ("~sweep.space",) if override.startswith("+sweep.space") else ()  # a new space, not a merge
    with pytest.raises(ConfigError, match="FIX THIS") as err:
        _compose("sweep=steps_lr", *replace, override)
    assert message in str(err.value)
