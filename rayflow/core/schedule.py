"""Variance-preserving noise schedules on continuous time t in [0, 1].

A schedule is defined by its logSNR lambda_t = log(alpha_t^2 / sigma_t^2); alpha and sigma follow from
alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t), so alpha_t^2 + sigma_t^2 = 1 exactly.
All schedule arithmetic runs in float64 and is cast back to the caller's dtype.
"""

from __future__ import annotations

import math

import torch

LOGSNR_MIN = -15.0
LOGSNR_MAX = 15.0


class Schedule:
    """Base class: subclasses implement `_logsnr(t)` (float64 in, float64 out, before clipping)."""

    def __init__(self, *, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX):
        if not logsnr_min < logsnr_max:
            raise ValueError(f"logsnr_min={logsnr_min} must be below logsnr_max={logsnr_max}")
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)

    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t, clipped to [logsnr_min, logsnr_max] so t = 0 and t = 1 stay finite."""
        t64 = torch.as_tensor(t).to(torch.float64)
        lam = self._logsnr(t64).clamp(self.logsnr_min, self.logsnr_max)
        return lam.to(_out_dtype(t))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) with alpha^2 + sigma^2 = 1, in the dtype of t (float32 for integer t)."""
        lam = self.logsnr(torch.as_tensor(t).to(torch.float64))
        alpha = torch.sigmoid(lam).sqrt()
        sigma = torch.sigmoid(-lam).sqrt()
        dtype = _out_dtype(t)
        return alpha.to(dtype), sigma.to(dtype)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.logsnr(t).exp()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max})"


class CosineSchedule(Schedule):
    """alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2), logSNR shifted by `shift`.

    For resolution `res` above a base resolution `base_res`, simple-diffusion uses
    shift = 2 * log(base_res / res) (negative: more noise at the same t); see `resolution_shift`.
    """

    def __init__(self, shift: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.shift = float(shift)

    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        # lambda = log(cos^2 / sin^2) = -2 log tan(pi t / 2); tan(0) = 0 gives +inf, clipped by the caller.
        return -2.0 * torch.log(torch.tan(0.5 * math.pi * t)) + self.shift

    def __repr__(self) -> str:
        return f"CosineSchedule(shift={self.shift}, logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max})"


class LinearBetaSchedule(Schedule):
    """DDPM's linear beta schedule (beta from beta_start to beta_end over `num_steps`), continuous in t.

    alpha_t^2 = exp(-(beta_start * T t + 0.5 (beta_end - beta_start) T t^2)), the continuous limit of
    prod(1 - beta_i) used by DDPM with T = num_steps.
    """

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.beta_start, self.beta_end, self.num_steps = float(beta_start), float(beta_end), int(num_steps)

    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        n = self.num_steps
        log_alpha2 = -(self.beta_start * n * t + 0.5 * (self.beta_end - self.beta_start) * n * t**2)
        # logSNR = log(a^2 / (1 - a^2)) = -log(expm1(-log a^2))
        return -torch.log(torch.expm1(-log_alpha2))


def resolution_shift(res: int, base_res: int = 64) -> float:
    """The simple-diffusion logSNR shift 2 log(base_res / res) for images above `base_res`, else 0."""
    return 2.0 * math.log(base_res / res) if res > base_res else 0.0


def make_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name: 'cosine' or 'linear_beta'."""
    table = {"cosine": CosineSchedule, "linear_beta": LinearBetaSchedule}
    if name not in table:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(table)}")
    return table[name](**kwargs)


def _out_dtype(t) -> torch.dtype:
    t = torch.as_tensor(t)
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()
