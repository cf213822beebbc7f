"""Schedule, forward process, posterior and parametrisations against exact references."""

import math

import pytest
import torch

from rayflow.core.diffusion import (
    Denoiser,
    GuidedDenoiser,
    denoising_loss,
    diffuse,
    from_x_hat,
    loss_weight,
    posterior,
    posterior_coefficients,
    to_x_hat,
)
from rayflow.core.schedule import CosineSchedule, LinearBetaSchedule, make_schedule, resolution_shift


def test_cosine_schedule_matches_cos_sin_and_clips():
    sch = CosineSchedule()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    alpha, sigma = sch.alpha_sigma(t)
    torch.testing.assert_close(alpha, torch.cos(math.pi * t / 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigma, torch.sin(math.pi * t / 2), rtol=1e-12, atol=1e-12)
    ends = sch.logsnr(torch.tensor([0.0, 1.0]))
    assert ends.tolist() == [15.0, -15.0]
    a, s = sch.alpha_sigma(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(a).all() and torch.isfinite(s).all() and (s > 0).all() and (a > 0).all()


def test_resolution_shift_moves_logsnr():
    assert resolution_shift(64) == 0.0
    shift = resolution_shift(128, base_res=64)
    assert shift == pytest.approx(2 * math.log(0.5))
    t = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    torch.testing.assert_close(CosineSchedule(shift=shift).logsnr(t), CosineSchedule().logsnr(t) + shift)


def test_linear_beta_schedule_matches_discrete_ddpm():
    sch = LinearBetaSchedule(num_steps=1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    i = torch.tensor([99, 499, 999])
    alpha, _ = sch.alpha_sigma((i + 1).double() / 1000)
    # the continuous limit of prod(1 - beta_i) agrees with DDPM's table to within a few 1e-3 relative
    torch.testing.assert_close(alpha**2, alphas_cumprod[i], rtol=5e-2, atol=1e-5)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("nope")


def test_posterior_matches_exact_gaussian_conditioning_by_monte_carlo():
    # Fixed x: z_s ~ q(z_s | x), z_t = alpha_{t|s} z_s + sigma_{t|s} eps'. Regressing z_s on z_t recovers
    # E[z_s | z_t, x] and Var[z_s | z_t, x]: the posterior's mean coefficients and variance.
    sch = CosineSchedule()
    g = torch.Generator().manual_seed(0)
    n, x0 = 400_000, 0.7
    for s_val, t_val in [(0.2, 0.5), (0.6, 0.65), (0.01, 0.9), (0.5, 1.0)]:
        s = torch.full((n,), s_val, dtype=torch.float64)
        t = torch.full((n,), t_val, dtype=torch.float64)
        a_s, sg_s = sch.alpha_sigma(s)
        a_t, sg_t = sch.alpha_sigma(t)
        a_ts = a_t / a_s
        sg_ts = (sg_t**2 - a_ts**2 * sg_s**2).sqrt()
        z_s = a_s * x0 + sg_s * torch.randn(n, generator=g, dtype=torch.float64)
        z_t = a_ts * z_s + sg_ts * torch.randn(n, generator=g, dtype=torch.float64)
        x = torch.full((n,), x0, dtype=torch.float64)
        mean, var = posterior(z_t[:, None], x[:, None], s, t, sch)
        # slope of E[z_s | z_t] in z_t and the residual variance, by least squares
        zc, sc = z_t - z_t.mean(), z_s - z_s.mean()
        slope = (zc * sc).sum() / (zc * zc).sum()
        c_z, _, v = posterior_coefficients(s[:1], t[:1], sch)
        assert slope.item() == pytest.approx(c_z.item(), abs=5e-3)
        resid = z_s - mean[:, 0]
        assert resid.mean().item() == pytest.approx(0.0, abs=5e-3)
        assert resid.var().item() == pytest.approx(v.item(), rel=1e-2, abs=1e-6)
        assert var[0].item() == pytest.approx(v.item())


def test_posterior_is_exact_at_the_ends():
    sch = CosineSchedule()
    s = torch.tensor([0.3, 0.0, 0.999999], dtype=torch.float64)
    c_z, c_x, var = posterior_coefficients(s, s, sch)  # s = t: z_s = z_t
    torch.testing.assert_close(c_z, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(c_x, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(var, torch.zeros(3, dtype=torch.float64))
    # t = 1, s = 0: z_s is (almost) x itself; coefficients stay finite
    c_z, c_x, var = posterior_coefficients(torch.tensor([0.0]), torch.tensor([1.0]), sch)
    assert torch.isfinite(torch.stack([c_z, c_x, var])).all()
    assert c_x.item() == pytest.approx(1.0, abs=1e-6) and var.item() < 1e-6
    # against the textbook formula away from the ends
    s, t = torch.tensor([0.3]), torch.tensor([0.7])
    a_s, sg_s = sch.alpha_sigma(s.double())
    a_t, sg_t = sch.alpha_sigma(t.double())
    a_ts = a_t / a_s
    sg_ts2 = sg_t**2 - a_ts**2 * sg_s**2
    c_z, c_x, var = posterior_coefficients(s, t, sch)
    torch.testing.assert_close(c_z, a_ts * sg_s**2 / sg_t**2)
    torch.testing.assert_close(c_x, a_s * sg_ts2 / sg_t**2)
    torch.testing.assert_close(var, sg_ts2 * sg_s**2 / sg_t**2)


@pytest.mark.parametrize("prediction", ["eps", "v", "x"])
def test_parametrisations_round_trip_and_recover_x(prediction):
    sch = CosineSchedule()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    z = diffuse(x, t, eps, sch)
    target = {"eps": eps, "x": x}.get(prediction)
    if prediction == "v":
        a, s = sch.alpha_sigma(t)
        target = a[:, None, None, None] * eps - s[:, None, None, None] * x
    torch.testing.assert_close(to_x_hat(target, z, t, sch, prediction), x)
    torch.testing.assert_close(from_x_hat(x, z, t, sch, prediction), target)


@pytest.mark.parametrize("prediction,weighting", [("eps", "snr"), ("v", "snr_plus_one"), ("x", "one")])
def test_loss_weight_equals_native_target_mse(prediction, weighting):
    # The native MSE on eps / v / x equals w(lambda) times the x-space MSE, for any prediction.
    sch = CosineSchedule()
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, 5, generator=g, dtype=torch.float64)
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.98 + 0.01
    z = diffuse(x, t, eps, sch)
    x_hat = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    native = (from_x_hat(x_hat, z, t, sch, prediction) - from_x_hat(x, z, t, sch, prediction)).pow(2).sum(1)
    xspace = loss_weight(sch.logsnr(t), weighting) * (x_hat - x).pow(2).sum(1)
    torch.testing.assert_close(native, xspace)


class _Const(torch.nn.Module):
    """x_hat = (cond + 1) everywhere, or 0 for the null condition 9."""

    def forward(self, z, t, cond):
        val = torch.where(cond == 9, torch.zeros_like(cond), cond + 1).to(z.dtype)
        return val[:, None].expand_as(z)


def test_guidance_formula_and_condition_dropout():
    guided = GuidedDenoiser(_Const(), scale=2.0, null_cond=9)
    z, t = torch.zeros(3, 4), torch.rand(3)
    out = guided(z, t, torch.tensor([0, 1, 2]))
    # x_c + w (x_c - x_u) with x_u = 0
    torch.testing.assert_close(out[:, 0], torch.tensor([3.0, 6.0, 9.0]))
    # condition dropout replaces roughly cond_drop_prob of the labels by the null class
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, z, t, cond):
            seen.append(cond.clone())
            return torch.zeros_like(z)

    x = torch.randn(20_000, 2)
    denoising_loss(Spy(), x, torch.zeros(20_000, dtype=torch.long), CosineSchedule(), cond_drop_prob=0.2, null_cond=9)
    assert (seen[0] == 9).float().mean().item() == pytest.approx(0.2, abs=0.02)
    with pytest.raises(ValueError, match="null_cond"):
        denoising_loss(Spy(), x, torch.zeros(20_000, dtype=torch.long), CosineSchedule(), cond_drop_prob=0.2)


def test_denoiser_adapter_rejects_unknown_prediction():
    with pytest.raises(ValueError, match="unknown prediction"):
        Denoiser(torch.nn.Identity(), CosineSchedule(), prediction="score")


class _PackedMixture(torch.nn.Module):
    """The exact mixture denoiser behind a text-like tensor condition (B, 1, K + 1): a one-hot "token" naming the
    component plus the mask channel; the all-zero (null) condition is the unconditional posterior mean."""

    def __init__(self, exact: torch.nn.Module):
        super().__init__()
        self.exact = exact

    def forward(self, z, t, cond):
        known = cond[:, 0, -1] > 0.5  # (B,)
        x_c = self.exact(z, t, cond[:, 0, :-1].argmax(1))
        return torch.where(known[:, None], x_c, self.exact(z, t, None))


def _packed(labels: torch.Tensor, k: int) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(labels, k).to(torch.float64)  # (B, K)
    return torch.cat([onehot, torch.ones(len(labels), 1, dtype=torch.float64)], 1)[:, None]  # (B, 1, K + 1)


def test_guidance_with_a_tensor_condition_matches_the_exact_mixture():
    # Classifier-free guidance on packed (text-style) conditions, null = all zeros, against the closed form
    # (1 + w) E[x | z_t, c] - w E[x | z_t] of a Gaussian mixture.
    from rayflow.core.gaussian_mixture import GaussianMixture, MixtureDenoiser

    g = torch.Generator().manual_seed(4)
    k, d = 3, 2
    mix = GaussianMixture(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64),
                          torch.randn(k, d, generator=g, dtype=torch.float64) * 2,
                          torch.eye(d, dtype=torch.float64).expand(k, d, d) * 0.3)
    exact = MixtureDenoiser(mix, CosineSchedule())
    z, t = torch.randn(6, d, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    out = GuidedDenoiser(_PackedMixture(exact), scale=1.5, null_cond=0)(z, t, _packed(labels, k))
    ref = 2.5 * exact(z, t, labels) - 1.5 * exact(z, t, None)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # condition dropout nulls whole conditions (every token and the mask), never single entries
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, z, t, cond):
            seen.append(cond.clone())
            return torch.zeros_like(z)

    cond = _packed(torch.randint(0, k, (20_000,), generator=g), k)
    denoising_loss(Spy(), torch.randn(20_000, d, dtype=torch.float64), cond, CosineSchedule(), cond_drop_prob=0.2,
                   null_cond=0)
    nulled = (seen[0] == 0).all(dim=(1, 2))
    assert nulled.float().mean().item() == pytest.approx(0.2, abs=0.02)
    torch.testing.assert_close(seen[0][~nulled], cond[~nulled])
