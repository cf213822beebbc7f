"""Steps versus quality on a Gaussian mixture, against the exact truth (CPU).

Trains an MLP teacher on samples of the mixture in --spec, distils k-step students with both moment-matching
algorithms, and compares against the true mixture: the teacher's ancestral sampler at 8..512 steps, DDIM at
k steps and each student at k steps. The exact denoiser E[x | z_t] (closed form) with the same ancestral sampler
and noise shows what the sampler itself reaches at each step count: a perfect teacher scores there.
Metrics: sliced Wasserstein-2 (lower is better), mode-mass total variation (lower), mean log-likelihood under
the true mixture (closest to the truth's), and the component-wise moment error (lower): per true component,
the mean and covariance of the samples it explains best, in units of its own std
(rayflow.core.metrics.component_moment_errors). A fresh true sample of the same size is scored too: its row
is the noise floor of the metrics, and the table gives every row's SW2 and moment error as a multiple of it
(and teacher rows as a multiple of the exact denoiser's at the same steps).

    python benchmarks/gmm_quality.py --out runs/gmm2d
    python benchmarks/gmm_quality.py --spec benchmarks/specs/gmm16d.json --out runs/gmm16d
    python benchmarks/gmm_quality.py --spec benchmarks/specs/ring2d.json --teacher-only --teacher-steps 256 --seeds 0,1

--teacher-only trains the teacher and scores only the truth, exact and teacher ancestral rows (sizing the
teacher). A spec may carry its own teacher sizing ("teacher": {"width": 512, ...}, keys in TEACHER_KEYS): it
replaces the flags' defaults, and flags given on the command line override it. --seeds repeats everything
(training data, reference, teacher, students, sampling noise) per seed and adds mean ± std per row. --out DIR
writes results.json and samples/<method>_<k>.npy ([N, D]; with several seeds samples/seed<s>/<method>_<k>.npy)
so anyone can recompute the metrics.
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
from rayflow.core.gaussian_mixture import GaussianMixture, SharedTimeMixtureDenoiser
from rayflow.core.metrics import mixture_metrics
from rayflow.core.samplers import sample
from rayflow.core.schedule import CosineSchedule

HERE = Path(__file__).resolve().parent
METRICS = ("sw2", "mode_mass_tv", "loglik", "moment_err", "mean_err", "cov_err")
RATIOS = ("sw2_vs_truth", "moment_vs_truth", "sw2_vs_exact", "moment_vs_exact")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


# Teacher flags a spec may set for itself ({"teacher": {"width": 512, ...}}); the command line still wins.
TEACHER_KEYS = ("width", "depth", "teacher_iters", "teacher_lr")


def spec_teacher_defaults(spec: str | Path) -> dict:
    """The spec's optional "teacher" sizing (keys from TEACHER_KEYS), {} when it has none."""
    teacher = json.loads(Path(spec).read_text()).get("teacher", {})
    unknown = sorted(set(teacher) - set(TEACHER_KEYS))
    if unknown:
        raise ValueError(f"{spec}: unknown teacher keys {unknown}; choose from {list(TEACHER_KEYS)}")
    return teacher


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with the spec's "teacher" sizing as defaults: a flag given on the command line overrides it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(HERE / "specs" / "gmm2d.json"), help="mixture JSON spec")
    p.add_argument("--steps", type=_ints, default=[1, 2, 4, 8], help="student step counts k")
    p.add_argument("--teacher-steps", type=_ints, default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--exact-steps", type=_ints, default=None,
                   help="ancestral steps for the exact denoiser's rows (default: --teacher-steps; '' for none)")
    p.add_argument("--teacher-only", action="store_true",
                   help="train the teacher, score only the truth, exact and teacher ancestral rows (no DDIM, students)")
    p.add_argument("--algorithms", default="alternating,parameter_space")
    p.add_argument("--n-train", type=int, default=100_000, help="training samples drawn from the mixture")
    p.add_argument("--n-eval", type=int, default=10_000, help="samples per evaluated method (and the reference)")
    p.add_argument("--width", type=int, default=256, help="teacher MLP width (README: teacher sizing)")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--teacher-iters", type=int, default=6000)
    p.add_argument("--teacher-lr", type=float, default=2e-3, help="peak teacher lr (cosine decay, 100 warmup)")
    p.add_argument("--distill-iters", type=int, default=1200, help="optimizer updates per distillation run")
    p.add_argument("--lr-student", type=float, default=1e-4)
    p.add_argument("--lr-ratio", type=float, default=1.0, help="lr_aux / lr_student (alternating)")
    p.add_argument("--aux-per-student", type=int, default=2,
                   help="alternating: aux updates per student update (2: distill.aux_per_student's default; 1: the "
                        "paper's strict alternation)")
    p.add_argument("--weighting", default="snr_plus_one")
    p.add_argument("--s-sampling", default="mixed")
    p.add_argument("--seed", type=int, default=0, help="the one seed, unless --seeds is given")
    p.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds: repeat the whole run per seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small MLPs)")
    p.add_argument("--out", default=None, help="write results.json and samples/ here")
    p.set_defaults(**spec_teacher_defaults(p.parse_known_args(argv)[0].spec))
    return p.parse_args(argv)


