"""Adapters against the exact reference: the closed-form mixture denoiser, dressed up as an eps-, v-, x- or
EDM-parametrised network on a foreign schedule, must give the direct VP denoiser's x_hat through its adapter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rayflow.core.adapters import EDMAdapter, NetCall, VPAdapter, edm_logsnr_range, edm_precond, net_time, vp_axis
from rayflow.core.gaussian_mixture import GaussianMixture, MixtureDenoiser
from rayflow.core.schedule import (
    CosineSchedule,
    LinearBetaSchedule,
    Schedule,
    TableSchedule,
    ddpm_alphas_cumprod,
)

SPEC = {
    "weights": [0.5, 0.3, 0.2],
    "means": [[-1.0, 0.0, 0.5], [1.0, 0.5, -0.5], [0.0, -1.0, 0.0]],
    "stds": [[0.1, 0.3, 0.2], [0.3, 0.1, 0.2], [0.15, 0.15, 0.4]],
}
T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)  # (99,)
TOL = 1e-6  # max abs error in x_hat, float64 throughout
MAX_ERRORS: dict[str, float] = {}  # printed at the end of the module (pytest -s) for the record


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for name, err in sorted(MAX_ERRORS.items()):
        print(f"adapter max |x_hat - reference| {name}: {err:.3e}")


def _gm() -> GaussianMixture:
    return GaussianMixture.from_spec(SPEC)


def _zt(vp: Schedule, n: int = len(T), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t of real mixture samples at the times T (one per row)."""
    gm = _gm()
    g = torch.Generator().manual_seed(seed)
    x, _ = gm.sample(n, generator=g)
    alpha, sigma = vp.alpha_sigma(T)
    return alpha[:, None] * x + sigma[:, None] * torch.randn(x.shape, generator=g, dtype=torch.float64), T


class MixtureVPNet(nn.Module):
    """The exact denoiser as a network trained on `coords(time) -> (a, s)` (its own input x_in = a x + s eps),
    outputting eps, v (on the normalised pair) or x."""

    def __init__(self, gm: GaussianMixture, coords, prediction: str):
        super().__init__()
        self.gm, self.coords, self.prediction = gm, coords, prediction
        self.dummy = nn.Parameter(torch.zeros(()))  # a state_dict like a real network's

    def forward(self, x_in: torch.Tensor, time: torch.Tensor, cond=None) -> torch.Tensor:
        a, s = self.coords(time.double())  # (B,), (B,)
        x_hat = self.gm.denoise(x_in, a, s)  # (B, D)
        eps = (x_in - a[:, None] * x_hat) / s[:, None]
        if self.prediction == "eps":
            return eps
        if self.prediction == "x":
            return x_hat
        c = (a * a + s * s).sqrt()[:, None]
        return (a[:, None] / c) * eps - (s[:, None] / c) * x_hat


def continuous_coords(sch: Schedule, time_scale: float = 1.0):
    return lambda time: sch.alpha_sigma(time / time_scale)


def table_coords(alpha: torch.Tensor, sigma: torch.Tensor, *, integer: bool = False):
    """(a, s) at a fractional index, interpolated like TableSchedule (logSNR and log scale linear in the index)."""
    lam = 2.0 * (alpha.log() - sigma.log())
    log_c = 0.5 * torch.log(alpha**2 + sigma**2)

    def coords(u: torch.Tensor):
        if integer:  # a discrete-time network: only integer timesteps exist
            assert (u - u.round()).abs().max() < 1e-9, u
            i = u.round().long()
            return alpha[i], sigma[i]
        i = u.floor().long().clamp(max=len(alpha) - 2)
        f = u - i
        la = lam[i] * (1 - f) + lam[i + 1] * f
        c = torch.exp(log_c[i] * (1 - f) + log_c[i + 1] * f)
        return c * torch.sigmoid(la).sqrt(), c * torch.sigmoid(-la).sqrt()

    return coords


def _check(name: str, adapter: nn.Module, vp: Schedule, *, t=None, z=None) -> float:
    if z is None:
        z, t = _zt(vp)
    ref = MixtureDenoiser(_gm(), vp)(z, t)
    out = adapter(z, t)
    err = (out - ref).abs().max().item()
    MAX_ERRORS[name] = max(err, MAX_ERRORS.get(name, 0.0))
    assert out.dtype == torch.float64 and err < TOL, (name, err)
    return err


# ----- schedules: inverses and tables -----


