"""Adapters: foreign diffusion networks as denoisers g(z_t, t, cond) -> x_hat on rayflow's VP time axis.

rayflow's time axis is a VP schedule (`schedule`): z_t = alpha_t x + sigma_t eps with logSNR lambda_t.
A teacher trained on another parametrisation sees the same point of the diffusion through its own
coordinates, found from lambda_t alone:
  - a VP network with its own schedule (cosine, linear-beta, DDPM's N discrete steps, an alpha/sigma table)
    is called at its own time tau with lambda'(tau) = lambda_t (`VPAdapter`); its eps, v or x output is
    converted to x_hat with alpha_t, sigma_t (equal to its own at equal logSNR);
  - an EDM network D(x; sigma) (Karras et al. 2022) sees x = z_t / alpha_t at sigma = sigma_t / alpha_t
    = exp(-lambda_t / 2) and outputs x_hat directly (`EDMAdapter`).
Both keep the network as `.net`, so a student and an aux cloned from the teacher train the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from rayflow.core.diffusion import PREDICTIONS, bcast, to_x_hat
from rayflow.core.schedule import LOGSNR_MAX, LOGSNR_MIN, CosineSchedule, Schedule, TableSchedule


class NetCall:
    """How to call a foreign network with (x_in, time, cond) and get one tensor back.

    cond_arg: None passes the condition as the third positional argument, a name passes it as that keyword
    (e.g. 'class_labels'); one_hot > 0 turns class indices (B,) into one-hot rows (B, one_hot), the null
    class index `one_hot` (classifier-free guidance) into a zero row; drop_cond calls an unconditional
    network without the condition; out_channels keeps the first channels of the output (ADM's
    learned-variance networks output [eps, variance]). Outputs that are not tensors (diffusers'
    `UNet2DOutput`, tuples) are unwrapped to `.sample` or their first element.
    """

    def __init__(
        self, cond_arg: str | None = None, one_hot: int = 0, out_channels: int | None = None, drop_cond: bool = False
    ):
        self.cond_arg, self.one_hot, self.out_channels = cond_arg, int(one_hot), out_channels
        self.drop_cond = bool(drop_cond)

    def cond_value(self, cond: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.one_hot or cond.is_floating_point():
            return cond
        # index one_hot (the null class) -> an all-zero row: one_hot(..., one_hot + 1) minus its last column
        return F.one_hot(cond.long(), self.one_hot + 1)[:, : self.one_hot].to(dtype)  # (B, classes)

    def __call__(self, net: nn.Module, x: torch.Tensor, time: torch.Tensor, cond: torch.Tensor | None):
        args, kwargs = (x, time), {}
        if cond is not None and not self.drop_cond:
            value = self.cond_value(cond, x.dtype)
            if self.cond_arg:
                kwargs[self.cond_arg] = value
            else:
                args = (x, time, value)
        return self.unwrap(net(*args, **kwargs))

    def unwrap(self, out) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            out = out.sample if hasattr(out, "sample") else out[0]
        return out[:, : self.out_channels] if self.out_channels else out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cond_arg={self.cond_arg!r}, one_hot={self.one_hot}, "
            f"out_channels={self.out_channels}, drop_cond={self.drop_cond})"
        )


CallFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def net_time(
    net_schedule: Schedule, logsnr: torch.Tensor, time_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's own time input and input scale (both (B,) float64) at a logSNR.

    A `TableSchedule` (discrete steps) gives the fractional index u in [0, N - 1] (integer at the knots:
    DDPM's timestep i with alphas_cumprod[i]); a continuous schedule gives tau * time_scale with
    lambda'(tau) = logsnr (time_scale = 1000 for networks trained on t * 1000).
    """
    if isinstance(net_schedule, TableSchedule):
        u = net_schedule.index_of_logsnr(logsnr)
        return u, net_schedule.input_scale(u)
    tau = net_schedule.time_of_logsnr(logsnr)
    return tau * time_scale, torch.ones_like(tau)


