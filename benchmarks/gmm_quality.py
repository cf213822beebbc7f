"""Steps versus quality on a Gaussian mixture, against the exact truth (CPU).

Trains an MLP teacher on samples of the mixture in --spec, distils k-step students with both moment-matching
algorithms, and compares against the true mixture: the teacher's ancestral sampler at 8..512 steps, DDIM at
k steps and each student at k steps. Metrics: sliced Wasserstein-2 (lower is better), mode-mass total
variation (lower), mean log-likelihood under the true mixture (higher). A fresh true sample of the same size
is scored too: its row is the noise floor of the metrics.

    python benchmarks/gmm_quality.py --out runs/gmm2d
    python benchmarks/gmm_quality.py --spec benchmarks/specs/gmm16d.json --out runs/gmm16d

--out DIR writes results.json and samples/<method>_<k>.npy ([N, D]) so anyone can recompute the metrics.
Prints one JSON line per row, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rayflow import lab
from rayflow.core.gaussian_mixture import GaussianMixture
from rayflow.core.metrics import mixture_metrics
from rayflow.core.samplers import sample
from rayflow.core.schedule import CosineSchedule

HERE = Path(__file__).resolve().parent


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(HERE / "specs" / "gmm2d.json"), help="mixture JSON spec")
    p.add_argument("--steps", type=_ints, default=[1, 2, 4, 8], help="student step counts k")
    p.add_argument("--teacher-steps", type=_ints, default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--algorithms", default="alternating,parameter_space")
    p.add_argument("--n-train", type=int, default=100_000, help="training samples drawn from the mixture")
    p.add_argument("--n-eval", type=int, default=10_000, help="samples per evaluated method")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--teacher-iters", type=int, default=3000)
    p.add_argument("--distill-iters", type=int, default=1200, help="optimizer updates per distillation run")
    p.add_argument("--lr-student", type=float, default=1e-4)
    p.add_argument("--lr-ratio", type=float, default=1.0, help="lr_aux / lr_student (alternating)")
    p.add_argument("--weighting", default="snr_plus_one")
    p.add_argument("--s-sampling", default="mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small MLPs)")
    p.add_argument("--out", default=None, help="write results.json and samples/ here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    gm = GaussianMixture.from_json(args.spec)
    schedule = CosineSchedule()
    g = torch.Generator().manual_seed(args.seed)
    data, _ = gm.sample(args.n_train, generator=g)
    reference, _ = gm.sample(args.n_eval, generator=g)
    out = Path(args.out) if args.out else None
    if out:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def record(method: str, k: int, x: torch.Tensor, seconds: float) -> None:
        row = {"method": method, "nfe": k, **mixture_metrics(gm, x.double(), reference, seed=args.seed),
               "sample_s": round(seconds, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out:
            np.save(out / "samples" / f"{method}_{k}.npy", x.double().numpy())

    record("truth", 0, gm.sample(args.n_eval, generator=g)[0], 0.0)

    def run_sampler(name: str, denoiser, k: int, method: str) -> None:
        t0 = time.perf_counter()
        x = sample(name, denoiser, (args.n_eval, gm.dim), k, schedule,
                   generator=torch.Generator().manual_seed(args.seed + 1))
        record(method, k, x, time.perf_counter() - t0)

    t0 = time.perf_counter()
    teacher = lab.fit_teacher(data, schedule, width=args.width, depth=args.depth, steps=args.teacher_iters,
                              batch=args.batch, seed=args.seed, weighting=args.weighting)
    timings = {"teacher_train_s": time.perf_counter() - t0}
    for n in args.teacher_steps:
        run_sampler("ancestral", teacher.denoiser, n, "teacher_ancestral")
    for k in args.steps:
        run_sampler("ddim", teacher.denoiser, k, "teacher_ddim")
        run_sampler("ancestral", teacher.denoiser, k, "teacher_ancestral") if k not in args.teacher_steps else None
    for algorithm in [a for a in args.algorithms.split(",") if a]:
        for k in args.steps:
            t0 = time.perf_counter()
            student = lab.distill(
                teacher, data, schedule, algorithm=algorithm, student_steps=k, train_steps=args.distill_iters,
                batch=args.batch, lr_student=args.lr_student, lr_ratio=args.lr_ratio, weighting=args.weighting,
                s_sampling=args.s_sampling, seed=args.seed,
            )
            timings[f"distill_{algorithm}_{k}_s"] = time.perf_counter() - t0
            run_sampler("student", student, k, f"student_{algorithm}")
    timings["total_s"] = time.perf_counter() - start
    result = {"spec": args.spec, "dim": gm.dim, "components": gm.num_components, "args": vars(args),
              "rows": rows, "timings": {k: round(v, 1) for k, v in timings.items()}}
    if out:
        (out / "results.json").write_text(json.dumps(result, indent=2))
    print(markdown_table(rows))
    print(json.dumps({"timings": result["timings"]}))
    return result


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | NFE | SW2 (lower) | mode-mass TV (lower) | log-lik (higher) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']} | {r['sw2']:.4f} | {r['mode_mass_tv']:.4f} | {r['loglik']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
