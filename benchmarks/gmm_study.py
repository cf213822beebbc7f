"""What moves the k-step student on Gaussian mixtures: one distillation knob at a time, several seeds (CPU).

Per spec and seed: the data, the reference sample and the teacher are those of `gmm_quality.py` at its defaults
(same sizing flags, a spec's own "teacher" sizing included, same seeds); the teacher's 256-step ancestral sampler
and k-step DDIM are scored, then one student per variant below (each changes one knob of the baseline) is distilled
at each k and scored. Each student's component-wise moment error and SW2 are divided by the same seed's 256-step
teacher (and by its k-step DDIM, and by the same seed's alternating baseline student: a paired ratio), then
averaged over seeds: mean ± std.

    python benchmarks/gmm_study.py --specs gmm2d,gmm16d --seeds 0,1,2 --k 8 --out runs/study
    python benchmarks/gmm_study.py --variants baseline,uniform_s,no_ema --k 4,8

Prints one JSON line per scored row, then a markdown table per spec and k; --out appends to rows.jsonl (and
caches the teacher and its 256-step score there: each costs minutes, and a study varies neither).
--summarize prints the tables of every row in --out's rows.jsonl instead (all invocations, e.g. the variants
run in parallel or on different days; a row scored again replaces the earlier one) and runs nothing.
Student rows carry their algorithm; a parameter-space student shows as `<variant> [parameter_space]`.
The `*select` variants keep the student's EMA with the lowest proxy (SW2 of --n-proxy k-step samples against a
held-out true draw, every --select-every updates and at the end; `ProxySW2`); their rows carry the proxy
`curve` [(update, SW2)], `curve_moment` [(update, moment error of the same samples)] and `selected_update`, and
the tables list the selected update per seed. A select variant also scores its last checkpoint as the variant it
selects on (`select` gives a `baseline` row, `updates_x4_select` an `updates_x4` row; same training, so the same
row a separate run gives, marked `scored_by`): no need to run both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import gmm_quality
import torch

from rayflow import lab
from rayflow.core.diffusion import Denoiser
from rayflow.core.gaussian_mixture import GaussianMixture
from rayflow.core.metrics import component_moment_errors, mixture_metrics, sliced_wasserstein2
from rayflow.core.samplers import sample
from rayflow.core.schedule import CosineSchedule
from rayflow.core.steps import freeze
from rayflow.nets import build_net

HERE = Path(__file__).resolve().parent

# Each variant changes the baseline (lab.distill's keywords) in one knob. "x4" multiplies the updates.
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "uniform_s": {"s_sampling": "uniform"},
    "no_ema": {"ema_decay": 0.0},
    "ema_0.999": {"ema_decay": 0.999},
    "lr_x3": {"lr_scale": 3.0},
    "lr_div3": {"lr_scale": 1 / 3},
    "lr_ratio_2": {"lr_ratio": 2.0},
    "lr_ratio_0.5": {"lr_ratio": 0.5},
    "linear_warmup": {"lr_schedule": "linear", "warmup": 100},
    "no_aux_teacher_term": {"aux_teacher_weight": 0.0},
    "weight_one": {"weighting": "one"},
    "updates_x4": {"updates_scale": 4},
    "batch_x4": {"batch_scale": 4},
    "aux_x2": {"aux_per_student": 2},  # two aux updates per student update (same total updates)
    "aux_x2_updates_x1.5": {"aux_per_student": 2, "updates_scale": 1.5},  # as many student updates as baseline
}
# Best-checkpoint selection on top of a variant: the student's EMA with the lowest proxy SW2 (`ProxySW2`) seen
# every --select-every updates, not the last one. "select" is the baseline's.
VARIANTS |= {("select" if v == "baseline" else f"{v}_select"): {**VARIANTS[v], "select": True}
             for v in ("baseline", "aux_x2", "updates_x4")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", default="gmm2d,gmm16d", help="spec names under benchmarks/specs (or JSON paths)")
    p.add_argument("--seeds", type=gmm_quality._ints, default=[0, 1, 2])
    p.add_argument("--k", type=gmm_quality._ints, default=[8], help="student step counts")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--algorithm", default="alternating")
    p.add_argument("--n-eval", type=int, default=10_000)
    p.add_argument("--n-proxy", type=int, default=5000,
                   help="select variants: student samples (and held-out true samples) per proxy SW2, <= --n-eval")
    p.add_argument("--select-every", type=int, default=100, help="select variants: updates between proxy scores")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-seed", type=int, default=None,
                   help="train one teacher with this seed and vary only the distillation and sampling seeds "
                        "(default: a teacher per seed, as gmm_quality.py)")
    p.add_argument("--base-args", default="", help="gmm_quality.py flags for the teacher and the baseline, "
                   "e.g. '--distill-iters 2400 --teacher-iters 6000' (default: its defaults)")
    p.add_argument("--out", default=None, help="append rows to rows.jsonl here (and cache the teacher)")
    p.add_argument("--summarize", action="store_true", help="tabulate --out's rows.jsonl; run nothing")
    return p.parse_args(argv)


def spec_path(name: str) -> str:
    return name if name.endswith(".json") else str(HERE / "specs" / f"{name}.json")


def distill_kwargs(base: argparse.Namespace, variant: dict) -> dict:
    """lab.distill keywords of a variant, from gmm_quality's defaults, except that the study's baseline keeps the
    paper's strict 1:1 alternation it was measured with (gmm_quality's default is now 2: the `aux_x2` variant)."""
    v = {key: value for key, value in variant.items() if key != "select"}  # selection is run_spec_seed's
    lr_scale, updates, batch = v.pop("lr_scale", 1.0), v.pop("updates_scale", 1), v.pop("batch_scale", 1)
    return {"train_steps": round(base.distill_iters * updates), "batch": base.batch * batch,
            "lr_student": base.lr_student * lr_scale, "lr_ratio": base.lr_ratio, "weighting": base.weighting,
            "s_sampling": base.s_sampling, "aux_per_student": 1, **v}


def run_spec_seed(spec: str, seed: int, args: argparse.Namespace, emit) -> None:
    # the benchmark's teacher (with the spec's own sizing, if it has one) and baseline
    base = gmm_quality.parse_args(["--spec", spec_path(spec), *shlex.split(args.base_args)])
    gm = GaussianMixture.from_json(spec_path(spec))
    schedule = CosineSchedule()
    g = torch.Generator().manual_seed(seed)
    data, _ = gm.sample(base.n_train, generator=g)
    reference, _ = gm.sample(args.n_eval, generator=g)
    held_out, _ = gm.sample(args.n_proxy, generator=g)  # the select variants' proxy target, not the reference

    def score(method: str, k: int, den, sampler: str, **extra) -> dict:
        x = sample(sampler, den, (args.n_eval, gm.dim), k, schedule, generator=torch.Generator().manual_seed(seed + 1))
        row = {"spec": spec, "seed": seed, "method": method, "k": k,
               **mixture_metrics(gm, x.double(), reference, seed=seed), **extra}
        emit(row)
        return row

    t0 = time.perf_counter()
    teacher_seed = seed if args.teacher_seed is None else args.teacher_seed
    teacher = _teacher(args, base, spec, data, schedule, teacher_seed)
    # The teacher's 256-step score costs about a distillation: cached beside the teacher, per seed and n_eval.
    cached = _teacher_path(args, spec, teacher_seed)
    cached = cached and cached.with_name(f"{cached.stem}-256steps-seed{seed}-n{args.n_eval}.json")
    if cached is not None and cached.is_file():
        emit(json.loads(cached.read_text()))
    else:
        row = score("teacher_256", 256, teacher.denoiser, "ancestral", train_s=round(time.perf_counter() - t0, 1))
        if cached is not None:
            cached.write_text(json.dumps(row))
    for k in args.k:
        score("ddim", k, teacher.denoiser, "ddim")
        for name in args.variants.split(","):
            t0 = time.perf_counter()
            selecting = VARIANTS[name].get("select", False)
            proxy = ProxySW2(gm, held_out, k, schedule, seed) if selecting else None
            selection = lab.Selection(proxy, args.select_every) if selecting else None
            student = lab.distill(teacher, data, schedule, algorithm=args.algorithm, student_steps=k, seed=seed,
                                  select=selection, **distill_kwargs(base, VARIANTS[name]))
            train_s = round(time.perf_counter() - t0, 1)
            extra = {}
            if selecting:  # the last checkpoint is the unselected variant's student: its row, without a rerun
                score(unselected(name), k, proxy.scored, "student", algorithm=args.algorithm, train_s=train_s,
                      scored_by=name)
                extra = {"curve": selection.curve, "selected_update": selection.selected_update,
                         "curve_moment": [(u, m) for (u, _), m in zip(selection.curve, proxy.moment_errors)]}
            score(name, k, student, "student", algorithm=args.algorithm, train_s=train_s, **extra)


def unselected(name: str) -> str:
    """The variant a select variant selects on ('select' -> 'baseline', 'aux_x2_select' -> 'aux_x2')."""
    return "baseline" if name == "select" else name.removesuffix("_select")


class ProxySW2:
    """The select variants' in-training proxy: SW2 between the k-step student's samples and a held-out true draw
    (not the evaluation reference, so selection does not fit the score it is judged by). The noise and the
    projections are fixed per seed, so the curve compares checkpoints, not draws. On the side it records the same
    samples' component-wise moment error against the exact mixture (`moment_errors`, in proxy order: does the
    proxy track the moment metric?); selection never reads it. `scored` is the module it scored last: after
    `distill`, the final EMA, i.e. the student the same run without selection returns."""

    def __init__(self, gm: GaussianMixture, held_out: torch.Tensor, k: int, schedule, seed: int):
        self.gm, self.held_out, self.k, self.schedule, self.seed = gm, held_out, k, schedule, seed
        self.moment_errors: list[float] = []
        self.scored = None

    def __call__(self, student) -> float:
        self.scored = student
        x = sample("student", student, tuple(self.held_out.shape), self.k, self.schedule,
                   generator=torch.Generator().manual_seed(10_000 + self.seed)).double()
        self.moment_errors.append(component_moment_errors(self.gm, x)["moment_err"])
        sw2 = sliced_wasserstein2(x, self.held_out, generator=torch.Generator().manual_seed(self.seed))
        # progress on stderr: a long run (updates_x4 is hours on a loaded box) shows its curve before its row
        print(json.dumps({"proxy": len(self.moment_errors), "seed": self.seed, "k": self.k, "sw2": sw2,
                          "moment_err": self.moment_errors[-1]}), file=sys.stderr, flush=True)
        return sw2


def _teacher_path(args, spec: str, seed: int) -> Path | None:
    sized = gmm_quality.spec_teacher_defaults(spec_path(spec))  # in the key only if set: older caches stay valid
    key = hashlib.sha256(repr((spec, args.base_args, seed, *([sorted(sized.items())] if sized else []))).encode())
    return Path(args.out) / f"teacher-{spec}-{key.hexdigest()[:16]}.pt" if args.out else None


def _teacher(args, base, spec: str, data: torch.Tensor, schedule, seed: int) -> lab.TeacherResult:
    """The benchmark's teacher for (spec, sizing flags, seed), trained once and cached in --out (it is the
    expensive part: a study varies the distillation, not the teacher)."""
    path = _teacher_path(args, spec, seed)
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        den = Denoiser(build_net("mlp", dim=data.shape[1], width=base.width, depth=base.depth), schedule, "v")
        den.load_state_dict(saved["weights"])
        return lab.TeacherResult(freeze(den), saved["optimizer_state"], saved["param_names"])
    if args.teacher_seed is not None:  # the teacher's data: the same draw for every study seed
        data, _ = GaussianMixture.from_json(spec_path(spec)).sample(base.n_train,
                                                                     generator=torch.Generator().manual_seed(seed))
    teacher = lab.fit_teacher(data, schedule, width=base.width, depth=base.depth, steps=base.teacher_iters,
                              batch=base.batch, lr=base.teacher_lr, seed=seed, weighting=base.weighting)
    if path is not None:
        torch.save({"weights": teacher.denoiser.state_dict(), "optimizer_state": teacher.optimizer_state,
                    "param_names": teacher.param_names}, path)
    return teacher


def label(row: dict) -> str:
    """The row's method, with its algorithm unless alternating (rows before the algorithm was recorded were)."""
    algorithm = row.get("algorithm", "alternating")
    return row["method"] if algorithm == "alternating" else f"{row['method']} [{algorithm}]"


