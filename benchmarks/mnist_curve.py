"""MNIST 16 px, long budgets: the k-step student's Frechet distance against images seen (issue 12, item 5).

The CPU demo distils for 60,000 images; whether the 8-step student reaches its 256-step teacher with more is the
open question this curve answers. It is meant for a GPU machine, which has neither Ray nor Hydra, so it runs in
two parts:

    # 1. here (Ray, Hydra): the demo's composed config, its 5,000 real images and the cached evaluation classifier
    python benchmarks/mnist_curve.py --prepare --inputs runs/mnist_curve_inputs
    # 2. anywhere with torch (GPU: carry runs/mnist_curve_inputs): distil, scoring the student's EMA as it goes
    python benchmarks/mnist_curve.py --inputs runs/mnist_curve_inputs --device cuda --ks 8,4 --images 3000000

Part 2 trains with the Ray Train worker's own step (`rayflow.worker.state.build_state`: same networks, optimizers,
schedule, EMA and `resources.precision`) on random batches of the in-memory images, for each k in --ks and each
budget in --images (one cosine schedule per budget, as `distill.train_images` sets it). Every --eval-every-images
it scores the EMA on --proxy-samples k-step samples (the same noise each time) and keeps the best one
(`rayflow.lab.Selection`); at the end it scores the best EMA, and the teacher (ancestral, --teacher-steps) and
k-step DDIM, on --eval-samples samples for each noise seed in --seeds, exactly as `python -m rayflow.evaluate`
does (labels i mod 10, per-sample noise from (seed, i), the classifier and real reference --prepare exported).
Compare a student with the teacher rows of the same run: FD depends on the evaluation classifier, whose SHA-256
--prepare records in meta.json (benchmarks/mnist_seeds.py's rows record theirs). Rows go to <out>/rows.jsonl as
they come (`kind`: curve | final); a markdown table of the final rows ends the output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayflow.config import JobConfig, with_overrides  # noqa: E402
from rayflow.evaluation.generate import generate_samples  # noqa: E402
from rayflow.evaluation.metrics import load_reference, metrics_against, real_reference, save_reference  # noqa: E402
from rayflow.lab import Selection  # noqa: E402
from rayflow.models import load_teacher, save_state_dict  # noqa: E402
from rayflow.worker.state import build_state  # noqa: E402

PROXY_SEED = 29  # the in-training evaluation's noise (run.seed + 29)
KEYS = ("fd", "precision", "recall", "accuracy")


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=Path, default=ROOT / "runs" / "mnist_curve_inputs")
    p.add_argument("--prepare", action="store_true", help="write --inputs from the demo's config (needs Ray, Hydra)")
    p.add_argument("--override", action="append", default=[], help="--prepare: a Hydra override (repeatable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", help="resources.precision: auto (bf16 on GPU) | fp32 | bf16")
    p.add_argument("--ks", type=ints, default=[8, 4], help="student steps")
    p.add_argument("--images", type=ints, default=[3_000_000], help="budgets (distill.train_images), one run each")
    p.add_argument("--batch", type=int, default=None, help="data.batch_size (default: the demo's)")
    p.add_argument("--eval-every-images", type=int, default=200_000)
    p.add_argument("--proxy-samples", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=5000)
    p.add_argument("--seeds", type=ints, default=[17, 18, 19], help="noise seeds of the final rows (eval.seed)")
    p.add_argument("--teacher-steps", type=int, default=256)
    p.add_argument("--skip-teacher", action="store_true",
                   help="no teacher rows (on a CPU its 256-step rows cost an hour): compare with teacher rows scored "
                        "elsewhere with the classifier whose SHA-256 meta.json records (e.g. mnist_study.py's)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mnist_curve")
    p.add_argument("--export", action="store_true", help="also save each selected student to <out>")
    args = p.parse_args(argv)
    if args.proxy_samples > args.eval_samples:
        p.error("--proxy-samples must not exceed --eval-samples (the prepared reference is sized for the latter)")
    return args


def prepare(args: argparse.Namespace) -> None:
    """The demo's config, its real images and the evaluation classifier + reference, into --inputs."""
    from hydra import compose, initialize_config_dir

    from rayflow.cli import CONF_DIR, job_from_hydra
    from rayflow.orchestrate.evaluate import cache_dir, classifier_and_real

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        job = job_from_hydra(compose(config_name="config", overrides=args.override))
    classifier, sha, real_x, real_y = classifier_and_real(job, cache_dir(job), args.eval_samples)
    write_inputs(args.inputs, job, real_x, real_y, classifier, classifier_sha256=sha)


def write_inputs(path: Path, job: JobConfig, x: torch.Tensor, y: torch.Tensor, classifier, **meta) -> None:
    """job.json (the teacher's path relative to the checkout when inside it), data.npz, reference.pt, meta.json."""
    path.mkdir(parents=True, exist_ok=True)
    d = job.to_dict()
    ckpt = Path(d["teacher"]["checkpoint"]).resolve()
    if ckpt.is_relative_to(ROOT):
        d["teacher"]["checkpoint"] = str(ckpt.relative_to(ROOT))
    (path / "job.json").write_text(json.dumps(d, indent=1))
    np.savez_compressed(path / "data.npz", x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))
    save_reference(str(path / "reference.pt"), classifier, real_reference(classifier, x, y))
    (path / "meta.json").write_text(json.dumps({"real_images": len(y), **meta}))


