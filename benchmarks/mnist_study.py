"""What moves the 8-step MNIST student: the demo with one distillation knob changed at a time (issue 12, item 3).

Each variant is the default main job (`python -m rayflow.train`: the offline MNIST demo, 60,000 images,
alternating moment matching from the shipped teacher) as the study measured it, BASE (the paper's 1:1
alternation, the default until this study made it 2), plus the Hydra overrides below, under the run name
`study-<variant>` (`study-k<k>-<variant>` at another --k), so the exports do not overwrite each other. Its
exported student is then scored by `mnist_seeds.py` (the public `python -m rayflow.evaluate`, one subprocess per
row and noise seed) at --samples samples for each of --seeds, beside the teacher's 256-step ancestral sampler and
k-step DDIM on the same noise.
The table gives, per variant, FD mean ± std over noise seeds and two paired ratios (same noise seed, same
class labels): to the teacher-256 and to the baseline student of the same run.seed (`baseline`, or `train_seed_1`
for a variant that sets run.seed=1). The noise seeds measure sampling noise only; the
`train_seed_1` variant (the baseline with another run.seed: other initial noise, batches and timesteps) gives
one measure of the training-run spread, against which a variant's gap to the baseline has to be read.

    python benchmarks/mnist_study.py --variants baseline,aux_x2      # train what is missing, score, table
    python benchmarks/mnist_study.py --summarize                     # the table from <out>/rows.jsonl

Everything resumes: a variant whose export exists is not retrained (delete its .rayflow/runs/<run name> to redo it),
and mnist_seeds.py skips rows already in <out>/rows.jsonl (a row is identified by its checkpoint's SHA-256,
steps, seed and samples), so the teacher's 256-step rows (10-20 min per seed) are scored once for all variants;
copy them in from another rows.jsonl of the same classifier (see mnist_seeds.py) to skip even that.
<out>/train.jsonl keeps each training's command, wall time, `uptime` and export SHA-256.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mnist_seeds

HERE = Path(__file__).resolve().parent

# Every variant starts from the demo as the study measured it (2026-12-07): the paper's 1:1 alternation, which was
# distill.aux_per_student's default then (2 since, by this study); a variant's own override of a key wins.
BASE = ["distill.aux_per_student=1"]

TRAIN_SEEDS = (("", []), ("_train_seed_1", ["run.seed=1"]), ("_train_seed_2", ["run.seed=2"]))
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "train_seed_1": ["run.seed=1"],  # the training-run spread of the baseline itself
    "aux_x2": ["distill.aux_per_student=2"],  # 2 aux updates per student update, same total updates
    "aux_x2_images_x1.5": ["distill.aux_per_student=2", "distill.train_images=90000"],  # baseline's student updates
    "aux_x3": ["distill.aux_per_student=3"],
    "train_seed_2": ["run.seed=2"],
    "aux_x2_train_seed_1": ["distill.aux_per_student=2", "run.seed=1"],  # aux_x2 against train_seed_1
    "aux_x2_train_seed_2": ["distill.aux_per_student=2", "run.seed=2"],
    "images_x4": ["distill.train_images=240000"],
    "lr_x3": ["distill.lr_student=3e-4"],
    "lr_ratio_2": ["distill.lr_ratio=2.0"],
    "ema_0.999": ["distill.ema_decay=0.999"],
    "ema_0.9": ["distill.ema_decay=0.9"],
    "uniform_s": ["distill.s_sampling=uniform"],
    # 3x the lr on top of the 2:1 default, one per training seed: each against aux_x2 of its run.seed
    "aux_x2_lr_x3": ["distill.aux_per_student=2", "distill.lr_student=3e-4"],
    "aux_x2_lr_x3_train_seed_1": ["distill.aux_per_student=2", "distill.lr_student=3e-4", "run.seed=1"],
    "aux_x2_lr_x3_train_seed_2": ["distill.aux_per_student=2", "distill.lr_student=3e-4", "run.seed=2"],
    # 4x the images under the 2:1 default, three training seeds: each against aux_x2 of its run.seed
    "aux_x2_images_x4": ["distill.aux_per_student=2", "distill.train_images=240000"],
    "aux_x2_images_x4_train_seed_1": ["distill.aux_per_student=2", "distill.train_images=240000", "run.seed=1"],
    "aux_x2_images_x4_train_seed_2": ["distill.aux_per_student=2", "distill.train_images=240000", "run.seed=2"],
    # a shorter student EMA under the 2:1 default (the demo's 0.99 spans ~a third of its ~310 student updates)
    "aux_x2_ema_0.98": ["distill.aux_per_student=2", "distill.ema_decay=0.98"],
    "aux_x2_ema_0.98_train_seed_1": ["distill.aux_per_student=2", "distill.ema_decay=0.98", "run.seed=1"],
    "aux_x2_ema_0.98_train_seed_2": ["distill.aux_per_student=2", "distill.ema_decay=0.98", "run.seed=2"],
    # the public ImageNet-64 reproduction's schedule under the 2:1 default: a linear warm-up over a tenth of the
    # images, then a linear decay to 0 (instead of cosine from the first update)
    **{f"aux_x2_linear_warmup{sfx}": ["distill.aux_per_student=2", "distill.lr_decay=linear",
                                      "distill.warmup_images=6000", *seed] for sfx, seed in TRAIN_SEEDS},
    # 4x the batch at the same number of updates (4x the images): less gradient noise per update
    **{f"aux_x2_batch_x4{sfx}": ["distill.aux_per_student=2", "data.batch_size=256", "distill.train_images=240000",
                                 *seed] for sfx, seed in TRAIN_SEEDS},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="baseline", help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--cwd", type=Path, default=HERE.parent, help="checkout to train and evaluate in")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--seeds", default="17,18,19", help="eval.seed values (the noise seeds)")
    p.add_argument("--k", type=int, default=8, help="distill.steps of every variant, and the DDIM row's steps")
    p.add_argument("--overrides", default="", help="space-separated Hydra overrides added to every variant's "
                   "training (e.g. a smaller model for a smoke run)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", type=Path, default=HERE / "results" / "mnist_study")
    p.add_argument("--summarize", action="store_true", help="only print the table from <out>/rows.jsonl")
    a = p.parse_args(argv)
    a.variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    a.cwd = a.cwd.resolve()
    return a


def run_name(a: argparse.Namespace, variant: str) -> str:
    """The variant's run name: a 4-step student must not reuse the 8-step student's export."""
    return f"study-{variant}" if a.k == 8 else f"study-k{a.k}-{variant}"


def export_path(a: argparse.Namespace, variant: str) -> Path:
    return a.cwd / ".rayflow" / "runs" / run_name(a, variant) / "export" / "student.safetensors"


def overrides(variant: str) -> list[str]:
    """The variant's Hydra overrides on top of BASE (Hydra refuses a key given twice)."""
    own = {o.split("=", 1)[0] for o in VARIANTS[variant]}
    return [o for o in BASE if o.split("=", 1)[0] not in own] + VARIANTS[variant]