@pytest.mark.parametrize(
    "sch",
    [CosineSchedule(), CosineSchedule(shift=-1.4), LinearBetaSchedule(), LinearBetaSchedule(num_steps=4000)],
    ids=repr,
)
def test_time_of_logsnr_inverts_logsnr_in_closed_form_and_by_bisection(sch):
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    lam = sch.logsnr(t)
    inside = (lam > sch.logsnr_min) & (lam < sch.logsnr_max)
    torch.testing.assert_close(sch.time_of_logsnr(lam)[inside], t[inside], rtol=0, atol=1e-12)
    torch.testing.assert_close(Schedule.time_of_logsnr(sch, lam)[inside], t[inside], rtol=0, atol=1e-12)


def test_ddpm_table_matches_alphas_cumprod_at_the_knots_and_inverts():
    ac = ddpm_alphas_cumprod(1000)
    assert ac[0].item() == pytest.approx(1 - 1e-4) and ac[-1].item() == pytest.approx(4.04e-5, rel=1e-2)
    tab = TableSchedule.from_alphas_cumprod(ac)
    i = torch.tensor([0, 1, 10, 500, 998, 999])
    lam = torch.log(ac[i] / (1 - ac[i]))
    torch.testing.assert_close(tab.index_of_logsnr(lam), i.double(), rtol=0, atol=1e-9)
    a, s = tab.alpha_sigma(i.double() / 999)
    torch.testing.assert_close(a**2, ac[i], rtol=1e-12, atol=0)
    torch.testing.assert_close(tab.input_scale(i.double()), torch.ones(6, dtype=torch.float64))
    assert tab.logsnr_min == pytest.approx(lam[-1].item()) and tab.logsnr_max == pytest.approx(lam[0].item())


def test_table_rejects_a_non_monotone_logsnr():
    with pytest.raises(ValueError, match="decrease strictly"):
        TableSchedule([0.9, 0.5, 0.6], [0.1, 0.5, 0.4])


# ----- VP teachers on other schedules, every prediction type -----

CONTINUOUS = {
    "cosine": (CosineSchedule(), 1.0),
    "cosine-shifted-t1000": (CosineSchedule(shift=-1.4), 1000.0),
    "linear_beta": (LinearBetaSchedule(), 1.0),
}


@pytest.mark.parametrize("prediction", ["eps", "v", "x"])
@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_vp_adapter_on_a_continuous_schedule_is_exact(name, prediction):
    net_sch, scale = CONTINUOUS[name]
    vp = vp_axis(0.0, (net_sch.logsnr_min, net_sch.logsnr_max))
    net = MixtureVPNet(_gm(), continuous_coords(net_sch, scale), prediction)
    _check(f"module/{prediction}/{name}", VPAdapter(net, vp, net_sch, prediction, time_scale=scale), vp)


@pytest.mark.parametrize("prediction", ["eps", "v", "x"])
def test_vp_adapter_on_ddpm_discrete_steps_is_exact(prediction):
    ac = ddpm_alphas_cumprod(1000)
    tab = TableSchedule.from_alphas_cumprod(ac)
    vp = vp_axis(0.0, (tab.logsnr_min, tab.logsnr_max))
    net = MixtureVPNet(_gm(), table_coords(ac.sqrt(), (1 - ac).sqrt()), prediction)
    _check(f"module/{prediction}/ddpm1000", VPAdapter(net, vp, tab, prediction), vp)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_knots_reach_the_integer_timesteps_exactly(prediction):
    """At a VP time whose logSNR is DDPM's logSNR at step i, the network is called with exactly i (no off-by-one)."""
    ac = ddpm_alphas_cumprod(1000)
    tab = TableSchedule.from_alphas_cumprod(ac)
    vp = vp_axis(0.0, (tab.logsnr_min, tab.logsnr_max))
    steps = torch.tensor([3, 50, 250, 500, 750, 990])
    t = vp.time_of_logsnr(torch.log(ac[steps] / (1 - ac[steps])))
    g = torch.Generator().manual_seed(3)
    x, _ = _gm().sample(len(steps), generator=g)
    alpha, sigma = vp.alpha_sigma(t)
    z = alpha[:, None] * x + sigma[:, None] * torch.randn(x.shape, generator=g, dtype=torch.float64)
    net = MixtureVPNet(_gm(), table_coords(ac.sqrt(), (1 - ac).sqrt(), integer=True), prediction)
    _check(f"module/{prediction}/ddpm-knots", VPAdapter(net, vp, tab, prediction), vp, t=t, z=z)


