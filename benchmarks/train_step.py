"""Train-step cost: moment matching vs teacher training, and a Ray Train worker vs a plain torch loop.

    python benchmarks/train_step.py [--res 16] [--batch 64] [--updates 60] [--channels 16] [--out FILE.json]
                                    [--plain-updates 30] [--warmup 4] [--report-every 10]
                                    [--model NAME] [--channels-last] [--repeats R]
                                    [--skip-ray [--compile] [--ab OPTION]]

Both parts use the same model (a UNet, model.channels wide, channel_mult [1, 2], no attention levels, so
only the mid block's self-attention, as conf/model/unet_tiny.yaml; or --model, a conf/model/ option, e.g.
unet_small), the built-in `digits` source at --res px and one torch thread. --channels-last sets
resources.channels_last (networks and batches in NHWC, in both parts; the parameter-space step is left out,
since the config refuses it there). --compile (in-process part only) runs every network through torch.compile
and reports each method's first update and whole warm-up, which include the compilation, separately.
--ab channels_last|compile (in-process part only, no pass costs) times every step both without and with the
option, all interleaved in one process, and prints each method's ratio with/without: on a machine whose load
drifts this is the comparison to trust, not two separate runs.

1. Plain torch, in this process, on one fixed batch of `digits`: after --warmup updates of each, the
   teacher step (`build_state(job, "teacher")`), the alternating moment-matching step (aux and student
   updates alternate, so it is always timed over an even number of updates: aux+student pairs) and the
   parameter-space step (`build_state(job, "distill")`) run interleaved, two updates of each per round,
   so load from other processes on the machine hits all three alike. Each update is timed the way the
   worker loop runs it: seeded generator, step, learning-rate schedule. Ratios alternating/teacher and
   parameter_space/teacher are per optimizer update; `per_student_update` doubles the alternating one,
   since only every other alternating update moves the student.
2. Ray Train: `run_training(job, "distill", ...)` (1 worker, alternating, --updates updates) on a local Ray
   cluster this script starts, with a random teacher checkpoint written by build_denoiser +
   save_state_dict. The worker reports `images_per_s` (time between reports, report calls excluded) and
   `data_wait_share` every --report-every updates; a controller callback appends each report to a file.
   The first report window includes dataset start-up and is left out of the steady state; the steady
   seconds/update is the windows' total time over their updates (`compute_only` also takes out the time
   spent waiting for batches). It is compared with the plain alternating loop of part 1 and with a
   second plain run after Ray has shut down (the machine's load drifts; the ratio uses both). --repeats R runs
   R Ray runs, each followed by a plain one (plain, Ray, plain, ..., Ray, plain), a ratio per Ray run against
   the plain runs on either side of it, and their mean ± std: one pair cannot resolve 5% on a drifting host.
   fit() wall time is split into startup (fit() start to the first report, less the first window's
   updates at the steady rate), teardown (last report to fit() return) and the rest.
3. Pass costs: a no-grad forward F against a teacher update T, interleaved; alternating's updates each make one
   trained pass plus two no-grad forwards, so 1 + 2F/T is what alternating/teacher would be with no other cost.
Means are the headline figures; since other processes only ever add time, each line also has a median
(of aux+student pairs) and the best --report-every-update window, and the Ray ratio is also given for
the best windows. Prints one JSON line per measurement and one per ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from rayflow.config import JobConfig
from rayflow.malloc import keep_freed_memory
from rayflow.models import build_denoiser, save_state_dict
from rayflow.worker.state import TrainState, build_state, in_layout

BENCH = "train_step"
MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "model")
METHODS = ("teacher", "alternating", "parameter_space")


def model_dict(args: argparse.Namespace) -> dict[str, Any]:
    """--model's conf/model/ option, or the benchmark's own UNet (--channels wide)."""
    if getattr(args, "model", None):
        import yaml

        with open(os.path.join(MODELS, f"{args.model}.yaml")) as f:
            return yaml.safe_load(f) or {}
    return {"channels": args.channels, "channel_mult": [1, 2], "attn_levels": []}


def job_dict(args: argparse.Namespace, teacher_path: str | None, storage: str, algorithm: str) -> dict[str, Any]:
    updates = args.updates
    return {
        "task": "distill" if teacher_path else "teacher",
        "data": {
            "source": "digits",
            "resolution": args.res,
            "channels": 1,
            "num_classes": 10,
            "batch_size": args.batch,
        },
        "model": model_dict(args),
        "teacher": {"checkpoint": teacher_path, "train_images": updates * args.batch},
        # identity Lambda: the default (a gradient preconditioner) would read real images through Ray Data, which
        # starts Ray before the plain part; a diagonal Lambda costs one elementwise product per parameter anyway
        "distill": {"algorithm": algorithm, "train_images": updates * args.batch, "precondition": "identity"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1.0, "torch_threads": 1, "max_failures": 0,
                      "keep_freed_memory": not getattr(args, "default_malloc", False),
                      "channels_last": getattr(args, "channels_last", False),
                      # benchmarks/gpu_profile.py: the forwards' dtype and one GPU per worker
                      "precision": getattr(args, "precision", "auto"), "use_gpu": getattr(args, "use_gpu", False)},
        "run": {
            "name": "train-step-bench",
            "storage_path": storage,
            "report_every_images": args.report_every * args.batch,
            "checkpoint_every_images": 10 * updates * args.batch,  # only the final report checkpoints
        },
    }


def digits_batch(res: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch` images of the `digits` source, as the Ray pipeline makes them (no flip)."""
    from sklearn.datasets import load_digits

    from rayflow.data.transforms import center_crop_resize, to_model_input

    bunch = load_digits()
    small = np.round(bunch.images[:batch] * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (B, 8, 8, 1)
    images = np.stack([center_crop_resize(im, res) for im in small])  # (B, res, res, 1)
    return torch.from_numpy(to_model_input(images)), torch.from_numpy(bunch.target[:batch].astype(np.int64))


class Timed:
    """One method's state and its per-update times, stepped the way worker/loop.py steps it."""

    def __init__(self, name: str, state: TrainState, x: torch.Tensor, label: torch.Tensor, seed: int = 0,
                 compiled: bool = False):
        self.name, self.state, self.x, self.label, self.seed = name, state, x, label, seed
        self.compiled = compiled  # its networks run through torch.compile: the warm-up includes compiling them
        self.times: list[float] = []
        self.warmup: list[float] = []  # the untimed updates' times (with --compile: the compilation's)
        self.cpu: list[float] = []  # this thread's CPU seconds per update

    def _one(self) -> None:
        c = self.state.counters
        g = torch.Generator(device=self.x.device).manual_seed(self.seed * 1_000_003 + c.updates)
        cpu0 = time.thread_time()
        self.state.step(c.updates, self.x, self.label, g)
        if self.x.is_cuda:  # the update's kernels, not just their launch
            torch.cuda.synchronize(self.x.device)
        self.cpu.append(time.thread_time() - cpu0)
        c.updates += 1
        self.state.step_schedules()

    def run(self, n: int, *, record: bool = True) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            self._one()
            (self.times if record else self.warmup).append(time.perf_counter() - t0)

    def summary(self, window: int) -> dict[str, Any]:
        t = self.times
        pairs = [(a + b) / 2 for a, b in zip(t[0::2], t[1::2])]
        chunks = [statistics.fmean(t[i : i + window]) for i in range(0, len(t) - window + 1, window)]
        out: dict[str, Any] = {
            "bench": BENCH,
            "measure": "plain_step",
            "method": self.name.split("+")[0],
            "s_per_update": round(statistics.fmean(t), 4),
            "median_pair_s": round(statistics.median(pairs), 4),
            "best_window_s": round(min(chunks), 4) if chunks else None,  # windows as long as Ray's
            "updates": len(t),
            "cpu_s_per_update": round(statistics.fmean(self.cpu[-len(t):]), 4),
        }
        if self.name != out["method"]:  # an --ab variant
            out["variant"] = self.name
        if out["method"] == "alternating":  # updates alternate aux (even n) and student (odd n), from n = 0
            out["aux_s"] = round(statistics.fmean(t[0::2]), 4)
            out["student_s"] = round(statistics.fmean(t[1::2]), 4)
        if self.compiled and self.warmup:
            out["first_update_s"] = round(self.warmup[0], 2)
            out["warmup_s"] = round(sum(self.warmup), 2)
            out["warmup_updates"] = len(self.warmup)
        return out


def compile_networks(state: TrainState) -> None:
    """torch.compile every network the step runs, in place (nn.Module.compile: the step keeps its references)."""
    step = getattr(state.step, "step", state.step)  # resources.channels_last wraps the core's step
    nets = [*state.trainables.values(), getattr(step, "teacher", None)]
    for net in {id(m): m for m in nets if m is not None}.values():
        net.compile()


def plain_steps(
    args: argparse.Namespace, teacher_path: str, storage: str, methods: tuple[str, ...], updates: int,
    *, ab: str | None = None, device: torch.device | str = "cpu",
) -> dict[str, dict]:
    """Interleaved in-process timing of `methods` on one fixed batch on `device`; returns the summary per method.
    With `ab` (channels_last or compile) each method also runs with that option on, interleaved with the rest,
    named METHOD+ab. The parameter-space step is left out wherever channels_last is on (the config refuses it).
    (job_dict's identity Lambda: no preconditioner to compute, so this part needs no Ray.)"""
    device = torch.device(device)
    x, label = (t.to(device) for t in digits_batch(args.res, args.batch))
    variants = [("", args)] + ([(f"+{ab}", argparse.Namespace(**{**vars(args), ab: True}))] if ab else [])
    timed = []
    for suffix, a in variants:
        compiled = getattr(a, "compile", False)
        for name in methods:
            if name == "parameter_space" and getattr(a, "channels_last", False):
                continue
            role, algorithm = ("teacher", "alternating") if name == "teacher" else ("distill", name)
            job = JobConfig.from_dict(job_dict(a, teacher_path if role == "distill" else None, storage, algorithm))
            state = build_state(job, role, device)
            if compiled:
                compile_networks(state)
            timed.append(Timed(name + suffix, state, x, label, compiled=compiled))
    for t in timed:
        t.run(args.warmup, record=False)
    for _ in range(updates // 2):
        for t in timed:
            t.run(2)
    return {t.name: t.summary(args.report_every) for t in timed}


def pass_costs(args: argparse.Namespace, storage: str, updates: int) -> dict[str, Any]:
    """What the alternating step costs by its network passes alone: F = one no-grad forward of the denoiser,
    T = one teacher update (forward, backward, clipping, Adam, EMA), interleaved. An aux update is T + 2F (student
    rollout and teacher term without grad) and so is a student update (aux and teacher outputs without grad), so
    alternating / teacher >= 1 + 2F / T; what the measured ratio exceeds that by is per-step overhead."""
    x, label = digits_batch(args.res, args.batch)
    job = JobConfig.from_dict(job_dict(args, None, storage, "alternating"))
    state = build_state(job, "teacher", torch.device("cpu"))
    if getattr(args, "compile", False):
        compile_networks(state)
    teacher = Timed("teacher", state, x, label)
    den = state.trainables["teacher"]
    x_net = in_layout(x, job.resources.channels_last)  # the batch as the step feeds it to the network
    t = torch.rand(args.batch, generator=torch.Generator().manual_seed(0))
    forwards: list[float] = []
    teacher.run(args.warmup, record=False)
    for _ in range(updates // 2):
        teacher.run(2)
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.no_grad():
                den(x_net, t, label)
            forwards.append(time.perf_counter() - t0)
    f, tt = statistics.fmean(forwards), statistics.fmean(teacher.times)
    return {"bench": BENCH, "measure": "pass_costs", "forward_s": round(f, 4), "teacher_update_s": round(tt, 4),
            "forward_over_teacher": round(f / tt, 3), "alternating_bound": round(1 + 2 * f / tt, 3)}


def step_ratios(plain: dict[str, dict], suffix: str, costs: dict | None) -> list[dict]:
    """Each moment-matching step's time per update over the teacher step's, for the variant `suffix`."""
    teacher_s = plain["teacher" + suffix]["s_per_update"]
    alt_s = plain["alternating" + suffix]["s_per_update"]
    tag = {"variant": suffix[1:]} if suffix else {}
    out = [{"bench": BENCH, "metric": "alternating_over_teacher", **tag, "ratio": round(alt_s / teacher_s, 3),
            "per_student_update": round(2 * alt_s / teacher_s, 3)}]
    if costs:  # > 1: time the step spends beyond its network passes
        out.append({"bench": BENCH, "metric": "alternating_over_its_pass_bound",
                    "ratio": round(alt_s / teacher_s / costs["alternating_bound"], 3)})
    if "parameter_space" + suffix in plain:
        out.append({"bench": BENCH, "metric": "parameter_space_over_teacher", **tag,
                    "ratio": round(plain["parameter_space" + suffix]["s_per_update"] / teacher_s, 3)})
    return out


def ab_ratios(plain: dict[str, dict], ab: str) -> list[dict]:
    """--ab: each method's time with the option over its time without (mean, median pair, CPU seconds)."""
    out = []
    for name, base in plain.items():
        other = plain.get(f"{name}+{ab}")
        if other is None:
            continue
        out.append({"bench": BENCH, "metric": f"{ab}_over_default", "method": name,
                    **{k: round(other[k] / base[k], 3) for k in ("s_per_update", "median_pair_s", "cpu_s_per_update")}})
    return out


def report_collector(path: str):
    """A Ray Train controller callback that appends every report of rank 0 (plus a wall-clock stamp) to `path`."""
    from ray.train.v2.api.callback import UserCallback

    class ReportLog(UserCallback):
        def __init__(self, path: str) -> None:
            self.path = path

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any | None) -> None:
            rank0 = {k: v for k, v in (metrics[0] if metrics else {}).items() if isinstance(v, (int, float))}
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), "checkpoint": checkpoint is not None, **rank0}) + "\n")

    return ReportLog(path)