def train(a: argparse.Namespace, variant: str) -> Path:
    """The variant's student export, trained by the public CLI unless it exists."""
    path = export_path(a, variant)
    if path.is_file():
        return path
    cmd = [a.python, "-m", "rayflow.train", f"run.name={run_name(a, variant)}", f"distill.steps={a.k}",
           *a.overrides.split(), *overrides(variant)]
    print(f"mnist_study: training {variant} ({time.strftime('%H:%M:%S')}; {mnist_seeds.uptime()}): "
          + " ".join(cmd), file=sys.stderr, flush=True)
    before, t0 = mnist_seeds.uptime(), time.time()
    proc = subprocess.run(cmd, cwd=a.cwd, env=dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1"),
                          capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"mnist_study: training {variant} failed (exit {proc.returncode}): " + " ".join(cmd))
    record = {"variant": variant, "command": " ".join(cmd), "wall_s": round(time.time() - t0, 1),
              "uptime_before": before, "uptime_after": mnist_seeds.uptime(), "export": str(path),
              "export_sha256": mnist_seeds.sha256(path), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "train.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return path


def score(a: argparse.Namespace, student: Path) -> None:
    mnist_seeds.main(["--cwd", str(a.cwd), "--student", str(student), "--samples", str(a.samples),
                      "--seeds", ",".join(str(s) for s in a.seeds), "--k", str(a.k), "--python", a.python,
                      "--out", str(a.out)])


def _ms(xs: list[float], digits: int) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.{digits}f}" if xs else ""
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def summarize(a: argparse.Namespace) -> tuple[list[dict], str]:
    """Per trained variant: FD and friends over the noise seeds, and the paired ratios to the teacher-256 and to
    the baseline student (the student rows are found by the export's SHA-256 in train.jsonl)."""
    rows = mnist_seeds.load_rows(a.out / "rows.jsonl")
    trained = {r["variant"]: r for r in mnist_seeds.load_rows(a.out / "train.jsonl")}  # the last training counts
    seeds = a.seeds

    def by_seed(pred) -> dict[int, dict]:
        return {r["seed"]: r for r in rows if r["samples"] == a.samples and r["seed"] in seeds and pred(r)}

    teacher = by_seed(lambda r: r["row"] == "teacher_ancestral")
    ddim = by_seed(lambda r: r["row"] == "teacher_ddim" and r["steps"] == a.k)
    students = {v: by_seed(lambda r, sha=t["export_sha256"]: r["row"] == "student" and r["checkpoint_sha256"] == sha)
                for v, t in trained.items()}

    def baseline_of(variant: str) -> dict[int, dict]:
        """The rows of the variant's reference: the trained variant with the same run.seed whose other overrides
        are the largest proper subset of the variant's (aux_x2_lr_x3_train_seed_1 -> aux_x2_train_seed_1 ->
        train_seed_1); a variant that only changes run.seed (train_seed_1) against `baseline`: the training-run
        spread."""
        return students.get(reference(variant, students), {})

    out, lines = [], ["| variant | overrides | seeds | FD | FD / teacher-256 | FD / reference | reference "
                      "| precision | recall | class accuracy | training s |",
                      "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    table = [("teacher, ancestral 256", None, teacher), (f"teacher, DDIM {a.k}", None, ddim)]
    table += [(v, v, students[v]) for v in VARIANTS if v in students]
    for name, variant, got in table:
        if not got:
            continue
        s = sorted(got)
        vs_teacher = [got[x]["fd"] / teacher[x]["fd"] for x in s if x in teacher]
        base = baseline_of(variant) if variant else {}
        vs_base = [got[x]["fd"] / base[x]["fd"] for x in s if x in base]
        row = {"variant": name, "seeds": s, "fd": [got[x]["fd"] for x in s], "fd_vs_teacher": vs_teacher,
               "fd_vs_baseline": vs_base, **({"training_s": trained[variant]["wall_s"]} if variant else {})}
        out.append(row)
        knobs = " ".join(VARIANTS[variant]) or "(the demo, 1:1)" if variant else ""
        ref = reference(variant, students) if variant else ""
        quality = " | ".join(_ms([got[x][k] for x in s], 3) for k in ("precision", "recall", "accuracy"))
        lines.append(f"| {name} | {knobs} | {len(s)} | {_ms(row['fd'], 3)} | {_ms(vs_teacher, 2)} | "
                     f"{_ms(vs_base, 2)} | {ref} | {quality} | {row.get('training_s', '')} |")
    lines += ["", *arms(out)]
    clf = {r["classifier_sha256"] for r in rows}
    text = "\n".join(lines)
    if len(clf) > 1:
        text += f"\n\nWARNING: rows were scored with different classifiers: {sorted(clf)}"
    return out, text


def reference(variant: str, trained=None) -> str:
    """The variant that `variant` is paired with (see summarize): same run.seed, the largest proper subset of its
    other overrides among the `trained` variants (all of VARIANTS by default); of equal ones, the first in VARIANTS
    (aux_x2_images_x4 -> aux_x2, not images_x4)."""
    def split(v: str) -> tuple[frozenset, list[str]]:
        return frozenset(o for o in VARIANTS[v] if not o.startswith("run.seed=")), \
            [o for o in VARIANTS[v] if o.startswith("run.seed=")]

    knobs, seed = split(variant)
    if not knobs:
        return "baseline"
    nested = [v for v in VARIANTS if (trained is None or v in trained) and split(v)[1] == seed and split(v)[0] < knobs]
    return max(nested, key=lambda v: len(split(v)[0]), default="baseline")


def arms(out: list[dict]) -> list[str]:
    """Variants that differ only in run.seed, pooled: per arm, the mean ± std over training runs of each run's
    noise-seed mean FD and FD / teacher-256 (the spread a default change has to beat)."""
    groups: dict[str, list[dict]] = {}
    for r in out:
        if r["variant"] in VARIANTS and r["fd_vs_teacher"]:
            knobs = [o for o in VARIANTS[r["variant"]] if not o.startswith("run.seed=")]
            groups.setdefault(" ".join(knobs) or "(the demo, 1:1)", []).append(r)
    lines = ["| arm (overrides other than run.seed) | training runs | FD | FD / teacher-256 |", "|---|---:|---:|---:|"]
    for arm, rs in groups.items():
        lines.append(f"| {arm} | {len(rs)} | {_ms([statistics.fmean(r['fd']) for r in rs], 3)} | "
                     f"{_ms([statistics.fmean(r['fd_vs_teacher']) for r in rs], 2)} |")
    return lines


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    if not a.summarize:
        for variant in a.variants:
            score(a, train(a, variant))
    out, text = summarize(a)
    print(text)
    return out


if __name__ == "__main__":
    main()
