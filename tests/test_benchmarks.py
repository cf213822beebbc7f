"""The benchmarks' in-process parts run on the current library (they import its internals, so a refactor can
break them without any other test noticing). Tiny sizes: this checks that they run, not their figures."""

from __future__ import annotations

import argparse
import json
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


def test_train_step_plain_part_times_the_teacher_and_alternating_steps(tmp_path):
    ts = _import("train_step")
    from rayflow.config import JobConfig
    from rayflow.models import build_denoiser, save_state_dict

    args = argparse.Namespace(res=8, batch=4, channels=8, updates=8, warmup=2, report_every=2)
    job = JobConfig.from_dict(ts.job_dict(args, None, str(tmp_path), "alternating"))
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


def test_gmm_study_select_variant_records_its_proxy_curve_and_selected_update(tmp_path, capsys):
    gs = _import("gmm_study")
    tiny = ["--specs", "gmm2d", "--seeds", "0,1", "--k", "2", "--n-eval", "300", "--out", str(tmp_path),
            "--base-args", "--width 16 --depth 1 --teacher-iters 20 --batch 32 --distill-iters 6 --n-train 500"]
    with pytest.raises(SystemExit, match="--n-proxy 400 exceeds --n-eval 300"):  # refused before any training
        gs.main([*tiny, "--variants", "select", "--n-proxy", "400"])
    assert not (tmp_path / "rows.jsonl").exists()
    gs.main([*tiny, "--variants", "baseline,select", "--n-proxy", "200", "--select-every", "4"])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    selected = [r for r in rows if r["method"] == "select"]
    assert [r["seed"] for r in selected] == [0, 1]
    for r in selected:
        assert [u for u, _ in r["curve"]] == [u for u, _ in r["curve_moment"]] == [4, 6]
        assert r["selected_update"] == min(r["curve"], key=lambda c: c[1])[0]
    assert not any("curve" in r for r in rows if r["method"] != "select")
    # the select run's last checkpoint is the baseline student: the same row as the baseline's own run
    for seed in (0, 1):
        plain, last = [r for r in rows if r["method"] == "baseline" and r["seed"] == seed]
        timeless = {key: value for key, value in last.items() if key not in ("train_s", "scored_by")}
        assert last["scored_by"] == "select" and timeless == {k: v for k, v in plain.items() if k != "train_s"}
    capsys.readouterr()
    gs.main(["--summarize", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| select | 2 |" in out
    assert (f"select: selected update per seed: seed 0: {selected[0]['selected_update']} of 6, "
            f"seed 1: {selected[1]['selected_update']} of 6") in out