def load_inputs(path: Path):
    d = json.loads((path / "job.json").read_text())
    ckpt = d["teacher"]["checkpoint"]
    d["teacher"]["checkpoint"] = str(ckpt if os.path.isabs(ckpt) else ROOT / ckpt)
    arrays = np.load(path / "data.npz")
    classifier, ref = load_reference(str(path / "reference.pt"))
    return JobConfig.from_dict(d), torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]), classifier, ref


class Scorer:
    """Samples of a denoiser scored as rayflow.evaluate scores them: labels i mod classes, noise from (seed, i)."""

    def __init__(self, job: JobConfig, classifier, ref, device: torch.device) -> None:
        self.job, self.classifier, self.ref, self.device = job, classifier, ref, device

    def __call__(self, den, sampler: str, steps: int, n: int, seed: int) -> dict:
        d = self.job.data
        labels = torch.arange(n) % d.num_classes
        x, secs = generate_samples(den, sampler, steps, labels, (d.channels, d.resolution, d.resolution),
                                   batch=self.job.run.eval_batch, seed=seed, device=self.device)
        m = metrics_against(self.classifier, self.ref, x, labels)
        return {k: round(float(m[k]), 5) for k in KEYS} | {"samples": n, "seed": seed, "sample_s": round(secs, 2)}


def distil_curve(job: JobConfig, x: torch.Tensor, y: torch.Tensor, score: Scorer, args, device: torch.device,
                 emit) -> tuple[torch.nn.Module, dict]:
    """One distillation on images x (N, C, H, W) in [-1, 1] with labels y, by the worker's step; a curve row per
    evaluation; returns the best EMA and what the selection saw."""
    k, batch = job.distill.steps, job.data.batch_size
    state = build_state(job, "distill", device)
    every = max(1, args.eval_every_images // batch)
    total = state.total_updates
    evaluations = iter(range(1, total + 1))
    t0 = time.perf_counter()

    def proxy(student: torch.nn.Module) -> float:
        update = min(next(evaluations) * every, total)  # Selection scores every `every` updates and the last
        row = score(student, "student", k, args.proxy_samples, PROXY_SEED)
        emit({"kind": "curve", "k": k, "budget_images": job.distill.train_images, "update": update,
              "images": update * batch, "wall_s": round(time.perf_counter() - t0, 1), **row})
        return row["fd"]

    select = Selection(proxy, every)
    data_g = torch.Generator().manual_seed(job.run.seed)
    for u in range(total):
        i = torch.randint(0, len(y), (batch,), generator=data_g)
        noise = torch.Generator(device=device).manual_seed(job.run.seed * 1_000_003 + u)
        state.step(u, x[i].to(device, non_blocking=True), y[i].to(device, non_blocking=True), noise)
        state.counters.updates = u + 1
        state.step_schedules()
        select.observe(u + 1, total, state.ema.module)
    best = dict(select.curve)
    return select.best, {"selected_update": select.selected_update, "selected_proxy_fd": best[select.selected_update],
                         "last_proxy_fd": select.curve[-1][1], "train_s": round(time.perf_counter() - t0, 1)}


def summarize(rows: list[dict]) -> list[str]:
    """Markdown lines: per (budget, k) the final rows' mean ± std over seeds and the student/teacher FD ratio."""
    finals = [r for r in rows if r["kind"] == "final"]
    teacher = {r["seed"]: r["fd"] for r in finals if r["method"] == "teacher_ancestral"}
    out = ["| method | k | budget (images) | seeds | FD | precision | recall | accuracy | FD / teacher |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in finals:
        groups.setdefault((r["method"], r["k"], r.get("budget_images")), []).append(r)

    def ms(vals: list[float]) -> str:
        return f"{statistics.fmean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")

    for (method, k, budget), rs in groups.items():
        ratios = [r["fd"] / teacher[r["seed"]] for r in rs if r["seed"] in teacher]
        cells = [ms([r[key] for r in rs]) for key in KEYS]
        out.append(f"| {method} | {k} | {budget or ''} | {len(rs)} | " + " | ".join(cells)
                   + f" | {ms(ratios) if ratios else ''} |")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        prepare(args)
        return 0
    device = torch.device(args.device)
    job, x, y, classifier, ref = load_inputs(args.inputs)
    job = with_overrides(job, {"resources.precision": args.precision,
                               **({"data.batch_size": args.batch} if args.batch else {})})
    if args.eval_samples > len(y):
        raise SystemExit(f"--eval-samples {args.eval_samples} > the {len(y)} prepared real images; FIX THIS by "
                         "preparing with at least as many (--prepare --eval-samples N)")
    score = Scorer(job, classifier, ref, device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    t = job.teacher
    teacher = load_teacher(t.checkpoint, job.model, job.data, sha256=t.sha256, device=device, teacher=t)
    for seed in [] if args.skip_teacher else args.seeds:
        emit({"kind": "final", "method": "teacher_ancestral", "k": args.teacher_steps,
              **score(teacher, "ancestral", args.teacher_steps, args.eval_samples, seed)})
        for k in args.ks:
            emit({"kind": "final", "method": "teacher_ddim", "k": k,
                  **score(teacher, "ddim", k, args.eval_samples, seed)})
    for budget in args.images:
        for k in args.ks:
            job_k = with_overrides(job, {"distill.steps": k, "distill.train_images": budget})
            student, info = distil_curve(job_k, x.float(), y.long(), score, args, device, emit)
            if args.export:
                save_state_dict(student.state_dict(), args.out / f"student-k{k}-{budget}.pt")
            for seed in args.seeds:
                emit({"kind": "final", "method": "student_selected", "k": k, "budget_images": budget, **info,
                      **score(student, "student", k, args.eval_samples, seed)})
    print("\n".join(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
