"""Self-describing exports: the file says what network, data shape and k it holds; the CLIs build from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rayflow.config import ConfigError, JobConfig
from rayflow.exports import apply_meta, describe, read_meta, write_export
from rayflow.models import build_denoiser, load_teacher

ROOT = Path(__file__).resolve().parents[1]
FILE_JOB = {"data": {"source": "digits", "resolution": 8, "channels": 1, "num_classes": 10},
            "model": {"channels": 8, "channel_mult": [1], "attn_levels": []}, "distill": {"steps": 2}}


def _student(tmp_path) -> tuple[str, JobConfig]:
    job = JobConfig.from_dict(FILE_JOB)
    torch.manual_seed(0)
    path = str(tmp_path / "student.safetensors")
    write_export(build_denoiser(job.model, job.data).state_dict(), path, describe(job, "student"))
    return path, job


def test_metadata_round_trips_and_rebuilds_the_network(tmp_path):
    path, job = _student(tmp_path)
    meta = read_meta(path)
    assert meta["kind"] == "student" and meta["steps"] == 2 and meta["data"]["resolution"] == 8
    assert meta["schedule"] == {"name": "cosine", "logsnr_shift": 0.0} and meta["prediction"] == "v"
    default = JobConfig.from_dict({})  # another model, data shape and k than the file's
    rebuilt = apply_meta(default, meta, path, typed=[])
    assert (rebuilt.distill.steps, rebuilt.data.resolution, rebuilt.model.channels) == (2, 8, 8)
    assert default.distill.steps == 8  # the validated config is not mutated
    den = load_teacher(path, rebuilt.model, rebuilt.data)
    assert den(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    assert read_meta(str(tmp_path / "nothing.safetensors")) is None


@pytest.mark.parametrize("typed,key", [
    (["distill.steps=8"], "distill.steps"), (["eval.steps=4"], "eval.steps"), (["model=unet_small"], "model."),
    (["data.resolution=16"], "data.resolution"), (["eval.model=teacher"], "eval.model"),
])
def test_a_command_line_value_that_contradicts_the_file_is_an_error_naming_both(tmp_path, typed, key):
    path, _ = _student(tmp_path)
    job = JobConfig.from_dict({"distill": {"steps": 8}, "eval": {"steps": 4, "model": "teacher"},
                               "data": {"resolution": 16}})
    with pytest.raises(ConfigError, match=f"{typed[0]} contradicts the checkpoint .*{key}"):
        apply_meta(job, read_meta(path), path, typed)
    same = JobConfig.from_dict(FILE_JOB)
    assert apply_meta(same, read_meta(path), path, ["distill.steps=2"]).distill.steps == 2  # agreeing is fine


@pytest.mark.e2e
def test_sample_builds_a_k2_student_from_the_file_alone(tmp_path):
    path, _ = _student(tmp_path)
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path),
           "RAY_TMPDIR": str(tmp_path), "RAY_AUTH_MODE": "disabled"}

    def sample(*args):
        return subprocess.run([sys.executable, "-m", "rayflow.sample", f"eval.checkpoint={path}", "eval.samples=4",
                               f"eval.out={tmp_path / 'out.npz'}", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    proc = sample()
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(str(np.load(tmp_path / "out.npz")["meta"]))
    assert meta["steps"] == 2 and meta["model"] == "student"
    assert np.load(tmp_path / "out.npz")["images"].shape == (4, 1, 8, 8)  # the file's network and image shape
    bad = sample("distill.steps=8")
    assert bad.returncode == 2 and "distill.steps=8 contradicts the checkpoint" in bad.stderr
    assert "distill.steps=2" in bad.stderr and "Traceback" not in bad.stderr
