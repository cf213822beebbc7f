"""Every entry point ends a user error with exit status 2 and one line, `rayflow: <what>; FIX THIS by <how>`,
no traceback, and before Ray starts (the test's RAY_TMPDIR stays empty)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayflow.config import JobConfig
from rayflow.models import build_denoiser

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def _cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    missing = str(tmp / "missing")
    empty_class = tmp / "folder"
    (empty_class / "cat").mkdir(parents=True)
    full = tmp / "full"
    full.mkdir()
    (full / "x").write_text("")
    wrong = str(tmp / "wrong.pt")  # a bare state_dict of another network than the default MNIST model
    job = JobConfig.from_dict({"data": {"resolution": 8}, "model": {"channels": 8, "channel_mult": [1],
                                                                   "attn_levels": []}})
    torch.save(build_denoiser(job.model, job.data).state_dict(), wrong)
    sweep_db = f"tracking.uri=sqlite:///{tmp / 'empty.db'}"
    return [
        ("train", ["distill.stepz=3"], "unknown config key 'distill.stepz'"),
        ("train", ["data=nope"], "Could not find 'data/nope'"),
        ("train", ["distill.steps=0"], "'distill.steps' = 0"),
        ("train", ["distill.steps=abc"], "'distill.steps' is invalid"),  # the typed schema's check, one line too
        ("train", ["data=imagenet64"], "data.path"),
        ("train", ["resources.precision=fp8"], "resources.precision"),
        ("train", ["data.source=image_folder", f"data.path={missing}"], "does not exist"),
        ("train", ["data.source=image_folder", f"data.path={empty_class}"], "hold no image files"),
        ("train", ["data.source=parquet", f"data.path={missing}"], "does not exist"),
        ("train", ["task=distill", f"teacher.checkpoint={missing}.pt"], "teacher checkpoint"),
        ("train", [f"tracking.uri=http://127.0.0.1:{_closed_port()}"], "is unreachable"),
        ("train", ["tracking.uri=ftp://somewhere"], "tracking.uri"),
        ("train", [f"tracking.uri=sqlite:///{missing}/m.db"], "does not exist"),
        ("sample", [f"eval.out={tmp / 's.npz'}", f"eval.checkpoint={missing}.pt"], "eval.checkpoint"),
        ("sample", [f"eval.out={tmp / 's.npz'}", f"eval.checkpoint={wrong}"], "does not match the model config"),
        ("evaluate", [f"eval.checkpoint={wrong}"], "does not match the model config"),
        ("tune", ["sweep=nosuch"], "Could not find 'sweep/nosuch'"),
        ("tune", ["sweep.space.foo.grid=[1]"], "unknown config key"),
        ("report", ["sweep=smoke", sweep_db], "no sweep named 'smoke'"),
        ("prepare", ["--src", missing, "--out", str(tmp / "o"), "--res", "8"], "does not exist"),
        ("prepare", ["--src", str(empty_class), "--out", str(tmp / "o"), "--res", "8"], "hold no image files"),
        ("prepare", ["--src", str(empty_class), "--out", str(full), "--res", "8"], "is not empty"),
        ("prepare", ["--src", str(empty_class)], "required"),
    ]


@pytest.mark.e2e
def test_user_errors_are_one_line_and_exit_2_before_ray_starts(tmp_path):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path),
           "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled", "MLFLOW_ALLOW_FILE_STORE": "false"}
    failures = []
    for command, args, expect in _cases(tmp_path):
        proc = subprocess.run([sys.executable, "-m", f"rayflow.{command}", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "INFO" not in ln]
        ok = (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("rayflow: ")
              and "; FIX THIS by " in lines[0] and expect in lines[0] and "Traceback" not in proc.stderr)
        print(f"{command} {' '.join(args)}\n  -> rc={proc.returncode} {lines[-1] if lines else ''}")
        if not ok:
            failures.append((command, args, proc.returncode, proc.stderr[-2000:]))
    assert not failures, failures
    assert not any(ray_tmp.iterdir()), "a user error started Ray"
