"""`python -m rayflow.evaluate` and `python -m rayflow.sample` as users run them, on a tiny random teacher
(experiment=smoke: 16 px digits, the tiny UNet) and the session's Ray head."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.orchestrate.test_generate import save_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]


def _cmd(module: str, tmp: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", f"rayflow.{module}", "experiment=smoke", f"run.storage_path={tmp / 'runs'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "run.eval_batch=8", *overrides]


def _run(cmd: list[str], env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _printed_json(stdout: str) -> dict:
    start = 0 if stdout.startswith("{\n") else stdout.rindex("\n{\n") + 1  # the last top-level object printed
    return json.loads(stdout[start:])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """A random tiny UNet in the smoke config's shape, standing in for a teacher or an exported student."""
    from rayflow.cli import job_from_hydra

    tmp = tmp_path_factory.mktemp("cli")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        job = job_from_hydra(compose(config_name="config", overrides=["experiment=smoke"]))
    return tmp, save_tiny_teacher(job, tmp / "net.pt")


@pytest.mark.slow  # two evaluations; the first trains the small feature classifier (minutes on a loaded box)
def test_evaluate_scores_a_student_at_k_and_a_teacher_at_n_steps(ray_cluster, checkpoint):
    tmp, path = checkpoint
    proc = _run(_cmd("evaluate", tmp, f"eval.checkpoint={path}", "eval.steps=2", "eval.samples=16",
                     f"eval.out={tmp / 'student.json'}", "eval.mlflow=true"), ray_cluster["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = _printed_json(proc.stdout)
    assert json.loads((tmp / "student.json").read_text())["metrics"] == out["metrics"]
    m = out["metrics"]
    assert m["eval.student.nfe"] == 2
    assert {"eval.student.fd", "eval.student.accuracy", "eval.student.s_per_1k"} <= set(m)
    assert "eval.student.fid" not in m  # no eval.inception_weights
    assert Path(out["grid"]).is_file() and out["checkpoint"] == path

    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=out["tracking_uri"]).get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke-eval-student-2steps"
    assert run.data.metrics["eval.student.fd"] == pytest.approx(m["eval.student.fd"])

    proc = _run(_cmd("evaluate", tmp, f"eval.checkpoint={path}", "eval.model=teacher", "eval.steps=3",
                     "eval.samples=16"), ray_cluster["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = _printed_json(proc.stdout)
    assert out["metrics"]["eval.teacher_ancestral.nfe"] == 3 and out["sampler"] == "ancestral"
    assert Path(out["metrics_file"]).name == "teacher_ancestral-3steps.json" and Path(out["metrics_file"]).is_file()
    # the teacher's samples are cached by (file SHA-256, sampler, steps, seed, conditions): a rerun reads them back
    cached = list((tmp / "runs" / "cache" / "teacher-samples").glob("*.pt"))
    assert len(cached) == 1
    again = _run(_cmd("evaluate", tmp, f"eval.checkpoint={path}", "eval.model=teacher", "eval.steps=3",
                      "eval.samples=16"), ray_cluster["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    fd = "eval.teacher_ancestral.fd"
    assert _printed_json(again.stdout)["metrics"][fd] == out["metrics"][fd]
    assert list((tmp / "runs" / "cache" / "teacher-samples").glob("*.pt")) == cached


def test_sample_writes_npz_and_pngs_identically_on_any_worker_count(ray_cluster, checkpoint):
    tmp, path = checkpoint
    common = (f"eval.checkpoint={path}", "eval.steps=2", "eval.samples=10", "eval.labels=[3,7]")
    proc = _run(_cmd("sample", tmp, *common, f"eval.out={tmp / 'x.npz'}"), ray_cluster["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with np.load(tmp / "x.npz") as z:
        images, pixels, labels, meta = z["images"], z["images_uint8"], z["labels"], json.loads(str(z["meta"]))
    assert images.shape == (10, 1, 16, 16) and pixels.shape == (10, 16, 16, 1) and pixels.dtype == np.uint8
    assert labels.tolist() == [3, 7] * 5 and meta["steps"] == 2 and meta["sampler"] == "student"

    proc = _run(_cmd("sample", tmp, *common, "eval.workers=2", f"eval.out={tmp / 'pngs'}/"), ray_cluster["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = sorted(p.name for p in (tmp / "pngs").glob("0*.png"))
    assert files[:2] == ["000000_class3.png", "000001_class7.png"] and len(files) == 10
    for i, name in enumerate(files):
        assert np.array_equal(np.asarray(Image.open(tmp / "pngs" / name)), pixels[i, ..., 0]), name
    assert (tmp / "pngs" / "grid.png").is_file() and (tmp / "pngs" / "meta.json").is_file()


# (more bad values are checked in-process in tests/evaluation/test_fid_wiring.py; each start here costs seconds)
@pytest.mark.parametrize("module,overrides,needle", [
    ("sample", ["eval.checkpoint={path}"], "eval.out"),
    ("evaluate", ["eval.checkpoint={path}", "eval.inception_weights={tmp}/pt_inception.pth"], "pytorch-fid/releases"),
])
def test_bad_command_lines_exit_2_naming_the_key(checkpoint, module, overrides, needle):
    tmp, path = checkpoint
    proc = _run(_cmd(module, tmp, *(o.format(tmp=tmp, path=path) for o in overrides)))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert needle in proc.stderr and "FIX THIS" in proc.stderr
