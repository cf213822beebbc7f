"""Class-conditional sample generation for evaluation, shared by the driver and training workers."""

from __future__ import annotations

import time

import torch

from rayflow.core.samplers import sample


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
) -> tuple[torch.Tensor, float]:
    """One sample per label (N,) of shape (C, H, W) with `sampler` at `steps`, in batches; returns the
    samples (N, C, H, W) clamped to [-1, 1] on CPU and the seconds it took."""
    g = torch.Generator(device=device).manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for y in labels.split(batch):
        x = sample(sampler, denoiser, (len(y), *image_shape), steps, denoiser_schedule(denoiser),
                   cond=y.to(device), generator=g, device=device)
        out.append(x.float().cpu())
    return torch.cat(out).clamp(-1, 1), time.perf_counter() - t0
