"""Steps versus quality on the built-in image data (MNIST 16 px, the shipped teacher), CPU.

Compares, on one real reference and one classifier: the shipped teacher's ancestral sampler at
--teacher-steps, the teacher's DDIM at each k, and k-step moment-matching students distilled from it on
Ray Train with each algorithm in --algorithms at each k in --ks. Metrics in the feature space of the small
MNIST classifier of `rayflow.evaluation` (cached): Frechet distance `fd` (lower is better), class accuracy
of the class-conditional samples, k-NN precision and recall; plus the sampling wall time per 1,000 images.
A `real` row scores held-out real images the same way: the noise floor of the metrics.

    python benchmarks/steps_quality.py                 # the full benchmark (hours on a 2-core CPU)
    python benchmarks/steps_quality.py --quick         # a tiny end-to-end smoke run (minutes)
    python benchmarks/steps_quality.py --plot-only     # redraw the plot and table from the JSON lines

Every row is appended to <out>/rows.jsonl as soon as it exists; rerunning skips rows already there and
students whose exported student.pt exists (an interrupted Train run resumes by name), so an interrupted
benchmark continues where it stopped. <out>/steps_quality.png plots FD and accuracy against the number of
network evaluations (NFE). By default the teacher's rows are sampled in a thread of the driver while the
students train on Ray Train (the two share the machine: their wall times are measured under that load).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
N_REAL = 2000  # real images behind the reference statistics (evaluate.MIN_REAL)
LABELS = {
    "real": "real (held-out, noise floor)",
    "teacher_ancestral": "teacher ancestral",
    "teacher_ddim": "teacher DDIM",
    "student_alternating": "student, alternating MM",
    "student_parameter_space": "student, parameter-space MM",
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="samples per evaluated (model, sampler, steps)")
    p.add_argument("--teacher-steps", type=_ints, default=[16, 32, 64, 128, 256, 512],
                   help="ancestral steps of the teacher")
    p.add_argument("--ks", type=_ints, default=[1, 2, 4, 8], help="student steps k (and DDIM steps)")
    p.add_argument("--algorithms", default="alternating,parameter_space")
    p.add_argument("--train-images", type=int, default=60_000, help="images each distillation consumes")
    p.add_argument("--train-images-k8", type=int, default=None,
                   help="images for the k=8 students (default: --train-images)")
    p.add_argument("--out", default=str(HERE / "results" / "steps_quality"),
                   help="rows.jsonl, steps_quality.png and table.md go here")
    p.add_argument("--storage", default=".rayflow/bench", help="Ray Train storage for the student runs")
    p.add_argument("--seed", type=int, default=0, help="run.seed; the sampling noise seed is seed + 17")
    p.add_argument("--no-parallel", action="store_true",
                   help="sample the teacher's rows before training the students instead of alongside")
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for the composed job")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: few samples, steps and images")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plot and table from rows.jsonl")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.teacher_steps, args.ks = 200, [16], [1, 2]
        args.train_images, args.train_images_k8 = 512, 512
        if args.out == p.get_default("out"):
            args.out = str(ROOT / ".rayflow" / "bench-quick" / "results")
        if args.storage == p.get_default("storage"):
            args.storage = ".rayflow/bench-quick"
    return args


def compose_job(args: argparse.Namespace):
    """The main job's config (conf/config.yaml's defaults: mnist 16 px, unet_tiny, the shipped teacher)."""
    from hydra import compose, initialize_config_dir

    from rayflow.cli import job_from_hydra  # registers the ${rayflow_asset:...} resolver

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"run.storage_path={args.storage}", f"run.seed={args.seed}",
                                           *args.overrides])
    return job_from_hydra(cfg)


class Rows:
    """rows.jsonl: append-only, one JSON object per (method, nfe); thread-safe."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()
        self.rows: dict[tuple[str, int], dict] = {}
        self._read()

    def _read(self) -> None:
        """(Re)load the file: another invocation may be filling the same file (e.g. other --ks)."""
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.rows[(r["method"], r["nfe"])] = r

    def has(self, method: str, nfe: int) -> bool:
        with self.lock:
            self._read()
            return (method, nfe) in self.rows

    def add(self, row: dict) -> None:
        with self.lock:
            self.rows[(row["method"], row["nfe"])] = row
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(out / "rows.jsonl")
    if args.plot_only:
        finish(rows, out)
        return

    import ray

    from rayflow.config import with_overrides
    from rayflow.evaluation.classifier import load_or_train_classifier
    from rayflow.evaluation.metrics import image_metrics
    from rayflow.files import export_path
    from rayflow.models import guided, load_teacher
    from rayflow.orchestrate import evaluate
    from rayflow.orchestrate.training import export_student, run_training

    t_start = time.perf_counter()
    job = compose_job(args)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    cache = evaluate.cache_dir(job)
    # The first N_REAL images: the classifier's training set and the reference; the next --samples: a
    # held-out real set scored like a model (the metrics' noise floor).
    real_x, real_y = evaluate.real_images(job, N_REAL + args.samples)
    ref_x, ref_y = real_x[:N_REAL], real_y[:N_REAL]
    key = f"{job.data.source}-{job.data.resolution}px-{job.data.channels}ch-{job.data.num_classes}cls"
    classifier, clf_sha = load_or_train_classifier(cache, key, ref_x, ref_y)
    image_metrics(classifier, ref_x[:8], ref_y[:8], ref_x, ref_y)  # build the cached real reference once
    seed = job.run.seed + 17
    common = {"samples": args.samples, "reference": N_REAL, "classifier_sha256": clf_sha[:16], "seed": seed}

    def score(method: str, nfe: int, x, y, secs: float, **extra) -> None:
        m = image_metrics(classifier, x, y, ref_x, ref_y)
        rows.add({"method": method, "nfe": nfe, **{k: round(float(v), 5) for k, v in m.items()},
                  "s_per_1k": round(secs * 1000.0 / len(x), 2), **common, **extra})

    teacher = guided(load_teacher(job.teacher.checkpoint, job.model, job.data, sha256=job.teacher.sha256,
                                  teacher=job.teacher), job.teacher.guidance_scale, job.data)

    def run_sampler(method: str, den, sampler: str, steps: int, **extra) -> None:
        if rows.has(method, steps):
            return
        x, y, secs = evaluate.generate(den, job, sampler, steps, args.samples, seed=seed)
        score(method, steps, x, y, secs, **extra)

    # Most important first: the 256-step teacher, DDIM at the largest k, then the rest (512 costs most).
    ks_desc = sorted(args.ks, reverse=True)
    t_desc = sorted(args.teacher_steps, reverse=True)
    anchor = [n for n in t_desc if n == 256] or t_desc[:1]
    teacher_tasks = [("teacher_ancestral", "ancestral", n) for n in anchor]
    teacher_tasks += [("teacher_ddim", "ddim", k) for k in ks_desc]
    teacher_tasks += [("teacher_ancestral", "ancestral", n) for n in sorted(args.teacher_steps)
                      if n not in anchor]
    errors: list[BaseException] = []

    def teacher_rows() -> None:
        try:
            if not rows.has("real", 0):
                x, y = real_x[N_REAL:], real_y[N_REAL:]
                score("real", 0, x, y, 0.0)
            for method, sampler, steps in teacher_tasks:
                run_sampler(method, teacher, sampler, steps)
        except BaseException as e:  # reported after the students; the main thread keeps going
            errors.append(e)
            raise

    worker = threading.Thread(target=teacher_rows, name="teacher-rows", daemon=True)
    worker.start()
    if args.no_parallel:
        worker.join()

    algorithms = [a for a in args.algorithms.split(",") if a]
    order = [(a, k) for k in ks_desc[:1] for a in algorithms]  # k=8 first, both algorithms
    order += [(a, k) for a in algorithms for k in ks_desc[1:]]
    for algorithm, k in order:
        method = f"student_{algorithm}"
        if rows.has(method, k):
            continue
        n_img = args.train_images_k8 if (k == max(args.ks) and args.train_images_k8) else args.train_images
        name = f"sq-{algorithm}-k{k}-{n_img}"
        sjob = with_overrides(job, {"distill.algorithm": algorithm, "distill.steps": k,
                                    "distill.train_images": n_img, "run.name": name})
        export_dir = os.path.join(sjob.run.absolute_storage(), name, "export")
        path = export_path(export_dir, "student")
        extra = {"train_images": n_img, "ema_decay": sjob.distill.ema_decay, "lr_student": sjob.distill.lr_student}
        if not os.path.isfile(path):
            t0 = time.perf_counter()
            res = run_training(sjob, "distill", name)
            export_student(sjob, res.checkpoint_dir, export_dir)
            extra["train_s"] = round(time.perf_counter() - t0, 1)
            extra["train_images_per_s"] = round(n_img / extra["train_s"], 1)
        student = load_teacher(path, sjob.model, sjob.data, teacher=sjob.teacher)
        run_sampler(method, student, "student", k, **extra)

    worker.join()
    print(json.dumps({"total_s": round(time.perf_counter() - t_start, 1)}), flush=True)
    finish(rows, out)
    if errors:
        raise RuntimeError("the teacher's rows failed") from errors[0]


