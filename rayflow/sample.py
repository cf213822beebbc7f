"""`python -m rayflow.sample eval.out=samples.npz|dir/ [eval.checkpoint=PATH] [eval.model=...] [eval.labels=[3,7]]
[eval.captions='["a red circle above a blue square"]']` (text data):
draw samples from any checkpoint (a teacher at N steps, a student at k steps).

Same config as `python -m rayflow.train` (the model and data keys must describe the checkpoint's network).
eval.out ending in .npz writes one file: `images` (N, C, H, W) float32 in [-1, 1], `images_uint8` (N, H, W, C),
`labels` (N,) and `meta` (JSON: checkpoint, sampler, steps, seed); any other eval.out is a directory of PNGs,
one per sample (`000000_class3.png`), plus `grid.png` and `meta.json`. Sample i depends only on (eval.seed, i):
the same command gives the same images on any number of eval.workers.
"""

from __future__ import annotations

import json
import os

import numpy as np
from omegaconf import DictConfig

from rayflow.cli import entry_point
from rayflow.evaluate import job_and_target


def to_uint8(x) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), rounded as PNG writers and FID tools expect."""
    pixels = np.clip(np.round((x.numpy().astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return pixels.transpose(0, 2, 3, 1)


@entry_point("config")
def main(cfg: DictConfig) -> None:
    job, target = job_and_target(cfg, "sample")
    from PIL import Image

    from rayflow import track  # Ray and torch load only for a valid config
    from rayflow.files import sha256_file
    from rayflow.orchestrate.generate import draw_samples, sample_conditions
    from rayflow.orchestrate.jobs import ensure_ray

    # One batch samples on the driver, without starting Ray (seconds instead of a cluster start-up); more go to
    # eval.workers actors. The samples are the same either way (per-sample seeds).
    one_batch = target.samples <= job.run.eval_batch
    if not one_batch:
        ensure_ray()
    cond, labels, captions = sample_conditions(job, target.samples)
    x, secs = draw_samples(job, target.checkpoint, target.model, target.sampler, target.steps, cond,
                           seed=target.seed, workers=0 if one_batch else None)
    meta = {"checkpoint": target.checkpoint, "checkpoint_sha256": sha256_file(target.checkpoint)
            if os.path.isfile(target.checkpoint) else None, "model": target.model, "sampler": target.sampler,
            "steps": target.steps, "samples": target.samples, "seed": target.seed,
            "guidance_scale": job.teacher.guidance_scale if target.model == "teacher" else 0.0}
    out = os.path.abspath(job.eval.out)
    pixels = to_uint8(x)  # (N, H, W, C)
    if out.endswith(".npz"):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        conds = {"labels": np.array(labels)} if labels is not None else {}
        conds |= {"captions": np.array(captions)} if captions is not None else {}
        np.savez(out, images=x.numpy(), images_uint8=pixels, **conds, meta=np.str_(json.dumps(meta)))
    else:
        os.makedirs(out, exist_ok=True)
        for i, img in enumerate(pixels):
            name = f"{i:06d}.png" if labels is None else f"{i:06d}_class{labels[i]}.png"
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(os.path.join(out, name))
        track.save_image_grid(x[: job.tracking.sample_grid], os.path.join(out, "grid.png"))
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump({**meta, "labels": labels, "captions": captions}, f, indent=2)
    print(json.dumps({**meta, "out": out, "seconds": secs}, indent=2))


if __name__ == "__main__":
    main()