def summarize(rows: list[dict]) -> list[dict]:
    """Per spec, k and method: mean ± std over seeds of the ratios to the same seed's teacher-256, DDIM-k and
    alternating baseline student (paired: same data, noise and sampling seeds, so tighter than the seed spread).
    Of rows with the same spec, seed, k and method the last counts (a rerun replaces the earlier score)."""
    rows = list({(r["spec"], r["seed"], r["k"], label(r)): r for r in rows}.values())
    ref = {(r["spec"], r["seed"]): r for r in rows if r["method"] == "teacher_256"}
    ddim = {(r["spec"], r["seed"], r["k"]): r for r in rows if r["method"] == "ddim"}
    baseline = {(r["spec"], r["seed"], r["k"]): r for r in rows if label(r) == "baseline"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] != "teacher_256":
            groups.setdefault((r["spec"], r["k"], label(r)), []).append(r)
    out = []
    for (spec, k, method), rs in groups.items():
        row = {"spec": spec, "k": k, "method": method, "seeds": len(rs)}
        if any("selected_update" in r for r in rs):  # per seed: (selected update, last update scored)
            row["selected"] = {r["seed"]: (r["selected_update"], r["curve"][-1][0]) for r in rs}
        for metric in ("moment_err", "sw2"):
            for name, base in (("teacher", ref), ("ddim", ddim), ("baseline", baseline)):
                keys = [(spec, r["seed"]) if name == "teacher" else (spec, r["seed"], k) for r in rs]
                vals = [r[metric] / base[key][metric] for r, key in zip(rs, keys) if key in base]
                if vals:
                    spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    row[f"{metric}_vs_{name}"] = (statistics.fmean(vals), spread)
        out.append(row)
    return out