def test_vp_adapter_on_a_non_vp_table_rescales_the_input():
    """A VE-style table (alpha = 1, growing sigma): the network sees x + sigma' eps, not z_t."""
    sig = torch.logspace(-2, 1.5, 200, dtype=torch.float64)
    alpha, sigma = torch.ones_like(sig), sig
    tab = TableSchedule(alpha, sigma)
    vp = vp_axis(0.0, (tab.logsnr_min, tab.logsnr_max))
    for prediction in ("eps", "x"):
        net = MixtureVPNet(_gm(), table_coords(alpha, sigma), prediction)
        _check(f"module/{prediction}/ve-table", VPAdapter(net, vp, tab, prediction), vp)


def test_net_time_of_a_table_is_a_fractional_index():
    ac = ddpm_alphas_cumprod(10)
    tab = TableSchedule.from_alphas_cumprod(ac)
    lam = torch.log(ac / (1 - ac))
    mid = 0.5 * (lam[3] + lam[4])
    u, scale = net_time(tab, torch.stack([lam[3], mid, lam[4]]))
    torch.testing.assert_close(u, torch.tensor([3.0, 3.5, 4.0], dtype=torch.float64))
    torch.testing.assert_close(scale, torch.ones(3, dtype=torch.float64))


# ----- EDM teachers -----


class MixtureEDM(nn.Module):
    """The exact denoiser as EDM's D(x; sigma) (sigma_data=None) or as the raw F under EDM's preconditioning."""

    def __init__(self, gm: GaussianMixture, sigma_data: float | None = None):
        super().__init__()
        self.gm, self.sigma_data = gm, sigma_data
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_in: torch.Tensor, noise: torch.Tensor, class_labels=None) -> torch.Tensor:
        if self.sigma_data is None:
            return self.gm.denoise(x_in, 1.0, noise.double())
        sigma = torch.exp(4.0 * noise.double())  # c_noise = log(sigma) / 4
        c_skip, c_out, c_in, _ = edm_precond(sigma, self.sigma_data)
        x = x_in / c_in[:, None]
        return (self.gm.denoise(x, 1.0, sigma) - c_skip[:, None] * x) / c_out[:, None]


@pytest.mark.parametrize("sigma_data", [None, 0.5])
@pytest.mark.parametrize("shift", [0.0, 2 * math.log(0.5)])
def test_edm_adapter_is_exact(sigma_data, shift):
    vp = vp_axis(shift, edm_logsnr_range(0.002, 80.0))
    kind = "D" if sigma_data is None else "F+precond"
    _check(f"edm/{kind}", EDMAdapter(MixtureEDM(_gm(), sigma_data), vp, sigma_data=sigma_data), vp)


def test_edm_range_clips_the_vp_axis_to_the_trained_sigmas():
    lo, hi = edm_logsnr_range(0.002, 80.0)
    assert (lo, hi) == pytest.approx((-2 * math.log(80.0), -2 * math.log(0.002)))
    vp = vp_axis(0.0, (lo, hi))
    a, s = vp.alpha_sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s / a, torch.tensor([0.002, 80.0], dtype=torch.float64))


# ----- calling conventions -----


class Recorder(nn.Module):
    def forward(self, x, time, class_labels=None):
        self.seen = class_labels
        return (x, "aux")  # a tuple, like diffusers' return_dict=False


def test_net_call_routes_one_hot_labels_by_keyword_and_unwraps_outputs():
    net = Recorder()
    call = NetCall(cond_arg="class_labels", one_hot=4, out_channels=2)
    x = torch.randn(3, 5, 2, 2)
    out = call(net, x, torch.zeros(3), torch.tensor([1, 3, 4]))  # 4 = the null class
    assert out.shape == (3, 2, 2, 2) and torch.equal(out, x[:, :2])
    assert net.seen.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]] and net.seen.dtype == x.dtype
    NetCall(drop_cond=True)(net, x, torch.zeros(3), torch.tensor([1, 2, 3]))  # an unconditional network
    assert net.seen is None


def test_adapters_keep_the_network_as_net_for_students_and_state_dicts():
    vp = CosineSchedule()
    for adapter in (VPAdapter(MixtureVPNet(_gm(), continuous_coords(vp), "v"), vp, vp, "v"),
                    EDMAdapter(MixtureEDM(_gm()), vp)):
        assert list(adapter.state_dict()) == ["net.dummy"] and adapter.schedule is vp


def test_float32_inputs_stay_float32():
    vp = CosineSchedule()
    net = MixtureVPNet(_gm(), continuous_coords(vp), "eps")
    z, t = _zt(vp)
    out = VPAdapter(net, vp, vp, "eps")(z.float(), t.float())
    assert out.dtype == torch.float32
    ref = MixtureDenoiser(_gm(), vp)(z, t)
    assert (out.double() - ref).abs().max() < 1e-3
