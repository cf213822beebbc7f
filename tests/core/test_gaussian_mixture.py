"""The exact reference: mixture density, closed-form denoiser and samplers that use it."""

import json
import math

import pytest
import torch

from rayflow.core.gaussian_mixture import GaussianMixture, MixtureDenoiser
from rayflow.core.metrics import mixture_metrics, mode_mass_error, sliced_wasserstein2
from rayflow.core.samplers import sample, sample_ancestral, sample_ddim, time_grid
from rayflow.core.schedule import CosineSchedule


def _mixture_2d():
    return GaussianMixture.from_spec(
        {
            "weights": [0.5, 0.3, 0.2],
            "means": [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
            "stds": [[0.3, 0.6], [0.5, 0.2], [0.4, 0.4]],
        }
    )


def test_spec_loading_diagonal_and_full(tmp_path):
    gm = _mixture_2d()
    torch.testing.assert_close(gm.covs[0], torch.diag(torch.tensor([0.09, 0.36], dtype=torch.float64)))
    path = tmp_path / "full.json"
    path.write_text(json.dumps({"weights": [1.0], "means": [[0.0, 1.0]], "covs": [[[1.0, 0.5], [0.5, 2.0]]]}))
    full = GaussianMixture.from_json(path)
    assert full.dim == 2 and full.num_components == 1
    with pytest.raises(ValueError, match="exactly one of"):
        GaussianMixture.from_spec({"weights": [1.0], "means": [[0.0]]})
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture.from_spec({"weights": [0.5], "means": [[0.0]], "stds": [[1.0]]})
    with pytest.raises(torch.linalg.LinAlgError):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])


def test_log_prob_matches_scipy_style_reference():
    # full covariance, one component: compare with the explicit Gaussian formula
    cov = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
    gm = GaussianMixture([1.0], [[0.0, 1.0]], cov[None])
    x = torch.tensor([[0.3, -0.2], [1.0, 2.0]], dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(torch.tensor([0.0, 1.0], dtype=torch.float64), cov).log_prob(x)
    torch.testing.assert_close(gm.log_prob(x), ref)
    # mixture of two: log of the weighted sum
    gm2 = _mixture_2d()
    comps = [torch.distributions.MultivariateNormal(gm2.means[k], gm2.covs[k]) for k in range(3)]
    ref2 = torch.log(sum(gm2.weights[k] * comps[k].log_prob(x).exp() for k in range(3)))
    torch.testing.assert_close(gm2.log_prob(x), ref2)


def test_sampling_recovers_weights_means_and_covariances():
    gm = _mixture_2d()
    x, labels = gm.sample(200_000, generator=torch.Generator().manual_seed(0))
    for k in range(3):
        xk = x[labels == k]
        assert xk.shape[0] / x.shape[0] == pytest.approx(gm.weights[k].item(), abs=5e-3)
        torch.testing.assert_close(xk.mean(0), gm.means[k], atol=1e-2, rtol=0)
        torch.testing.assert_close(torch.cov(xk.T), gm.covs[k], atol=1e-2, rtol=0)


def test_closed_form_denoiser_matches_monte_carlo_posterior_mean():
    # E[x | z] = sum_i x_i N(z; alpha x_i, sigma^2 I) / sum_i N(z; alpha x_i, sigma^2 I), x_i ~ p(x).
    gm = GaussianMixture.from_spec(
        {
            "weights": [0.6, 0.4],
            "means": [[-1.5, 0.0], [1.5, 0.5]],
            "covs": [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]]],
        }
    )
    sch = CosineSchedule()
    g = torch.Generator().manual_seed(1)
    x, _ = gm.sample(400_000, generator=g)
    z = torch.tensor([[0.1, 0.2], [-1.0, 0.3], [1.2, -0.4], [0.0, 0.0]], dtype=torch.float64)
    for t in [0.3, 0.5, 0.8]:
        alpha, sigma = sch.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        logw = -((z[:, None, :] - alpha * x[None]) ** 2).sum(-1) / (2 * sigma**2)  # (Q, N)
        w = torch.softmax(logw, dim=1)
        mc = w @ x  # (Q, D)
        exact = gm.denoise(z, alpha.expand(4), sigma.expand(4))
        torch.testing.assert_close(exact, mc, atol=2e-2, rtol=0)


