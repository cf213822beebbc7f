"""The main job end to end on a real Ray head: `python -m rayflow.train`, resume, `ray job submit`, MLflow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train_cmd(tmp: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rayflow.train", "experiment=smoke", f"run.storage_path={tmp / 'runs'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *overrides]


def _summary(stdout: str) -> dict:
    start = stdout.index("{\n")
    end = stdout.index("\n}\n", start) + 2
    return json.loads(stdout[start:end])


def _client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


@pytest.fixture(scope="module")
def smoke_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    t0 = time.perf_counter()
    proc = subprocess.run(_train_cmd(tmp), cwd=ROOT, env=ray_cluster["env"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp, _summary(proc.stdout), proc.stdout, time.perf_counter() - t0


def test_smoke_demo_runs_and_says_where_to_look(smoke_run):
    tmp, out, stdout, wall = smoke_run
    assert "mlflow ui --backend-store-uri" in stdout and out["run_id"] in stdout
    experiment = _client(tmp).get_experiment_by_name("rayflow").experiment_id
    assert f"Open the runs table: http://127.0.0.1:5000/#/experiments/{experiment}/runs" in stdout
    assert out["teacher_train"]["images_seen"] == 2048 and out["distill_train"]["images_seen"] == 1024
    for key in ("teacher_path", "student_path"):
        assert Path(out[key]).is_file()
    m = out["metrics"]
    for name in ("teacher_ancestral", "teacher_ddim", "student"):
        assert {f"eval.{name}.fd", f"eval.{name}.accuracy", f"eval.{name}.precision"} <= set(m)
    assert m["eval.student.nfe"] == 2 and m["eval.teacher_ancestral.nfe"] == 16
    print(f"smoke demo wall time {wall:.1f} s")


def test_mlflow_run_holds_params_metrics_and_artifacts(smoke_run):
    tmp, out, _, _ = smoke_run
    client = _client(tmp)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke"
    p = run.data.params
    assert p["distill.steps"] == "2" and p["task"] == "demo" and p["data.source"] == "digits"
    assert run.data.tags["rayflow.git_commit"]
    # metrics logged on the controller while training, by images seen
    hist = client.get_metric_history(out["run_id"], "loss/student")
    assert [h.step for h in hist] == [512, 1024]
    assert client.get_metric_history(out["run_id"], "teacher.loss/teacher")
    for key in ("images_per_s", "data_wait_share", "grad_norm/student", "eval.student.fd"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client.list_artifacts(out["run_id"], "images/samples")}
    assert {"images/samples/student.png", "images/samples/teacher_ancestral.png"} <= arts
    assert [a.path for a in client.list_artifacts(out["run_id"], "student")] == ["student/student.safetensors"]


def test_rerun_after_interrupted_run_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    cmd = _train_cmd(tmp_path, "task=teacher", "run.name=resume", "teacher.train_images=6144",
                     "run.checkpoint_every_images=1024", "run.report_every_images=1024")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ray_cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    run_dir = tmp_path / "runs" / "resume-teacher"
    deadline = time.time() + 300
    while not list(run_dir.glob("checkpoint_*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the run finished before it could be interrupted; make it longer"
    proc.send_signal(signal.SIGINT)  # a driver stopped mid-run (SIGINT lets Ray tear the run down)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = subprocess.run(cmd, cwd=ROOT, env=ray_cluster["env"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = _summary(done.stdout)
    train = out["teacher_train"]
    assert train["resumed"] is True
    assert train["images_seen"] == 6144 and train["updates"] == 6144 // 64  # exact: nothing skipped or repeated
    runs = _client(tmp_path).search_runs([_client(tmp_path).get_experiment_by_name("rayflow").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the rerun continued the same MLflow run


def test_ray_job_submit_runs_the_smoke_job(ray_cluster, tmp_path):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", ".", "--",
           "python", "-m", "rayflow.train", "experiment=smoke", "run.name=submitted",
           f"run.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    deadline = time.time() + 120
    while True:  # the head's job agent comes up some seconds after the head itself
        proc = subprocess.run(cmd, cwd=ROOT, env=ray_cluster["env"], capture_output=True, text=True, timeout=900)
        if "No available agent" not in proc.stderr + proc.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout.lower()
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("rayflow").experiment_id])
    assert [r.info.run_name for r in runs] == ["submitted"] and runs[0].info.status == "FINISHED"
    assert "eval.student.fd" in runs[0].data.metrics


@pytest.mark.slow  # a teacher run on an image folder: about a minute
def test_skipped_files_reach_mlflow_as_a_count_and_a_list(ray_cluster, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(40):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    done = subprocess.run(_train_cmd(tmp_path, "task=teacher", "run.name=skips", "data.source=image_folder",
                                     f"data.path={tmp_path / 'imgs'}", "data.channels=3", "data.num_classes=2",
                                     "teacher.train_images=128", "data.batch_size=32"),
                          cwd=ROOT, env=ray_cluster["env"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out = _summary(done.stdout)
    client = _client(tmp_path)
    assert client.get_run(out["run_id"]).data.metrics["teacher.data.skipped_files"] == 1
    local = client.download_artifacts(out["run_id"], "data/skipped-teacher.json", str(tmp_path))
    listed = json.loads(Path(local).read_text())
    assert [Path(s["path"]).name for s in listed] == ["broken.jpg"] and listed[0]["reason"]


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
    assert proc.poll() is None, "the first run ended before the check; make it longer"


def test_second_driver_of_the_same_run_is_refused_and_the_first_is_unharmed(ray_cluster, tmp_path):
    cmd = _train_cmd(tmp_path, "task=teacher", "run.name=twice", "teacher.train_images=3072")
    first = subprocess.Popen(cmd, cwd=ROOT, env=ray_cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    _wait_for(lambda: (tmp_path / "runs" / "twice" / "lease.json").exists(), first)
    t0 = time.perf_counter()
    second = subprocess.run(cmd, cwd=ROOT, env=ray_cluster["env"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-3000:]
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith("rayflow: run 'twice'") and f"pid {first.pid}" in line and "FIX THIS" in line
    assert "Traceback" not in second.stderr
    print(f"refused in {time.perf_counter() - t0:.1f} s: {line}")
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-5000:]
    assert _summary(out)["teacher_train"]["images_seen"] == 3072
    assert not (tmp_path / "runs" / "twice" / "lease.json").exists()


def test_rerun_after_kill_9_of_the_driver_takes_the_lease_over_and_resumes(ray_cluster, tmp_path):
    cmd = _train_cmd(tmp_path, "task=teacher", "run.name=killed", "teacher.train_images=6144",
                     "run.checkpoint_every_images=1024", "run.report_every_images=1024")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ray_cluster["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(lambda: bool(list((tmp_path / "runs" / "killed-teacher").glob("checkpoint_*"))), proc)
    proc.send_signal(signal.SIGKILL)  # no cleanup at all: the lease file stays behind
    proc.wait()
    assert (tmp_path / "runs" / "killed" / "lease.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=ray_cluster["env"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    train = _summary(done.stdout)["teacher_train"]
    assert train["resumed"] is True and train["images_seen"] == 6144 and train["updates"] == 6144 // 64