def run_seed(args: argparse.Namespace, gm: GaussianMixture, seed: int, samples_dir: Path | None) -> tuple[list, dict]:
    """One full run at `seed`: rows (one per method and NFE) and timings in seconds."""
    start = time.perf_counter()
    schedule = CosineSchedule()
    g = torch.Generator().manual_seed(seed)
    data, _ = gm.sample(args.n_train, generator=g)
    reference, _ = gm.sample(args.n_eval, generator=g)
    if samples_dir:
        samples_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    exact: dict[tuple[str, int], dict] = {}

    def record(method: str, k: int, x: torch.Tensor, seconds: float) -> None:
        row = {"method": method, "nfe": k, "seed": seed,
               **mixture_metrics(gm, x.double(), reference, seed=seed), "sample_s": round(seconds, 3)}
        if rows:  # the truth row comes first: every other row as a multiple of its noise floor
            row["sw2_vs_truth"] = row["sw2"] / rows[0]["sw2"]
            row["moment_vs_truth"] = row["moment_err"] / rows[0]["moment_err"]
        if method == "teacher_ancestral" and ("exact_ancestral", k) in exact:  # the same sampler and noise
            row["sw2_vs_exact"] = row["sw2"] / exact["exact_ancestral", k]["sw2"]
            row["moment_vs_exact"] = row["moment_err"] / exact["exact_ancestral", k]["moment_err"]
        if method == "exact_ancestral":
            exact[method, k] = row
        rows.append(row)
        print(json.dumps(row), flush=True)
        if samples_dir:
            np.save(samples_dir / f"{method}_{k}.npy", x.double().numpy())

    record("truth", 0, gm.sample(args.n_eval, generator=g)[0], 0.0)

    def run_sampler(name: str, denoiser, k: int, method: str) -> None:
        t0 = time.perf_counter()
        x = sample(name, denoiser, (args.n_eval, gm.dim), k, schedule,
                   generator=torch.Generator().manual_seed(seed + 1))
        record(method, k, x, time.perf_counter() - t0)

    exact_steps = args.teacher_steps if args.exact_steps is None else args.exact_steps
    t0 = time.perf_counter()
    for n in exact_steps:
        run_sampler("ancestral", SharedTimeMixtureDenoiser(gm, schedule), n, "exact_ancestral")
    timings = {"exact_sample_s": time.perf_counter() - t0}

    t0, c0 = time.perf_counter(), time.process_time()
    teacher = lab.fit_teacher(data, schedule, width=args.width, depth=args.depth, steps=args.teacher_iters,
                              batch=args.batch, lr=args.teacher_lr, seed=seed, weighting=args.weighting)
    timings["teacher_train_s"] = time.perf_counter() - t0
    timings["teacher_train_cpu_s"] = time.process_time() - c0  # CPU seconds: what wall time is on a quiet box
    for n in args.teacher_steps:
        run_sampler("ancestral", teacher.denoiser, n, "teacher_ancestral")
    if args.teacher_only:
        timings["total_s"] = time.perf_counter() - start
        return rows, timings
    for k in args.steps:
        run_sampler("ddim", teacher.denoiser, k, "teacher_ddim")
        run_sampler("ancestral", teacher.denoiser, k, "teacher_ancestral") if k not in args.teacher_steps else None
    for algorithm in [a for a in args.algorithms.split(",") if a]:
        for k in args.steps:
            t0 = time.perf_counter()
            student = lab.distill(
                teacher, data, schedule, algorithm=algorithm, student_steps=k, train_steps=args.distill_iters,
                batch=args.batch, lr_student=args.lr_student, lr_ratio=args.lr_ratio, weighting=args.weighting,
                s_sampling=args.s_sampling, aux_per_student=args.aux_per_student, seed=seed,
            )
            timings[f"distill_{algorithm}_{k}_s"] = time.perf_counter() - t0
            run_sampler("student", student, k, f"student_{algorithm}")
    timings["total_s"] = time.perf_counter() - start
    return rows, timings


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std (ddof 0) over seeds of every metric, one entry per (method, NFE), in first-seen order.

    Ratios are ratios of the seed means (e.g. mean SW2 / mean truth SW2): the truth's SW2 alone varies 2-3x
    between seeds, so a mean of per-seed ratios is noisier; their std is kept as `<ratio>_std`.
    """
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["nfe"]), []).append(r)
    out = []
    for (method, nfe), rs in groups.items():
        entry = {"method": method, "nfe": nfe, "seeds": [r["seed"] for r in rs]}
        for key in (*METRICS, *RATIOS):
            if key in rs[0]:
                v = np.array([r[key] for r in rs], dtype=np.float64)
                entry[key], entry[f"{key}_std"] = float(v.mean()), float(v.std())
        out.append(entry)
    means = {(e["method"], e["nfe"]): e for e in out}
    truth = means.get(("truth", 0))
    for e in out:
        exact = means.get(("exact_ancestral", e["nfe"]))
        for ref, name in ((truth, "truth"), (exact if e["method"] == "teacher_ancestral" else None, "exact")):
            if ref is not None and e is not ref:
                e[f"sw2_vs_{name}"] = e["sw2"] / ref["sw2"]
                e[f"moment_vs_{name}"] = e["moment_err"] / ref["moment_err"]
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds or [args.seed]
    gm = GaussianMixture.from_json(args.spec)
    out = Path(args.out) if args.out else None
    rows, timings_by_seed = [], {}
    for seed in seeds:
        samples_dir = None if out is None else out / "samples" / (f"seed{seed}" if len(seeds) > 1 else "")
        seed_rows, timings = run_seed(args, gm, seed, samples_dir)
        rows += seed_rows
        timings_by_seed[str(seed)] = {k: round(v, 1) for k, v in timings.items()}
    keys = list(timings_by_seed[str(seeds[0])])
    mean_timings = {k: round(float(np.mean([t[k] for t in timings_by_seed.values()])), 1) for k in keys}
    summary = summarize(rows)
    result = {"spec": args.spec, "dim": gm.dim, "components": gm.num_components, "args": vars(args), "seeds": seeds,
              "rows": rows, "summary": summary, "timings": mean_timings, "timings_by_seed": timings_by_seed}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
    print(markdown_table(summary))
    print(json.dumps({"timings": mean_timings, "timings_by_seed": timings_by_seed}))
    return result


def _cell(r: dict, key: str, fmt: str, spread: bool = True) -> str:
    if key not in r:
        return ""
    std = r.get(f"{key}_std")
    many = spread and len(r.get("seeds", [])) > 1 and std is not None
    return format(r[key], fmt) + (f" ± {format(std, fmt)}" if many else "")


def markdown_table(rows: list[dict]) -> str:
    """Rows or summary entries; with several seeds a metric is mean ± std over seeds, a ratio the ratio of means."""
    lines = ["| method | NFE | SW2 (lower) | mode-mass TV (lower) | log-lik (truth's best) | moment err = mean + cov "
             "(lower) | SW2 / truth | moment / truth | SW2 / exact | moment / exact |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        moment = (f"{_cell(r, 'moment_err', '.4f')} ({_cell(r, 'mean_err', '.3f', False)} + "
                  f"{_cell(r, 'cov_err', '.3f', False)})")
        cells = [_cell(r, "sw2", ".4f"), _cell(r, "mode_mass_tv", ".4f"), _cell(r, "loglik", ".3f"), moment,
                 *(_cell(r, key, ".2f", False) for key in RATIOS)]
        lines.append(f"| {r['method']} | {r['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