def test_denoiser_limits():
    gm = _mixture_2d()
    z = torch.randn(5, 2, dtype=torch.float64)
    # no noise: E[x | z] = z
    torch.testing.assert_close(gm.denoise(z, torch.ones(5), torch.full((5,), 1e-6)), z, atol=1e-6, rtol=0)
    # pure noise: E[x | z] = E[x]
    mean = (gm.weights[:, None] * gm.means).sum(0)
    torch.testing.assert_close(
        gm.denoise(z, torch.full((5,), 1e-8), torch.ones(5)), mean.expand(5, 2), atol=1e-6, rtol=0
    )
    # given a component, the single-Gaussian formula
    alpha, sigma = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    k = torch.zeros(5, dtype=torch.long)
    c = alpha**2 * gm.covs[0] + sigma**2 * torch.eye(2, dtype=torch.float64)
    ref = gm.means[0] + (alpha * gm.covs[0] @ torch.linalg.solve(c, (z - alpha * gm.means[0]).T)).T
    torch.testing.assert_close(gm.denoise(z, alpha.expand(5), sigma.expand(5), k), ref)


def test_ancestral_sampling_with_exact_denoiser_recovers_the_mixture():
    gm = _mixture_2d()
    sch = CosineSchedule()
    g = torch.Generator().manual_seed(2)
    x = sample("ancestral", MixtureDenoiser(gm, sch), (20_000, 2), 256, sch, generator=g).double()
    ref, _ = gm.sample(20_000, generator=g)
    labels = gm.component_log_prob(x).argmax(1)
    for k in range(3):
        xk = x[labels == k]
        assert xk.shape[0] / x.shape[0] == pytest.approx(gm.weights[k].item(), abs=1.5e-2)
        torch.testing.assert_close(xk.mean(0), gm.means[k], atol=3e-2, rtol=0)
        torch.testing.assert_close(torch.cov(xk.T), gm.covs[k], atol=4e-2, rtol=0)
    metrics = mixture_metrics(gm, x, ref)
    ref2, _ = gm.sample(20_000, generator=g)
    floor = mixture_metrics(gm, ref2, ref)  # two true samples: the metric noise floor
    assert metrics["sw2"] < 2 * floor["sw2"] + 0.02
    assert metrics["loglik"] == pytest.approx(floor["loglik"], abs=0.05)


def test_few_step_samplers_are_worse_than_many_and_ddim_collapses_at_one_step():
    gm = _mixture_2d()
    sch = CosineSchedule()
    den = MixtureDenoiser(gm, sch)
    ref, _ = gm.sample(8_000, generator=torch.Generator().manual_seed(3))
    z = torch.randn(8_000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sw = {}
    for n in [1, 4, 64]:
        sw[("ddim", n)] = sliced_wasserstein2(sample_ddim(den, z, time_grid(n), sch), ref)
        sw[("anc", n)] = sliced_wasserstein2(
            sample_ancestral(den, z, time_grid(n), sch, generator=torch.Generator().manual_seed(5)), ref
        )
    assert sw[("ddim", 64)] < sw[("ddim", 4)] < sw[("ddim", 1)]
    assert sw[("anc", 64)] < sw[("anc", 4)]
    # one step of either sampler returns (almost) E[x] for every sample: mode mass lands in one component
    one = sample_ddim(den, z, time_grid(1), sch)
    assert one.std(0).max().item() < 1e-2  # logSNR clipped at -15: alpha_1 = 5.5e-4, not 0
    assert mode_mass_error(gm, one) > 0.4
    assert math.isfinite(sw[("anc", 1)])


def test_shared_time_denoiser_matches_the_per_example_one():
    # one (alpha, sigma) for the batch: K factorisations give the same E[x | z_t] as the (N, K, D, D) path
    from rayflow.core.gaussian_mixture import SharedTimeMixtureDenoiser

    gm = GaussianMixture.from_spec(
        {"weights": [0.6, 0.4], "means": [[-1.5, 0.0, 0.2], [1.5, 0.5, -0.3]],
         "covs": [[[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.1]], [[0.2, -0.05, 0.0], [-0.05, 0.4, 0.0],
                                                                          [0.0, 0.0, 0.01]]]}
    )
    sch = CosineSchedule()
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in [1.0, 0.7, 0.2, 1 / 256, 0.0]:
        alpha, sigma = sch.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        torch.testing.assert_close(gm.denoise_shared(z, alpha.item(), sigma.item()),
                                   gm.denoise(z, alpha.expand(64), sigma.expand(64)))
        tt = torch.full((64,), t, dtype=torch.float64)
        torch.testing.assert_close(SharedTimeMixtureDenoiser(gm, sch)(z, tt), MixtureDenoiser(gm, sch)(z, tt))
    mixed = torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # falls back
    torch.testing.assert_close(SharedTimeMixtureDenoiser(gm, sch)(z, mixed), MixtureDenoiser(gm, sch)(z, mixed))
