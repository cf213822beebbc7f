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


def test_mnist_curve_runs_without_ray_or_hydra_and_keeps_the_best_proxy(tmp_path):
    """The GPU machine has torch but neither Ray nor Hydra: part 2 of mnist_curve.py must run there, from
    prepared inputs, and the final student must be the EMA with the best proxy FD on its curve."""
    import json
    import subprocess

    mc, ts = _import("mnist_curve"), _import("train_step")
    from rayflow.config import JobConfig
    from rayflow.evaluation.classifier import train_classifier
    from rayflow.models import build_denoiser, save_state_dict

    spec = {"task": "distill", "data": {"source": "digits", "resolution": 8, "channels": 1, "num_classes": 10,
                                        "batch_size": 8},
            "model": {"channels": 8, "channel_mult": [1, 2], "attn_levels": []}, "distill": {"ema_decay": 0.9}}
    teacher = tmp_path / "teacher.pt"
    random_teacher = JobConfig.from_dict({**spec, "task": "teacher"})
    save_state_dict(build_denoiser(random_teacher.model, random_teacher.data).state_dict(), teacher)
    job = JobConfig.from_dict({**spec, "teacher": {"checkpoint": str(teacher)}})
    x, y = ts.digits_batch(8, 300)
    mc.write_inputs(tmp_path / "in", job, x, y, train_classifier(x, y, epochs=1))

    argv = [str(BENCHMARKS / "mnist_curve.py"), "--inputs", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
            "--device", "cpu", "--ks", "2", "--images", "64", "--eval-every-images", "16", "--proxy-samples", "40",
            "--eval-samples", "60", "--seeds", "1", "--teacher-steps", "4"]
    blocked = ["ray", "hydra", "omegaconf", "mlflow", "mlxtend"]
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); sys.argv = {argv!r}; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    curve = [r for r in rows if r["kind"] == "curve"]
    assert [r["update"] for r in curve] == [2, 4, 6, 8] and [r["images"] for r in curve] == [16, 32, 48, 64]
    finals = {r["method"]: r for r in rows if r["kind"] == "final"}
    assert set(finals) == {"teacher_ancestral", "teacher_ddim", "student_selected"}
    best = min(curve, key=lambda r: r["fd"])
    student = finals["student_selected"]
    assert student["selected_update"] == best["update"] and student["selected_proxy_fd"] == best["fd"]
    assert student["last_proxy_fd"] == curve[-1]["fd"] and student["samples"] == 60
    assert "| student_selected | 2 | 64 | 1 |" in proc.stdout


def test_train_step_model_option_reads_conf_model():
    ts = _import("train_step")
    own = ts.model_dict(argparse.Namespace(model=None, channels=16))
    assert ts.model_dict(argparse.Namespace(model="unet_tiny", channels=8)) == own  # the default is unet_tiny
    assert ts.model_dict(argparse.Namespace(model="unet_small", channels=8)) == {}  # ModelConfig's defaults


def test_gpu_profile_runs_without_ray_or_hydra(tmp_path):
    """The GPU image lent to this project has torch but neither Ray nor Hydra: the profile's in-process part must
    run there (here on the CPU at a tiny size) and print a record per precision and method plus the ratios."""
    import json
    import subprocess

    out = tmp_path / "profile.jsonl"
    argv = [str(BENCHMARKS / "gpu_profile.py"), "--device", "cpu", "--model", "", "--channels", "8", "--res", "8",
            "--batch", "4", "--updates", "2", "--warmup", "2", "--precisions", "fp32,bf16", "--out", str(out)]
    blocked = ["ray", "hydra", "omegaconf", "mlflow", "mlxtend"]
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({blocked!r})); sys.argv = {argv!r}; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    steps = {(r["precision"], r["method"]): r for r in records if r.get("measure") == "plain_step"}
    assert set(steps) == {(p, m) for p in ("fp32", "bf16") for m in ("teacher", "alternating", "parameter_space")}
    assert all(r["images_per_s"] > 0 and r["updates"] == 2 for r in steps.values())
    ratios = {(r["precision"], r["metric"]) for r in records if "metric" in r}
    assert ratios == {(p, f"{m}_over_teacher") for p in ("fp32", "bf16") for m in ("alternating", "parameter_space")}


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