def ray_fit(args: argparse.Namespace, teacher_path: str, storage: str) -> dict[str, Any]:
    """One run_training('distill') on a fresh local Ray cluster; its timings from the per-report metrics."""
    # short: Ray's socket paths must stay < 108 bytes; a fresh one per cluster (--repeats starts several)
    ray_tmp = None if os.environ.get("RAY_TMPDIR") else tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # else every report blocks ~2 s
    if ray_tmp:
        os.environ["RAY_TMPDIR"] = ray_tmp
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    import ray.data

    from rayflow.orchestrate.training import run_training

    job = JobConfig.from_dict(job_dict(args, teacher_path, storage, "alternating"))
    os.makedirs(storage, exist_ok=True)
    reports_path = os.path.join(storage, "reports.jsonl")
    t_init = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        init_s = time.perf_counter() - t_init
        ray.data.DataContext.get_current().enable_progress_bars = False
        t_start = time.time()
        outcome = run_training(job, "distill", "train-step-bench", callbacks=[report_collector(reports_path)])
        t_end = time.time()
    finally:
        ray.shutdown()
        if ray_tmp:
            del os.environ["RAY_TMPDIR"]
            shutil.rmtree(ray_tmp, ignore_errors=True)

    with open(reports_path) as f:
        reports = [json.loads(line) for line in f]
    windows = []  # (updates, seconds, data wait share) per report window
    prev = 0
    for r in reports:
        n = int(r["updates"]) - prev
        prev = int(r["updates"])
        windows.append((n, n * args.batch / r["images_per_s"], r["data_wait_share"], r["step_cpu_share"]))
    steady = windows[1:]
    if not steady:
        raise RuntimeError("only one report window; FIX THIS by raising --updates or lowering --report-every")
    steady_updates = sum(n for n, *_ in steady)
    steady_time = sum(s for _, s, *_ in steady)
    s_per_update = steady_time / steady_updates
    compute_s = sum(s * (1 - w) for _, s, w, _ in steady) / steady_updates
    cpu_s = sum(s * (1 - w) * share for _, s, w, share in steady) / steady_updates
    fit_wall = t_end - t_start
    startup = (reports[0]["time"] - t_start) - windows[0][0] * s_per_update
    teardown = t_end - reports[-1]["time"]
    return {
        "bench": BENCH,
        "measure": "ray_train_worker",
        "method": "alternating",
        "s_per_update": round(s_per_update, 4),
        "compute_only_s_per_update": round(compute_s, 4),
        "cpu_s_per_update": round(cpu_s, 4),  # the training thread's CPU seconds in the steps
        "data_wait_share": round(1 - compute_s / s_per_update, 4),
        "steady_updates": steady_updates,
        "reports": len(reports),
        "best_window_s_per_update": round(min(s / n for n, s, *_ in steady), 4),
        "first_window_s_per_update": round(windows[0][1] / windows[0][0], 4),
        "fit_wall_s": round(fit_wall, 2),
        "startup_s": round(startup, 2),
        "teardown_s": round(teardown, 2),
        "other_s": round(fit_wall - startup - teardown - outcome.return_value["updates"] * s_per_update, 2),
        "updates": outcome.return_value["updates"],
        "ray_init_s": round(init_s, 2),
    }


