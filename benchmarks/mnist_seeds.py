"""MNIST 16 px: the 8-step student against the 256-step teacher (and 8-step DDIM) over several noise seeds.

Why: one 1,000-sample FD moves by 0.1-0.2 between noise seeds (benchmarks/README.md, steps_quality), larger
than the student-teacher gaps the demo reports, so "the student matches / beats the teacher" needs error bars.
This script scores three rows with the public CLI, `python -m rayflow.evaluate` (one subprocess per row and
seed, run from --cwd), at --samples samples for each seed in --seeds:

    teacher_ancestral  the shipped teacher, ancestral sampler, --teacher-steps (256)
    teacher_ddim       the shipped teacher, DDIM, --k (8) steps
    student            the exported k-step student (default: the demo's, <cwd>/.rayflow/runs/demo/export/)

and prints JSON lines plus a markdown table of mean +- std (ddof=1, over seeds) of FD, precision, recall and
class accuracy, the per-seed student/teacher FD ratio (mean +- std) and whether the paired difference
student - teacher is larger than twice its std over seeds. All rows of one seed share the class labels
(i mod 10) and the per-sample noise generators (seed, i), so the student-teacher difference is paired by seed.

    python benchmarks/mnist_seeds.py                                  # 3 seeds x 5,000 samples
    python benchmarks/mnist_seeds.py --cwd /tmp/fresh --samples 2000   # another checkout, fewer samples
    python benchmarks/mnist_seeds.py --table-only                      # the table from rows.jsonl

Each finished row is appended to <out>/rows.jsonl (with the checkpoint's SHA-256, samples, seed, wall
seconds and `uptime` before and after); a rerun skips rows already there, so an interrupted run resumes.
The cheap 8-step rows run first (all seeds), then the teacher's 256-step rows (the expensive part: ~10-15
min per seed at 5,000 samples on the 2-core CPU box). The table says how many seeds each row has.

A row is identified by (row, steps, seed, samples, checkpoint SHA-256), not by --k or --out: the teacher's
256-step rows of one --out serve another k's --out when copied into its rows.jsonl (benchmarks/README.md,
"4-step and 1-step students"). The classifier is not in that identity: it is whatever <cwd>/.rayflow/runs/cache
holds (trained on first use), so copy rows only between runs of the same cache; the table warns when the rows it
shows were scored with different classifiers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROWS = ("teacher_ancestral", "teacher_ddim", "student")
LABELS = {"teacher_ancestral": "teacher, ancestral", "teacher_ddim": "teacher, DDIM",
          "student": "student, moment matching"}
KEYS = ("fd", "precision", "recall", "accuracy")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cwd", type=Path, default=ROOT, help="checkout to run `python -m rayflow.evaluate` in")
    p.add_argument("--student", type=Path, default=None,
                   help="student export (default <cwd>/.rayflow/runs/demo/export/student.safetensors)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="teacher (default <cwd>/rayflow/assets/teacher-mnist16.safetensors)")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--seeds", default="17,18,19", help="eval.seed values (17 = run.seed + 17, the demo's noise)")
    p.add_argument("--teacher-steps", type=int, default=256)
    p.add_argument("--k", type=int, default=8, help="student steps (the student file must say the same) and DDIM steps")
    p.add_argument("--workers", type=int, default=2, help="eval.workers")
    p.add_argument("--eval-batch", type=int, default=500, help="run.eval_batch")
    p.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", type=Path, default=HERE / "results" / "mnist_seeds")
    p.add_argument("--table-only", action="store_true", help="only print the table from <out>/rows.jsonl")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    a.rows = [r for r in a.rows.split(",") if r]
    bad = set(a.rows) - set(ROWS)
    if bad:
        p.error(f"--rows: unknown {sorted(bad)}; choose from {ROWS}")
    a.cwd = a.cwd.resolve()
    a.student = (a.student or a.cwd / ".rayflow/runs/demo/export/student.safetensors").resolve()
    a.teacher = (a.teacher or a.cwd / "rayflow/assets/teacher-mnist16.safetensors").resolve()
    return a


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def plan(a: argparse.Namespace) -> list[dict]:
    """(row, seed) jobs, cheap 8-step rows first so a run cut short still has every seed of those."""
    spec = {"teacher_ancestral": ("teacher", "ancestral", a.teacher_steps, a.teacher),
            "teacher_ddim": ("teacher", "ddim", a.k, a.teacher),
            "student": ("student", "student", a.k, a.student)}
    order = [r for r in ("student", "teacher_ddim", "teacher_ancestral") if r in a.rows]
    jobs = []
    for row in order:
        model, sampler, steps, ckpt = spec[row]
        for seed in a.seeds:
            jobs.append({"row": row, "model": model, "sampler": sampler, "steps": steps, "checkpoint": str(ckpt),
                         "seed": seed, "samples": a.samples})
    return jobs


def key(r: dict) -> tuple:
    return (r["row"], r["steps"], r["seed"], r["samples"], r["checkpoint_sha256"])


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(a: argparse.Namespace, job: dict, out_dir: Path) -> dict:
    # the checkpoint's SHA-256 in the name: several students scored into one --out (mnist_study.py) keep theirs
    metrics_file = out_dir / "eval" / (f"{job['row']}-{job['steps']}steps-seed{job['seed']}-n{job['samples']}-"
                                       f"{job['checkpoint_sha256'][:8]}.json")
    cmd = [a.python, "-m", "rayflow.evaluate", f"eval.checkpoint={job['checkpoint']}", f"eval.model={job['model']}",
           f"eval.sampler={job['sampler']}", f"eval.steps={job['steps']}", f"eval.samples={job['samples']}",
           f"eval.seed={job['seed']}", f"eval.workers={a.workers}", f"run.eval_batch={a.eval_batch}",
           f"eval.out={metrics_file}"]
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rd.", dir="/tmp"))
    before, t0 = uptime(), time.time()
    proc = subprocess.run(cmd, cwd=a.cwd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    after = uptime()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"mnist_seeds: {job['row']} seed {job['seed']} failed (exit {proc.returncode}): "
                         + " ".join(cmd))
    res = json.loads(metrics_file.read_text())
    m, p = res["metrics"], f"eval.{job['row']}."
    return {**job, "checkpoint_sha256": job["checkpoint_sha256"],
            **{k: m[p + k] for k in (*KEYS, "nfe", "s_per_1k")},
            "classifier_sha256": res["classifier_sha256"], "wall_s": round(wall, 1),
            "uptime_before": before, "uptime_after": after, "cwd": str(a.cwd),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(cmd)}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan)


def fmt(xs: list[float], digits: int) -> str:
    m, s = mean_std(xs)
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def summary(a: argparse.Namespace, rows: list[dict], shas: dict[str, str]) -> tuple[dict, str]:
    """Rows of this configuration (checkpoints, samples, steps, seeds) -> (summary dict, markdown)."""
    want = {(j["row"], j["steps"], j["seed"], j["samples"], shas[j["checkpoint"]]) for j in plan(a)}
    mine = [r for r in rows if key(r) in want]
    by = {row: {r["seed"]: r for r in mine if r["row"] == row} for row in ROWS}
    steps = {"teacher_ancestral": a.teacher_steps, "teacher_ddim": a.k, "student": a.k}
    lines = ["| sampler | NFE | seeds | FD (classifier features) | precision | recall | class accuracy "
             "| s per 1k samples |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    out: dict = {"samples": a.samples, "seeds_requested": a.seeds, "rows": {}}
    for row in [r for r in ROWS if r in a.rows]:
        got = [by[row][s] for s in a.seeds if s in by[row]]
        if not got:
            lines.append(f"| {LABELS[row]} | {steps[row]} | 0 of {len(a.seeds)} | not run | | | | |")
            continue
        seeds = [r["seed"] for r in got]
        out["rows"][row] = {"seeds": seeds, **{k: mean_std([r[k] for r in got]) for k in (*KEYS, "s_per_1k")},
                            "fd_per_seed": [r["fd"] for r in got]}
        lines.append(f"| {LABELS[row]} | {steps[row]} | {len(got)} of {len(a.seeds)} | "
                     f"{fmt([r['fd'] for r in got], 3)} | "
                     + " | ".join(fmt([r[k] for r in got], 3) for k in ("precision", "recall", "accuracy"))
                     + f" | {fmt([r['s_per_1k'] for r in got], 1)} |")
    both = [s for s in a.seeds if s in by["student"] and s in by["teacher_ancestral"]]
    text = "\n".join(lines)
    if both:
        ratio = [by["student"][s]["fd"] / by["teacher_ancestral"][s]["fd"] for s in both]
        diff = [by["student"][s]["fd"] - by["teacher_ancestral"][s]["fd"] for s in both]
        dm, ds = mean_std(diff)
        outside = (not math.isnan(ds)) and abs(dm) > 2 * ds
        verdict = ("above" if dm > 0 else "below") if outside else "within noise of"
        out["student_vs_teacher"] = {"seeds": both, "ratio": mean_std(ratio), "ratio_per_seed": ratio,
                                     "diff": (dm, ds), "diff_per_seed": diff, "outside_2std": outside,
                                     "verdict": verdict}
        text += (f"\n\nStudent / teacher-{a.teacher_steps} FD ratio over seeds {both}: {fmt(ratio, 3)} "
                 f"(per seed {', '.join(f'{r:.3f}' for r in ratio)}); difference student - teacher "
                 f"{fmt(diff, 3)} (per seed {', '.join(f'{d:+.3f}' for d in diff)}): "
                 + (f"|mean| > 2 std, the student's FD is {verdict} the teacher's." if outside else
                    "|mean| <= 2 std (or one seed only): the difference is within the seed-to-seed noise."))
    clf = {r["classifier_sha256"] for r in mine}
    if len(clf) > 1:
        text += f"\n\nWARNING: rows were scored with different classifiers: {sorted(clf)}"
    return out, text


def main(argv=None) -> None:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows_file = a.out / "rows.jsonl"
    for path in {a.teacher, a.student} if "student" in a.rows else {a.teacher}:
        if not path.is_file():
            raise SystemExit(f"mnist_seeds: no checkpoint at {path}; FIX THIS by running `python -m rayflow.train` "
                             f"in {a.cwd} first or passing --student/--teacher")
    shas = {str(p): sha256(p) for p in (a.teacher, a.student) if p.is_file()}
    if not a.table_only:
        for job in plan(a):
            job["checkpoint_sha256"] = shas[job["checkpoint"]]
            if any(key(r) == key(job) for r in load_rows(rows_file)):
                continue
            print(f"mnist_seeds: {job['row']} {job['steps']} steps, seed {job['seed']}, {job['samples']} samples "
                  f"({time.strftime('%H:%M:%S')}; {uptime()})", file=sys.stderr, flush=True)
            row = run_one(a, job, a.out)
            with open(rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    res, table = summary(a, load_rows(rows_file), shas)
    print(json.dumps({"summary": res}))
    print(table)
    (a.out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
