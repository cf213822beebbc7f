"""Images/s per GPU of the teacher step and both moment-matching steps at ImageNet-64 size (issue 14, item 6).

    python benchmarks/gpu_profile.py                       # one GPU: unet_imagenet64 (277 M parameters, the size of
                                                           # EDM2-S) at 64 px, batch 64, bf16 then fp32; a few minutes
    python benchmarks/gpu_profile.py --ray                 # also one Ray Train worker on the same GPU (needs Ray)
    python benchmarks/gpu_profile.py --device cpu --model '' --res 8 --batch 4 --updates 2   # a smoke run

A thin driver over benchmarks/train_step.py's in-process part (random teacher weights, one fixed batch of the
`digits` source upsampled to --res, the worker's own `build_state` step, methods interleaved two updates at a time,
each update timed to the end of its kernels) for every precision in --precisions (`resources.precision`: the dtype
of the network forwards; losses, optimizer and EMA stay fp32). It prints one JSON line per (precision, method) with
s/update, images/s (batch / s per update; an alternating update moves one network, so images/s per *student* update
is half) and the peak GPU memory of all methods' states together, then the ratios alternating/teacher and
parameter_space/teacher per precision. With --ray, train_step.py's Ray part runs the alternating step in one Ray
Train worker on the GPU (auto precision: bf16) and reports its s/update, data-wait share and its ratio to the
plain loop. The GPU image lent to this project has no Ray (benchmarks/README.md says what ran where).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import train_step as ts  # noqa: E402

from rayflow.config import JobConfig  # noqa: E402
from rayflow.models import build_denoiser, save_state_dict  # noqa: E402

BENCH = "gpu_profile"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="unet_imagenet64", help="a conf/model/ option; '' = train_step's tiny UNet")
    p.add_argument("--channels", type=int, default=16, help="the tiny UNet's width (with --model '')")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="images per update on the one GPU")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--methods", default=",".join(ts.METHODS))
    p.add_argument("--updates", type=int, default=20, help="timed updates per method and precision (even)")
    p.add_argument("--warmup", type=int, default=4, help="untimed updates per method first (even)")
    p.add_argument("--ray", action="store_true", help="also one Ray Train worker on the GPU (train_step's part 2)")
    p.add_argument("--ray-updates", type=int, default=60)
    p.add_argument("--out", help="also append the records to this JSON-lines file")
    a = p.parse_args(argv)
    if a.updates % 2 or a.warmup % 2:
        p.error("--updates and --warmup must be even (alternating: whole aux+student pairs)")
    bad = set(a.methods.split(",")) - set(ts.METHODS)
    if bad:
        p.error(f"unknown --methods {sorted(bad)}; choose from {ts.METHODS}")
    a.model = a.model or None
    # what train_step's job_dict, plain_steps and ray_fit read besides
    return argparse.Namespace(**vars(a), report_every=2, compile=False, channels_last=False,
                              use_gpu=a.device.startswith("cuda"), precision="auto")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    common = {"bench": BENCH, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": args.model or f"tiny-{args.channels}", "res": args.res, "batch": args.batch}
    emit = _emitter(args.out)
    methods = tuple(args.methods.split(","))
    with tempfile.TemporaryDirectory(prefix="rayflow-gpu-profile-") as tmp:
        job = JobConfig.from_dict(ts.job_dict(args, None, tmp, "alternating"))
        torch.manual_seed(0)
        teacher_path = os.path.join(tmp, "teacher.pt")
        teacher = build_denoiser(job.model, job.data)
        save_state_dict(teacher.state_dict(), teacher_path)
        common["parameters"] = sum(p.numel() for p in teacher.parameters())
        del teacher
        plain = {}
        for precision in args.precisions.split(","):
            args.precision = precision
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            plain[precision] = ts.plain_steps(args, teacher_path, tmp, methods, args.updates, device=device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            for name, s in plain[precision].items():
                emit({**common, "measure": "plain_step", "precision": precision, "method": name,
                      "s_per_update": s["s_per_update"], "median_pair_s": s["median_pair_s"],
                      "images_per_s": round(args.batch / s["s_per_update"], 1), "updates": s["updates"],
                      "peak_gib_all_methods": None if peak is None else round(peak, 2),
                      "wall_s": round(time.perf_counter() - t0, 1)})
            teacher_s = plain[precision].get("teacher", {}).get("s_per_update")
            for name in ("alternating", "parameter_space"):
                if teacher_s and name in plain[precision]:
                    emit({**common, "metric": f"{name}_over_teacher", "precision": precision,
                          "ratio": round(plain[precision][name]["s_per_update"] / teacher_s, 3)})
        if args.ray:
            args.precision, args.updates, args.report_every = "auto", args.ray_updates, 10
            worker = ts.ray_fit(args, teacher_path, os.path.join(tmp, "runs"))
            emit({**common, **worker, "bench": BENCH, "precision": "auto"})
            auto = "bf16" if device.type == "cuda" else "fp32"
            if "alternating" in plain.get(auto, {}):
                emit({**common, "metric": "ray_worker_over_plain_loop", "precision": auto,
                      "ratio": round(worker["s_per_update"] / plain[auto]["alternating"]["s_per_update"], 3),
                      "compute_only_ratio": round(worker["compute_only_s_per_update"]
                                                  / plain[auto]["alternating"]["s_per_update"], 3)})
    return 0


def _emitter(path: str | None):
    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")

    return emit


if __name__ == "__main__":
    sys.exit(main())