def test_mnist_study_pairs_each_variant_with_the_same_noise_seed_of_teacher_and_baseline(tmp_path, capsys):
    """The study's ratios are paired by noise seed, and a variant's rows are found by its export's SHA-256 (rows of
    another checkpoint, sample count or seed never leak in)."""
    ms = _import("mnist_study")
    fd = {("teacher", 17): 0.3, ("teacher", 18): 0.4, ("base", 17): 0.6, ("base", 18): 0.6,
          ("aux", 17): 0.45, ("aux", 18): 0.3, ("ddim", 17): 1.1, ("ddim", 18): 1.2,
          ("base1", 17): 0.5, ("base1", 18): 0.5, ("aux1", 17): 0.4, ("aux1", 18): 0.45}
    sha = {"teacher": "t" * 64, "base": "b" * 64, "aux": "a" * 64, "ddim": "t" * 64, "base1": "1" * 64,
           "aux1": "2" * 64}
    row = {"teacher": "teacher_ancestral", "ddim": "teacher_ddim"}
    row |= {who: "student" for who in sha if who not in row}

    def line(who, seed, samples=5000, value=None):
        return {"row": row[who], "steps": 256 if who == "teacher" else 8, "seed": seed, "samples": samples,
                "checkpoint_sha256": sha[who], "fd": fd[who, seed] if value is None else value, "precision": 0.8,
                "recall": 0.7, "accuracy": 0.9, "classifier_sha256": "c" * 64}

    rows = [line(who, seed) for (who, seed) in fd]
    rows += [line("aux", 19, value=99.0), line("aux", 17, samples=1000, value=99.0)]  # other seed / sample count
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = [{"variant": "baseline", "export_sha256": sha["base"], "wall_s": 200.0},
               {"variant": "aux_x2", "export_sha256": sha["aux"], "wall_s": 210.0},
               {"variant": "train_seed_1", "export_sha256": sha["base1"], "wall_s": 200.0},
               {"variant": "aux_x2_train_seed_1", "export_sha256": sha["aux1"], "wall_s": 200.0}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trained))
    out = {r["variant"]: r for r in ms.main(["--summarize", "--out", str(tmp_path), "--seeds", "17,18"])}
    assert out["aux_x2"]["fd"] == [0.45, 0.3]
    assert out["aux_x2"]["fd_vs_teacher"] == pytest.approx([1.5, 0.75])
    assert out["aux_x2"]["fd_vs_baseline"] == pytest.approx([0.75, 0.5])
    assert out["baseline"]["fd_vs_baseline"] == pytest.approx([1.0, 1.0])
    assert out["aux_x2_train_seed_1"]["fd_vs_baseline"] == pytest.approx([0.8, 0.9])  # against train_seed_1
    assert out["train_seed_1"]["fd_vs_baseline"] == pytest.approx([5 / 6, 5 / 6])  # the training-run spread
    assert out["teacher, DDIM 8"]["fd_vs_teacher"] == pytest.approx([1.1 / 0.3, 3.0])
    text = capsys.readouterr().out
    assert "| aux_x2 | distill.aux_per_student=2 | 2 | 0.375 ± 0.106 | 1.12 ± 0.53 | 0.62 ± 0.18 |" in text
    # arms pool the training runs: aux_x2 at run.seed 0 and 1 (noise-seed means 0.375 and 0.425)
    assert "| distill.aux_per_student=2 | 2 | 0.400 ± 0.035 |" in text
    assert "| (the demo, 1:1) | 2 | 0.550 ± 0.071 |" in text
    # a variant is paired with the largest trained variant nested in it at its run.seed
    assert ms.reference("aux_x2_lr_x3_train_seed_1") == "aux_x2_train_seed_1"
    assert ms.reference("aux_x2_lr_x3_train_seed_1", {"train_seed_1": {}, "aux_x2": {}}) == "train_seed_1"
    assert ms.reference("aux_x2_lr_x3", {"lr_x3": {}, "baseline": {}, "aux_x2": {}}) == "aux_x2"  # first in VARIANTS
    assert ms.reference("images_x4") == ms.reference("train_seed_2") == "baseline"
    assert "| aux_x2_train_seed_1 | distill.aux_per_student=2 run.seed=1 | 2 | 0.425 ± 0.035 |" in text
    assert ms.overrides("baseline") == ["distill.aux_per_student=1"]  # the study's baseline is 1:1 whatever the default
    assert ms.overrides("aux_x2_train_seed_1") == ["distill.aux_per_student=2", "run.seed=1"]
    # a 4-step study trains its own students: it must not find and score the 8-step study's export
    assert ms.export_path(ms.parse_args(["--k", "4"]), "aux_x2") != ms.export_path(ms.parse_args([]), "aux_x2")
    with pytest.raises(SystemExit):
        ms.main(["--variants", "no_such_knob", "--summarize"])
