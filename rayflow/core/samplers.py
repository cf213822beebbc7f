"""Samplers, one signature: sample_X(denoiser, z, ts, schedule, *, cond=None, generator=None) -> x.

`ts` is a decreasing 1-D time grid from 1 to 0 (see `time_grid`); a sampler makes one denoiser call per
interval, so NFE = len(ts) - 1. `generator` is one torch.Generator for the batch or one per example
(`example_generators`): per-example noise makes every sample independent of the batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from rayflow.core.diffusion import Generators, bcast, posterior_sample, standard_normal
from rayflow.core.schedule import Schedule

DenoiserFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def time_grid(steps: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """t_i = i / steps for i = steps..0: (steps + 1,) float64."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def example_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per example index, seeded from (seed, index) alone: example i draws the same
    initial noise and step noise whatever batch, worker or machine it is sampled on."""
    # splitmix64 mixing: neighbouring (seed, index) pairs get unrelated Mersenne-Twister seeds
    base = _splitmix64(seed & _MASK64)
    return [torch.Generator().manual_seed(_splitmix64(base ^ (int(i) & _MASK64))) for i in indices]


def _times(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return t.to(device=z.device, dtype=z.dtype).expand(z.shape[0])  # (B,)


@torch.no_grad()
def sample_ancestral(
    denoiser: DenoiserFn,
    z: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    *,
    cond: torch.Tensor | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Stochastic ancestral sampling: x_hat = g(z_t, t); z_s ~ q(z_s | z_t, x = x_hat); last step returns x_hat.

    This is also the paper's k-step student sampler (method.md section 3) with ts = time_grid(k):
    the next latent is drawn from the posterior given the current z_t, not from fresh noise.
    """
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x_hat = denoiser(z, _times(t, z), cond)  # (B, ...)
        if i == len(ts) - 2:
            return x_hat
        z = posterior_sample(z, x_hat, _times(s, z), _times(t, z), schedule, generator=generator)
    return z


sample_student = sample_ancestral


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    z: torch.Tensor,
    ts: torch.Tensor,
    schedule: Schedule,
    *,
    cond: torch.Tensor | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Deterministic DDIM: z_s = alpha_s x_hat + sigma_s eps_hat, eps_hat = (z_t - alpha_t x_hat) / sigma_t."""
    del generator  # deterministic; kept for the shared signature
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        tt = _times(t, z)
        x_hat = denoiser(z, tt, cond)  # (B, ...)
        if i == len(ts) - 2:
            return x_hat
        alpha_t, sigma_t = schedule.alpha_sigma(tt)
        alpha_s, sigma_s = schedule.alpha_sigma(_times(s, z))
        eps_hat = (z - bcast(alpha_t, z) * x_hat) / bcast(sigma_t, z)
        z = bcast(alpha_s, z) * x_hat + bcast(sigma_s, z) * eps_hat
    return z


SAMPLERS = {"ancestral": sample_ancestral, "ddim": sample_ddim, "student": sample_student}


def sample(
    name: str,
    denoiser: DenoiserFn,
    shape: tuple[int, ...],
    steps: int,
    schedule: Schedule,
    *,
    cond: torch.Tensor | None = None,
    generator: Generators = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw z_1 ~ N(0, I) of `shape` and run sampler `name` for `steps` network calls."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    z = standard_normal(shape, generator, device=device)  # (B, ...)
    return SAMPLERS[name](denoiser, z, time_grid(steps, device=device), schedule, cond=cond, generator=generator)
