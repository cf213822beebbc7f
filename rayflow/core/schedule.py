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

    def time_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """The inverse of `logsnr`: t (float64) with lambda_t = logsnr, clamped to [0, 1].

        Bisection on the unclipped logSNR (decreasing in t); subclasses override it with closed forms.
        """
        lam = torch.as_tensor(logsnr, dtype=torch.float64)
        lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(64):  # 2^-64 < float64 resolution of [0, 1]
            mid = 0.5 * (lo + hi)
            above = self._logsnr(mid) > lam  # (B,) still too little noise at mid: the answer lies right
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

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

    def time_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        # tan(pi t / 2) = exp(-(lambda - shift) / 2)
        lam = torch.as_tensor(logsnr, dtype=torch.float64)
        return (2.0 / math.pi) * torch.atan(torch.exp(-0.5 * (lam - self.shift)))

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

    def time_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        # -log a^2 = log1p(exp(-lambda)) =: L solves b0 n t + (b1 - b0) n t^2 / 2 = L; the root in the
        # cancellation-free form 2 L / (b + sqrt(b^2 + 2 a L)).
        lam = torch.as_tensor(logsnr, dtype=torch.float64)
        big = torch.nn.functional.softplus(-lam)  # (B,) log1p(exp(-lambda)), stable for large |lambda|
        b, a = self.beta_start * self.num_steps, (self.beta_end - self.beta_start) * self.num_steps
        return (2.0 * big / (b + torch.sqrt(b * b + 2.0 * a * big))).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"LinearBetaSchedule(beta_start={self.beta_start}, beta_end={self.beta_end}, "
            f"num_steps={self.num_steps})"
        )


class TableSchedule(Schedule):
    """A schedule given as a table of (alpha_i, sigma_i) at N discrete indices i = 0..N-1 (N >= 2).

    Discrete-time teachers (DDPM's alphas_cumprod, ADM, diffusers) see the integer index i; between knots
    the logSNR is interpolated linearly in the index, so a fractional index u = t (N - 1) is defined for
    any logSNR inside the table's range. The table need not be variance preserving (a VE-style table has
    alpha = 1): `input_scale(u)` = sqrt(alpha^2 + sigma^2) is what the network's input carries on top of
    the VP z_t of the same logSNR. The logSNR must decrease strictly with i.
    """

    def __init__(self, alpha, sigma, **kwargs):
        a = torch.as_tensor(alpha, dtype=torch.float64).flatten()
        s = torch.as_tensor(sigma, dtype=torch.float64).flatten()
        if a.shape != s.shape or a.numel() < 2:
            raise ValueError(
                f"a schedule table needs alpha and sigma of the same length >= 2, got {a.numel()} and {s.numel()}"
            )
        if (a <= 0).any() or (s <= 0).any():
            raise ValueError("a schedule table needs alpha > 0 and sigma > 0 at every index")
        lam = 2.0 * (torch.log(a) - torch.log(s))  # (N,)
        if not (lam[1:] < lam[:-1]).all():
            bad = int(torch.nonzero(lam[1:] >= lam[:-1])[0])
            raise ValueError(
                f"the table's logSNR must decrease strictly with the index; it does not at index {bad + 1} "
                f"({lam[bad].item():.6g} -> {lam[bad + 1].item():.6g})"
            )
        kwargs.setdefault("logsnr_min", max(LOGSNR_MIN, lam[-1].item()))
        kwargs.setdefault("logsnr_max", min(LOGSNR_MAX, lam[0].item()))
        super().__init__(**kwargs)
        self.table_logsnr = lam  # (N,)
        self.table_log_scale = 0.5 * torch.log(a * a + s * s)  # (N,) 0 for a VP table

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, **kwargs) -> TableSchedule:
        """DDPM's table: alpha_i^2 = prod_{j <= i} (1 - beta_j), sigma_i^2 = 1 - alpha_i^2."""
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        return cls(ac.sqrt(), (1.0 - ac).sqrt(), **kwargs)

    @property
    def num_steps(self) -> int:
        return self.table_logsnr.numel()

    def index_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """The fractional index u in [0, N - 1] whose interpolated logSNR is `logsnr` (float64)."""
        lam = torch.as_tensor(logsnr, dtype=torch.float64)
        knots = self.table_logsnr.to(lam.device).flip(0)  # (N,) increasing
        n = knots.numel()
        j = torch.searchsorted(knots, lam).clamp(1, n - 1)  # (B,) knots[j - 1] <= lam < knots[j]
        lo, hi = knots[j - 1], knots[j]
        frac = ((lam - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (n - j).double() - frac  # back to the decreasing order: index n - 1 - (j - 1 + frac)

    def input_scale(self, index: torch.Tensor) -> torch.Tensor:
        """sqrt(alpha^2 + sigma^2) at a fractional index (float64); 1 for a VP table."""
        return torch.exp(_interp(self.table_log_scale, index))

    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        return _interp(self.table_logsnr, t * (self.num_steps - 1))

    def time_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        return self.index_of_logsnr(logsnr) / (self.num_steps - 1)

    def __repr__(self) -> str:
        return f"TableSchedule(N={self.num_steps}, logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max})"


def _interp(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a (N,) table at fractional indices in [0, N - 1] (clamped)."""
    u = torch.as_tensor(index, dtype=torch.float64).clamp(0.0, table.numel() - 1)
    table = table.to(u.device)
    i = u.floor().long().clamp(max=table.numel() - 2)
    frac = u - i
    return table[i] * (1.0 - frac) + table[i + 1] * frac


def ddpm_alphas_cumprod(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, kind: str = "linear"
) -> torch.Tensor:
    """DDPM's discrete alphas_cumprod (N,) in float64: prod_{j <= i} (1 - beta_j).

    kind: 'linear' (DDPM, ADM: beta linear from beta_start to beta_end) or 'scaled_linear'
    (Stable Diffusion: sqrt(beta) linear).
    """
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown beta schedule {kind!r}; choose 'linear' or 'scaled_linear'")
    return torch.cumprod(1.0 - betas, dim=0)


def resolution_shift(res: int, base_res: int = 64) -> float:
    """The simple-diffusion logSNR shift 2 log(base_res / res) for images above `base_res`, else 0."""
    return 2.0 * math.log(base_res / res) if res > base_res else 0.0


def make_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name: 'cosine', 'linear_beta' (continuous) or 'table' (alpha=, sigma=)."""
    table = {"cosine": CosineSchedule, "linear_beta": LinearBetaSchedule, "table": TableSchedule}
    if name not in table:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(table)}")
    return table[name](**kwargs)


def _out_dtype(t) -> torch.dtype:
    t = torch.as_tensor(t)
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()