def sorted_rows(rows: Rows) -> list[dict]:
    order = list(LABELS)
    return sorted(rows.rows.values(), key=lambda r: (order.index(r["method"]) if r["method"] in order else 99,
                                                     r["nfe"]))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | NFE | FD (lower) | accuracy | precision | recall | s per 1k samples | distilled on |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        train = f"{r['train_images']:,} images" if "train_images" in r else ""
        secs = f"{r['s_per_1k']:.1f}" if r["method"] != "real" else ""
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['nfe']} | {r['fd']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {secs} | {train} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"teacher_ancestral": "o-", "teacher_ddim": "s--", "student_alternating": "^-",
              "student_parameter_space": "v-"}
    real = [r for r in rows if r["method"] == "real"]
    for ax, key, title in ((axes[0], "fd", "Frechet distance (classifier features), lower is better"),
                           (axes[1], "accuracy", "class accuracy of samples (above the real floor: too prototypical)")):
        for method, style in styles.items():
            pts = sorted((r["nfe"], r[key]) for r in rows if r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=LABELS[method])
        if real:
            ax.axhline(real[0][key], color="grey", linestyle=":", label=LABELS["real"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=8)
    n = rows[0]["samples"] if rows else 0
    fig.suptitle(f"MNIST 16 px, shipped teacher: quality vs steps ({n} samples per point, 2,000 real reference)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(rows: Rows, out: Path) -> None:
    ordered = sorted_rows(rows)
    if not ordered:
        return
    table = markdown_table(ordered)
    (out / "table.md").write_text(table + "\n")
    plot(ordered, out / "steps_quality.png")
    print(table, flush=True)


if __name__ == "__main__":
    main()