def markdown(summary: list[dict]) -> str:
    lines = []
    for spec, k in sorted({(r["spec"], r["k"]) for r in summary}):
        lines += [f"\n{spec}, k = {k} (mean ± std over seeds; < 1 is better than the reference)\n",
                  "| variant | seeds | moment err / teacher-256 | SW2 / teacher-256 | moment err / DDIM-k "
                  "| SW2 / DDIM-k | moment err / baseline | SW2 / baseline |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in [r for r in summary if r["spec"] == spec and r["k"] == k]:
            cells = [("" if ms is None else f"{ms[0]:.2f} ± {ms[1]:.2f}" if r["seeds"] > 1 else f"{ms[0]:.2f}")
                     for ms in (r.get(f"{m}_vs_{b}") for b in ("teacher", "ddim", "baseline")
                                for m in ("moment_err", "sw2"))]
            lines.append(f"| {r['method']} | {r['seeds']} | " + " | ".join(cells) + " |")
        lines += [f"\n{r['method']}: selected update per seed: "
                  + ", ".join(f"seed {s}: {u} of {n}" for s, (u, n) in sorted(r["selected"].items()))
                  for r in summary if r["spec"] == spec and r["k"] == k and "selected" in r]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.summarize:
        if not args.out:
            raise SystemExit("--summarize reads --out's rows.jsonl")
        lines = (Path(args.out) / "rows.jsonl").read_text().splitlines()
        summary = summarize([json.loads(line) for line in lines if line.strip()])
        print(markdown(summary))
        return summary
    torch.set_num_threads(args.threads)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    selecting = any(VARIANTS[v].get("select") for v in args.variants.split(","))
    if selecting and args.n_proxy > args.n_eval:  # refused before the minutes of teacher training, not after
        raise SystemExit(f"--n-proxy {args.n_proxy} exceeds --n-eval {args.n_eval}: the proxy would cost more "
                         "samples than the evaluation")
    rows: list[dict] = []
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            with open(out / "rows.jsonl", "a") as f:
                f.write(line + "\n")

    for spec in args.specs.split(","):
        for seed in args.seeds:
            run_spec_seed(spec, seed, args, emit)
    summary = summarize(rows)
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