def ray_over_plain(fit: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train run against the plain alternating loop timed just before and just after it (their updates
    pooled: the machine's load drifts between the two)."""
    plain_s = (before["s_per_update"] * before["updates"] + after["s_per_update"] * after["updates"]) / (
        before["updates"] + after["updates"])
    bests = [r["best_window_s"] for r in (before, after) if r["best_window_s"]]
    return {
        "plain_s_per_update": round(plain_s, 4),
        "ratio": round(fit["s_per_update"] / plain_s, 3),
        "compute_only_ratio": round(fit["compute_only_s_per_update"] / plain_s, 3),
        # CPU seconds of the step itself: ~1 means the worker computes the same; the rest of the wall-time
        # ratio is the step waiting (for a core, or for the GIL held by the worker's other threads)
        "cpu_ratio": round(fit["cpu_s_per_update"] / after["cpu_s_per_update"], 3),
        "best_window_ratio": round(fit["best_window_s_per_update"] / min(bests), 3) if bests else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--updates", type=int, default=60, help="updates of the Ray Train run")
    parser.add_argument("--channels", type=int, default=16, help="model.channels")
    parser.add_argument("--plain-updates", type=int, default=30, help="timed in-process updates per method")
    parser.add_argument("--warmup", type=int, default=4, help="untimed in-process updates per method")
    parser.add_argument("--report-every", type=int, default=10, help="updates per Ray Train report window")
    parser.add_argument("--out", help="also write all records to this JSON file")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Ray Train runs, each followed by a plain run (plain, Ray, plain, Ray, ..., plain): "
                             "a ratio per Ray run against the plain runs on either side, and their mean ± std")
    parser.add_argument("--skip-ray", action="store_true", help="only the in-process part (1) and the pass costs (3)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="glibc's default malloc settings in both loops (resources.keep_freed_memory=false)")
    parser.add_argument("--model", help="a conf/model/ option (e.g. unet_small) instead of the --channels UNet")
    parser.add_argument("--channels-last", action="store_true",
                        help="resources.channels_last=true (the parameter-space step is left out: refused there)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (needs --skip-ray)")
    parser.add_argument("--ab", choices=("channels_last", "compile"),
                        help="time every step without and with this option, interleaved in one process (needs "
                             "--skip-ray; no pass costs); prints the ratios with/without per method")
    args = parser.parse_args(argv)
    if (args.compile or args.ab) and not args.skip_ray:
        parser.error("--compile and --ab time the in-process part only; add --skip-ray")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.ab and getattr(args, args.ab):
        parser.error(f"--ab {args.ab} already compares without and with --{args.ab.replace('_', '-')}")
    if args.model and not os.path.exists(os.path.join(MODELS, f"{args.model}.yaml")):
        parser.error(f"--model {args.model}: no {MODELS}/{args.model}.yaml")
    for flag in ("updates", "plain_updates", "warmup", "report_every"):
        if getattr(args, flag) % 2:  # alternating: whole aux+student pairs in every timed stretch
            parser.error(f"--{flag.replace('_', '-')} must be even")
    torch.set_num_threads(1)
    if not args.default_malloc:  # as the worker does (resources.keep_freed_memory), so both loops run alike
        keep_freed_memory()
    common = {
        "keep_freed_memory": not args.default_malloc,
        "res": args.res,
        "batch": args.batch,
        "channels": JobConfig.from_dict(job_dict(args, None, tempfile.gettempdir(), "alternating")).model.channels,
        "torch_threads": 1,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    # the options' keys only where set: the default invocation's records stay as they were
    common.update({k: v for k, v in (("model", args.model), ("channels_last", args.channels_last),
                                     ("compile", args.compile), ("ab", args.ab)) if v})
    records: list[dict] = []

    def emit(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    with tempfile.TemporaryDirectory(prefix="rayflow-train-step-") as tmp:
        job = JobConfig.from_dict(job_dict(args, None, tmp, "alternating"))
        torch.manual_seed(0)
        teacher_path = os.path.join(tmp, "teacher.pt")
        save_state_dict(build_denoiser(job.model, job.data).state_dict(), teacher_path)

        plain = plain_steps(args, teacher_path, tmp, METHODS, args.plain_updates, ab=args.ab)
        for s in plain.values():
            emit({**s, **common})
        costs = None if args.ab else pass_costs(args, tmp, args.plain_updates)
        if costs:
            emit({**costs, **common})
        # Ray runs alternate with plain ones: plain, Ray, plain, Ray, ..., plain; each Ray run is compared with
        # the plain runs on either side of it
        fits, plains = [], [plain["alternating"]]
        for r in range(0 if args.skip_ray else args.repeats):
            tag = {"repeat": r} if args.repeats > 1 else {}
            fits.append(ray_fit(args, teacher_path, os.path.join(tmp, f"runs-{r}")))
            emit({**fits[-1], **common, **tag, "loadavg_1m": round(os.getloadavg()[0], 2)})
            plains.append(plain_steps(args, teacher_path, tmp, ("alternating",), args.plain_updates)["alternating"])
            emit({**plains[-1], "measure": "plain_step_after_ray", **common, **tag,
                  "loadavg_1m": round(os.getloadavg()[0], 2)})

    for suffix in ("", f"+{args.ab}") if args.ab else ("",):
        for record in step_ratios(plain, suffix, None if suffix else costs):
            emit(record)
    if args.ab:
        for record in ab_ratios(plain, args.ab):
            emit(record)
    ratios = [ray_over_plain(fit, before, after) for fit, before, after in zip(fits, plains, plains[1:])]
    for r, ratio in enumerate(ratios):
        emit({"bench": BENCH, "metric": "ray_worker_over_plain_loop", **ratio,
              **({"repeat": r} if args.repeats > 1 else {})})
    if len(ratios) > 1:
        emit({"bench": BENCH, "metric": "ray_worker_over_plain_loop_repeats", "repeats": len(ratios),
              **{f"{k}_{stat}": round(fn([r[k] for r in ratios]), 3)
                 for k in ("ratio", "compute_only_ratio", "cpu_ratio") for stat, fn in (("mean", statistics.fmean),
                                                                                     ("std", statistics.stdev))}})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
