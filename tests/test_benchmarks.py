"""The benchmarks' in-process parts run on the current library (they import its internals, so a refactor can
break them without any other test noticing). Tiny sizes: this checks that they run, not their figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _import(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_step_plain_part_times_the_teacher_and_alternating_steps(tmp_path, channels_last):
    ts = _import("train_step")
    from rayflow.config import JobConfig
    from rayflow.models import build_denoiser, save_state_dict

    args = argparse.Namespace(res=8, batch=4, channels=8, updates=8, warmup=2, report_every=2,
                              channels_last=channels_last)
    job = JobConfig.from_dict(ts.job_dict(args, None, str(tmp_path), "alternating"))
    assert job.resources.channels_last is channels_last  # --channels-last reaches the states both parts build
    teacher = str(tmp_path / "teacher.pt")
    save_state_dict(build_denoiser(job.model, job.data).state_dict(), teacher)
    methods = ("teacher", "alternating")  # parameter_space's preconditioner reads real images through Ray Data
    out = ts.plain_steps(args, teacher, str(tmp_path), methods, 4)
    assert set(out) == set(methods)
    for summary in out.values():
        assert summary["updates"] == 4 and summary["s_per_update"] > 0
    assert out["alternating"]["aux_s"] > 0 and out["alternating"]["student_s"] > 0
    costs = ts.pass_costs(args, str(tmp_path), 4)
    assert 1 < costs["alternating_bound"] < 3 and costs["forward_s"] > 0


def test_train_step_model_option_reads_conf_model():
    ts = _import("train_step")
    own = ts.model_dict(argparse.Namespace(model=None, channels=16))
    assert ts.model_dict(argparse.Namespace(model="unet_tiny", channels=8)) == own  # the default is unet_tiny
    assert ts.model_dict(argparse.Namespace(model="unet_small", channels=8)) == {}  # ModelConfig's defaults
