"""`pip install` of the built wheel (not editable) runs the CLI from an empty directory: the Hydra configs ship
inside the package. The wheel goes into a fresh venv; its dependencies come from this environment through a
.pth line (a path that is not a site directory: this environment's editable-install hook is not loaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.e2e
def test_the_wheel_runs_the_smoke_experiment_from_an_empty_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(ROOT), "-w", str(dist)],
                   check=True, timeout=600, cwd=tmp_path)
    wheel = next(dist.glob("rayflow-*.whl"))
    for manifest in ("rayjob-train.yaml", "rayjob-sweep.yaml"):  # the KubeRay jobs install this very file name
        assert f"/{wheel.name}\n" in (ROOT / "clusters" / "kuberay" / manifest).read_text(), manifest
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([str(py), "-c", "import rayflow, os; print(os.path.dirname(rayflow.__file__))"],
                           cwd=empty, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site), f"rayflow imported from {where}, not the wheel in {site}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    ray_tmp = tempfile.mkdtemp(prefix="rw", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    env |= {"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path),
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(py), "-m", "rayflow.train", "experiment=smoke", "run.eval_samples=20",
                           "run.eval_batch=20"], cwd=empty, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    summary = json.loads(out[out.index("{\n"): out.index("\n}\n") + 2])
    assert Path(summary["student_path"]).is_file() and summary["student_path"].startswith(str(empty))
