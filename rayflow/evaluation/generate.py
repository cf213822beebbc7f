"""Class-conditional sample generation for evaluation, shared by the driver, sampling actors and training workers.

Noise is drawn per sample index (`example_generators(seed, i)`), so sample i is the same whether it is drawn
alone, in a batch of 250 or by the third of eight actors.
"""

from __future__ import annotations

import time

import torch

from rayflow.core.samplers import example_generators, sample


def denoiser_schedule(denoiser: torch.nn.Module):
    """The noise schedule of a denoiser, looking through a guidance wrapper."""
    inner = getattr(denoiser, "denoiser", denoiser)
    return inner.schedule


def generate_samples(
    denoiser: torch.nn.Module,
    sampler: str,
    steps: int,
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    *,
    batch: int,
    seed: int,
    device: torch.device | str = "cpu",
    first_index: int = 0,
) -> tuple[torch.Tensor, float]:
    """One sample per label (N,) of shape (C, H, W) with `sampler` at `steps`, `batch` at a time; returns the
    samples (N, C, H, W) clamped to [-1, 1] on CPU and the seconds it took.

    labels[j] is sample index first_index + j, whose noise comes from (seed, first_index + j) alone.
    """
    out, t0 = [], time.perf_counter()
    for start in range(0, len(labels), batch):
        y = labels[start : start + batch]
        gens = example_generators(seed, range(first_index + start, first_index + start + len(y)))
        x = sample(sampler, denoiser, (len(y), *image_shape), steps, denoiser_schedule(denoiser),
                   cond=y.to(device), generator=gens, device=device)
        out.append(x.float().cpu())
    return torch.cat(out).clamp(-1, 1), time.perf_counter() - t0