class VPAdapter(nn.Module):
    """A network trained with its own VP (or table) schedule and prediction type, as g(z_t, t, cond) -> x_hat.

    schedule: rayflow's VP time axis (what samplers and moment matching use); net_schedule: the schedule
    the network was trained on; prediction: eps | v | x. Its input is z_t times the table's input scale
    (1 for VP schedules), its time input comes from `net_time`. v is taken on the normalised (VP) pair.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        net_schedule: Schedule,
        prediction: str,
        *,
        time_scale: float = 1.0,
        call: CallFn | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        self.net = net
        self.schedule, self.net_schedule, self.prediction = schedule, net_schedule, prediction
        self.time_scale = float(time_scale)
        self.call = call or NetCall()
        # only non-VP tables (alpha^2 + sigma^2 != 1) rescale the input
        self.scaled_input = isinstance(net_schedule, TableSchedule) and bool(
            net_schedule.table_log_scale.abs().max() > 1e-12
        )

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        lam = self.schedule.logsnr(torch.as_tensor(t, device=z.device).double())  # (B,) float64
        time, scale = net_time(self.net_schedule, lam, self.time_scale)  # (B,), (B,)
        x_in = z * bcast(scale, z) if self.scaled_input else z  # (B, ...)
        out = self.call(self.net, x_in, time.to(z.dtype), cond)
        return to_x_hat(out.to(z.dtype), z, t, self.schedule, self.prediction)


def edm_sigma(logsnr: torch.Tensor) -> torch.Tensor:
    """EDM's noise level at a VP logSNR: sigma = sigma_t / alpha_t = exp(-lambda / 2)."""
    return torch.exp(-0.5 * torch.as_tensor(logsnr, dtype=torch.float64))


def edm_logsnr_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """The VP logSNR interval [-2 log sigma_max, -2 log sigma_min] an EDM network was trained on."""
    lo, hi = -2.0 * torch.log(torch.tensor([sigma_max, sigma_min], dtype=torch.float64))
    return lo.item(), hi.item()


def edm_precond(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """EDM's preconditioning (c_skip, c_out, c_in, c_noise) at sigma (B,): D = c_skip x + c_out F(c_in x, c_noise)."""
    s2, d2 = sigma * sigma, sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


class EDMAdapter(nn.Module):
    """An EDM-style network as g(z_t, t, cond) -> x_hat: x_hat = D(z_t / alpha_t; sigma_t / alpha_t, cond).

    With sigma_data=None the network is the preconditioned denoiser D(x; sigma, cond) (EDM's EDMPrecond);
    with sigma_data set it is the raw F(c_in x, c_noise, cond) and EDM's preconditioning is applied here.
    """

    def __init__(
        self, net: nn.Module, schedule: Schedule, *, sigma_data: float | None = None, call: CallFn | None = None
    ):
        super().__init__()
        self.net, self.schedule = net, schedule
        self.sigma_data = None if sigma_data is None else float(sigma_data)
        self.call = call or NetCall()

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t64 = torch.as_tensor(t, device=z.device).double()
        alpha, _ = self.schedule.alpha_sigma(t64)  # (B,) float64
        sigma = edm_sigma(self.schedule.logsnr(t64))  # (B,) float64
        x_in = z / bcast(alpha, z)  # (B, ...) = x + sigma eps
        if self.sigma_data is None:
            return self.call(self.net, x_in, sigma.to(z.dtype), cond).to(z.dtype)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        out = self.call(self.net, x_in * bcast(c_in, z), c_noise.to(z.dtype), cond).to(z.dtype)
        return bcast(c_skip, z) * x_in + bcast(c_out, z) * out


def vp_axis(shift: float = 0.0, logsnr_range: tuple[float, float] | None = None) -> CosineSchedule:
    """rayflow's cosine VP axis (logSNR shifted by `shift`), clipped to a teacher's logSNR range.

    A student then never asks the teacher about a noise level it was not trained on.
    """
    if logsnr_range is None:
        return CosineSchedule(shift=shift)
    lo, hi = logsnr_range
    return CosineSchedule(shift=shift, logsnr_min=max(LOGSNR_MIN, lo), logsnr_max=min(LOGSNR_MAX, hi))
