"""Forward process, ancestral posterior, parametrisations and the denoiser interface.

Notation (method.md): z_t = alpha_t x + sigma_t eps; a denoiser g(z_t, t, cond) -> x_hat ~ E[x | z_t].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rayflow.core.schedule import Schedule

PREDICTIONS = ("eps", "v", "x")


def bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example coefficient (B,) to broadcast against `like` (B, ...)."""
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim)).to(like.dtype)


def diffuse(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Forward process: z_t = alpha_t x + sigma_t eps.   x, eps: (B, ...), t: (B,)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return bcast(alpha, x) * x + bcast(sigma, x) * eps  # (B, ...)


def posterior_coefficients(
    s: torch.Tensor, t: torch.Tensor, schedule: Schedule
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients of q(z_s | z_t, x) = N(c_z z_t + c_x x, var) for s <= t, computed in float64.

    With lambda the logSNR and r = exp(lambda_t - lambda_s) <= 1:
      c_z = alpha_{t|s} sigma_s^2 / sigma_t^2 = r alpha_s / alpha_t
      c_x = alpha_s sigma_{t|s}^2 / sigma_t^2 = -expm1(lambda_t - lambda_s) alpha_s
      var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2 = -expm1(lambda_t - lambda_s) sigma_s^2
    using sigma_{t|s}^2 = sigma_t^2 (1 - r); the expm1 form stays accurate near s = t, t = 1 and s = 0.
    """
    s64, t64 = torch.as_tensor(s).double(), torch.as_tensor(t).double()
    lam_s, lam_t = schedule.logsnr(s64), schedule.logsnr(t64)
    alpha_s, sigma_s = schedule.alpha_sigma(s64)
    alpha_t, _ = schedule.alpha_sigma(t64)
    d = (lam_t - lam_s).clamp(max=0.0)  # (B,)  s <= t means lambda_s >= lambda_t
    one_minus_r = -torch.expm1(d)
    c_z = torch.exp(d) * alpha_s / alpha_t
    c_x = one_minus_r * alpha_s
    var = one_minus_r * sigma_s**2
    return c_z, c_x, var


def posterior(
    z_t: torch.Tensor, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, schedule: Schedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, ...) and variance (B,) of q(z_s | z_t, x)."""
    c_z, c_x, var = posterior_coefficients(s, t, schedule)
    mean = bcast(c_z, z_t) * z_t + bcast(c_x, x) * x  # (B, ...)
    return mean, var.to(z_t.dtype)


# One generator for the whole batch, or one per example (a sequence of B): then example i's noise comes from
# generator i alone, so the same example draws the same noise in any batch (distributed evaluation).
Generators = torch.Generator | Sequence[torch.Generator] | None


def standard_normal(
    shape: tuple[int, ...], generator: Generators = None, *, device=None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """eps ~ N(0, I) of `shape` (B, ...), from `generator` or, for a sequence, row i from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} per-example generators for a batch of {shape[0]}; FIX THIS by "
                         "passing one generator per example (or a single torch.Generator)")
    # each row on its generator's device (CPU generators give the same noise on any accelerator)
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]  # B x (...)
    return torch.stack(rows).to(device=device)  # (B, ...)


def posterior_sample(
    z_t: torch.Tensor,
    x: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    schedule: Schedule,
    *,
    generator: Generators = None,
) -> torch.Tensor:
    """z_s ~ q(z_s | z_t, x) (the ancestral step); `generator` as in `standard_normal`."""
    mean, var = posterior(z_t, x, s, t, schedule)
    noise = standard_normal(mean.shape, generator, device=mean.device, dtype=mean.dtype)  # (B, ...)
    return mean + bcast(var.sqrt(), mean) * noise  # (B, ...)


def to_x_hat(
    out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, schedule: Schedule, prediction: str
) -> torch.Tensor:
    """Convert a network output predicting eps, v or x into x_hat.

    eps: x_hat = (z - sigma eps_hat) / alpha;  v = alpha eps - sigma x: x_hat = alpha z - sigma v_hat.
    """
    if prediction == "x":
        return out
    alpha, sigma = schedule.alpha_sigma(t)
    alpha, sigma = bcast(alpha, z), bcast(sigma, z)
    if prediction == "eps":
        return (z - sigma * out) / alpha
    if prediction == "v":
        return alpha * z - sigma * out
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def from_x_hat(
    x_hat: torch.Tensor, z: torch.Tensor, t: torch.Tensor, schedule: Schedule, prediction: str
) -> torch.Tensor:
    """Inverse of `to_x_hat`: the eps, v or x a network should output for a given x_hat."""
    if prediction == "x":
        return x_hat
    alpha, sigma = schedule.alpha_sigma(t)
    alpha, sigma = bcast(alpha, z), bcast(sigma, z)
    eps = (z - alpha * x_hat) / sigma
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x_hat
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def denoise(
    denoiser, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x_hat = g(z_t, t, cond) with only the network's forward autocast to `dtype` (e.g. bfloat16; None: no
    autocast). x_hat comes back in z's dtype, so differences of outputs, losses, reductions, the backward's
    accumulation into float32 parameters, clipping, optimizer and EMA all stay in full precision."""
    if dtype is None or dtype == z.dtype:
        return denoiser(z, t, cond)
    with torch.autocast(z.device.type, dtype=dtype):
        x_hat = denoiser(z, t, cond)
    return x_hat.to(z.dtype)


class Denoiser(nn.Module):
    """Adapter: a network F(x_in, t, cond) predicting eps, v or x becomes g(z_t, t, cond) -> x_hat."""

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str = "v"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = self.net(z, t, cond)
        return to_x_hat(out.to(z.dtype), z, t, self.schedule, self.prediction)


class GuidedDenoiser(nn.Module):
    """Classifier-free guidance: x_hat = g(z, c) + w (g(z, c) - g(z, null)), one batched call."""

    def __init__(self, denoiser: nn.Module, scale: float, null_cond: torch.Tensor | int):
        super().__init__()
        self.denoiser = denoiser
        self.scale = float(scale)
        self.null_cond = null_cond

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.scale == 0.0 or cond is None:
            return self.denoiser(z, t, cond)
        null = torch.as_tensor(self.null_cond, device=cond.device, dtype=cond.dtype).expand_as(cond)
        both = self.denoiser(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, null]))  # (2B, ...)
        x_c, x_u = both.chunk(2)
        return x_c + self.scale * (x_c - x_u)


# Weightings w(lambda) of the x-space squared error ||x - x_hat||^2. A network trained with the plain MSE
# on eps has weight SNR, on v weight SNR + 1, on x weight 1 (see tests/core/test_diffusion.py).
WEIGHTINGS = ("snr", "snr_plus_one", "truncated_snr", "one")


def loss_weight(logsnr: torch.Tensor, kind: str) -> torch.Tensor:
    """w(lambda) for the x-space squared error; `kind` names the equivalent training target."""
    if kind == "snr":
        return logsnr.exp()
    if kind == "snr_plus_one":
        return logsnr.exp() + 1.0
    if kind == "truncated_snr":
        return logsnr.exp().clamp(min=1.0)
    if kind == "one":
        return torch.ones_like(logsnr)
    raise ValueError(f"unknown weighting {kind!r}; choose one of {WEIGHTINGS}")


def denoising_loss(
    denoiser: nn.Module,
    x: torch.Tensor,
    cond: torch.Tensor | None,
    schedule: Schedule,
    *,
    weighting: str = "snr_plus_one",
    cond_drop_prob: float = 0.0,
    null_cond: int | None = None,
    generator: torch.Generator | None = None,
    forward_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The teacher's loss, per example (B,): w(lambda_t) ||x - g(z_t, t, c)||^2 / dim, t ~ U(0, 1).

    With probability `cond_drop_prob` the condition is replaced by `null_cond` (the null class index, or 0 for a
    tensor condition whose null is all zeros), so the same network learns the unconditional denoiser that
    classifier-free guidance needs. `forward_dtype` autocasts the network's forward only (see `denoise`).
    """
    b = x.shape[0]
    t = torch.rand(b, generator=generator, device=x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if cond is not None and cond_drop_prob > 0.0:
        if null_cond is None:
            raise ValueError("cond_drop_prob > 0 needs null_cond (the index of the null class)")
        drop = torch.rand(b, generator=generator, device=x.device) < cond_drop_prob  # (B,)
        # A class label (B,) or a per-example tensor condition (B, ...) such as packed text (null: all zeros).
        drop = drop.view(b, *([1] * (cond.dim() - 1)))
        cond = torch.where(drop, torch.full_like(cond, null_cond), cond)
    z_t = diffuse(x, t, eps, schedule)
    x_hat = denoise(denoiser, z_t, t, cond, dtype=forward_dtype)
    w = loss_weight(schedule.logsnr(t), weighting)  # (B,)
    return w * (x - x_hat).pow(2).flatten(1).mean(1)
