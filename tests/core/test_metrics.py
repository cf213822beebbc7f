"""Component-wise moment errors against exact references: samples whose moments are known by construction."""

import math

import pytest
import torch

from rayflow.core.gaussian_mixture import GaussianMixture
from rayflow.core.metrics import _component_log_prob, component_moment_errors, mixture_metrics


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _separated_mixture(d: int = 3) -> GaussianMixture:
    """Three components with rotated anisotropic covariances, means ~50 stds apart: argmax never errs."""
    covs = [_rotation(d, s) @ torch.diag(torch.linspace(0.01, 0.25, d, dtype=torch.float64) * (s + 1))
            @ _rotation(d, s).T for s in range(3)]
    means = torch.zeros(3, d, dtype=torch.float64)
    means[:, 0] = torch.tensor([-40.0, 0.0, 40.0])
    return GaussianMixture([0.5, 0.3, 0.2], means, torch.stack(covs))


def _exact_sample(n: int, mean: torch.Tensor, chol: torch.Tensor, seed: int) -> torch.Tensor:
    """n points (n, D) whose sample mean is exactly `mean` and unbiased sample covariance exactly chol chol^T."""
    z = torch.randn(n, mean.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    lz = torch.linalg.cholesky(torch.cov(z.T))
    z = torch.linalg.solve_triangular(lz, z.T, upper=False).T  # whitened: mean 0, cov I exactly
    return mean + z @ chol.T


def _exact_mixture_sample(gm: GaussianMixture, counts: list[int]) -> list[torch.Tensor]:
    """Exact-moment samples of the first len(counts) components."""
    return [_exact_sample(n, gm.means[j], gm.chol[j], seed=j) for j, n in enumerate(counts)]


def test_fast_component_log_prob_matches_the_mixture():
    gm = _separated_mixture()
    x, _ = gm.sample(500, generator=torch.Generator().manual_seed(0))
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(_component_log_prob(gm, x), gm.component_log_prob(x))


def test_exact_moments_give_zero_error():
    gm = _separated_mixture()
    x = torch.cat(_exact_mixture_sample(gm, [500, 300, 200]))
    r = component_moment_errors(gm, x)
    assert r["count"].tolist() == [500, 300, 200]
    assert r["mean_err"] < 1e-10 and r["cov_err"] < 1e-10 and r["moment_err"] < 1e-10


@pytest.mark.parametrize("delta", [0.5, 2.0])
def test_shift_by_delta_stds_gives_the_hand_computed_mean_error(delta):
    gm = _separated_mixture(d=4)
    parts = _exact_mixture_sample(gm, [400, 400, 400])
    # shift component 1 by delta stds along one of its principal axes (L e_2 has whitened length 1):
    # e_1 = ||delta e_2|| / sqrt(D) = delta / 2
    parts[1] = parts[1] + delta * gm.chol[1][:, 2]
    # and component 2 by delta stds along every whitened axis: ||delta * 1|| / sqrt(D) = delta
    parts[2] = parts[2] + delta * gm.chol[2] @ torch.ones(4, dtype=torch.float64)
    r = component_moment_errors(gm, torch.cat(parts))
    torch.testing.assert_close(r["mean"], torch.tensor([0.0, delta / 2, delta], dtype=torch.float64),
                               atol=1e-10, rtol=0)
    assert r["mean_err"] == pytest.approx(0.3 * delta / 2 + 0.2 * delta, abs=1e-10)
    assert r["cov_err"] < 1e-10  # a shift leaves the covariance alone
    assert r["moment_err"] == pytest.approx(r["mean_err"], abs=1e-10)


def test_scaled_covariance_gives_the_hand_computed_whitened_error():
    gm = _separated_mixture(d=3)
    parts = _exact_mixture_sample(gm, [400, 400, 400])
    # component 0: every std times s -> whitened cov s^2 I -> ||(s^2 - 1) I||_F / sqrt(D) = |s^2 - 1|
    s = 1.5
    parts[0] = gm.means[0] + s * (parts[0] - gm.means[0])
    # component 2: whitened axes scaled by a -> whitened cov diag(a^2) -> sqrt(sum (a_i^2 - 1)^2 / D)
    a = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    chol = gm.chol[2]
    white = torch.linalg.solve_triangular(chol, (parts[2] - gm.means[2]).T, upper=False)  # (D, n)
    parts[2] = gm.means[2] + (chol @ (a[:, None] * white)).T
    r = component_moment_errors(gm, torch.cat(parts))
    expected2 = math.sqrt(((0.25 - 1) ** 2 + 0 + (4 - 1) ** 2) / 3)  # 1.7854
    torch.testing.assert_close(r["cov"], torch.tensor([s**2 - 1, 0.0, expected2], dtype=torch.float64),
                               atol=1e-10, rtol=0)
    assert r["mean_err"] < 1e-10  # scaling about the true mean keeps the mean
    assert r["cov_err"] == pytest.approx(0.5 * 1.25 + 0.2 * expected2, abs=1e-10)
    assert r["moment_err"] == pytest.approx(r["mean_err"] + r["cov_err"], abs=1e-12)


def test_components_with_fewer_than_two_samples_count_as_collapsed():
    gm = _separated_mixture()
    parts = _exact_mixture_sample(gm, [400, 400])
    r = component_moment_errors(gm, torch.cat(parts[:2]))  # component 2 has no samples
    torch.testing.assert_close(r["mean"], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(r["cov"], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-10, rtol=0)
    assert r["moment_err"] == pytest.approx(2 * 0.2, abs=1e-10)
    one = component_moment_errors(gm, torch.cat([parts[0], parts[1], gm.means[2:3]]))  # one sample, exact mean
    assert one["moment_err"] == pytest.approx(0.4, abs=1e-10)
    # a collapsed component (all samples at its mean) scores the same cov error as the penalty
    collapsed = component_moment_errors(gm, torch.cat([parts[0], parts[1], gm.means[2].expand(50, 3)]))
    assert collapsed["cov"][2].item() == pytest.approx(1.0, abs=1e-12)


def test_true_samples_match_the_expected_sampling_noise():
    # one Gaussian, n samples, many repetitions: n E[e^2] = 1 and (n - 1) E[c^2] / (D + 1) = 1 (Wishart)
    d, n, reps = 3, 200, 400
    q = _rotation(d, 7)
    cov = q @ torch.diag(torch.tensor([0.01, 0.3, 2.0], dtype=torch.float64)) @ q.T
    gm = GaussianMixture([1.0], torch.zeros(1, d), cov[None])
    g = torch.Generator().manual_seed(3)
    e2 = torch.empty(reps, dtype=torch.float64)
    c2 = torch.empty(reps, dtype=torch.float64)
    for i in range(reps):
        r = component_moment_errors(gm, gm.sample(n, generator=g)[0])
        e2[i], c2[i] = r["mean_err"] ** 2, r["cov_err"] ** 2
    # n e^2 ~ chi^2_D / D: mean 1, std sqrt(2 / D) / sqrt(reps) = 0.04; c^2 has a similar spread
    assert (n * e2.mean()).item() == pytest.approx(1.0, abs=0.15)
    assert ((n - 1) * c2.mean() / (d + 1)).item() == pytest.approx(1.0, abs=0.15)


def test_large_true_sample_is_near_zero_within_the_noise():
    gm = _separated_mixture(d=3)
    x, _ = gm.sample(100_000, generator=torch.Generator().manual_seed(4))
    r = component_moment_errors(gm, x)
    n = r["count"].to(torch.float64)
    # RMS sizes: mean error sqrt(1 / n_j), cov error sqrt((D + 1) / (n_j - 1)); weight-averaged: ~0.011
    expected = (gm.weights * ((1 / n).sqrt() + ((gm.dim + 1) / (n - 1)).sqrt())).sum().item()
    assert 0.3 * expected < r["moment_err"] < 2 * expected, (r["moment_err"], expected)
    assert r["moment_err"] < 0.03


def test_mixture_metrics_reports_the_moment_errors():
    gm = _separated_mixture()
    g = torch.Generator().manual_seed(5)
    x, _ = gm.sample(2000, generator=g)
    ref, _ = gm.sample(2000, generator=g)
    m = mixture_metrics(gm, x, ref)
    assert set(m) == {"sw2", "mode_mass_tv", "loglik", "moment_err", "mean_err", "cov_err"}
    r = component_moment_errors(gm, x)
    assert m["moment_err"] == r["moment_err"] and m["mean_err"] == r["mean_err"] and m["cov_err"] == r["cov_err"]
    assert m["loglik"] == pytest.approx(gm.log_prob(x).mean().item(), rel=1e-12)
    # samples squeezed towards their means: cov error up, the truth's is small
    squeezed = component_moment_errors(gm, x * 0.5 + gm.means[gm.component_log_prob(x).argmax(1)] * 0.5)
    assert squeezed["cov_err"] > 0.7 > 5 * r["cov_err"]


def test_shipped_benchmark_specs_load_and_the_generated_ones_regenerate(tmp_path):
    import importlib.util
    from pathlib import Path

    specs = Path(__file__).resolve().parents[2] / "benchmarks" / "specs"
    for name, (dim, k) in {"gmm2d": (2, 6), "gmm16d": (16, 5), "ring2d": (2, 8), "gmm64d": (64, 12)}.items():
        gm = GaussianMixture.from_json(specs / f"{name}.json")
        assert (gm.dim, gm.num_components) == (dim, k), name
    mod_spec = importlib.util.spec_from_file_location("make_specs", specs / "make_specs.py")
    make_specs = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(make_specs)
    make_specs.main(tmp_path)
    for name in ("ring2d", "gmm64d"):
        assert (tmp_path / f"{name}.json").read_bytes() == (specs / f"{name}.json").read_bytes(), name


def test_a_spec_sizes_its_own_benchmark_teacher_and_flags_override_it(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    mod_spec = importlib.util.spec_from_file_location("gmm_quality", bench / "gmm_quality.py")
    gmm_quality = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(gmm_quality)
    plain = gmm_quality.parse_args(["--spec", str(bench / "specs" / "gmm2d.json")])
    spec = json.loads((bench / "specs" / "gmm2d.json").read_text())
    (tmp_path / "sized.json").write_text(json.dumps({**spec, "teacher": {"width": 64, "teacher_iters": 10}}))
    sized = gmm_quality.parse_args(["--spec", str(tmp_path / "sized.json")])
    assert (sized.width, sized.teacher_iters, sized.depth) == (64, 10, plain.depth)
    flagged = gmm_quality.parse_args(["--width", "32", "--spec", str(tmp_path / "sized.json")])
    assert (flagged.width, flagged.teacher_iters) == (32, 10)
    (tmp_path / "bad.json").write_text(json.dumps({**spec, "teacher": {"widht": 64}}))
    with pytest.raises(ValueError, match="widht"):
        gmm_quality.parse_args(["--spec", str(tmp_path / "bad.json")])
    for path in (bench / "specs").glob("*.json"):  # every shipped spec's sizing is valid
        gmm_quality.parse_args(["--spec", str(path)])
