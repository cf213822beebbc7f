"""Sample-quality metrics: against an exact mixture (incl. component-wise moments), and between two sample sets."""

from __future__ import annotations

import math

import numpy as np
import torch

from rayflow.core.gaussian_mixture import GaussianMixture


def sliced_wasserstein2(
    a: torch.Tensor, b: torch.Tensor, *, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein-2 distance between two equal-size sample sets (N, D), by sorted 1-D matching."""
    if a.shape != b.shape:
        raise ValueError(f"sample sets must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.to(torch.float64), b.to(torch.float64)
    dirs = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)  # (D, P)
    pa, _ = torch.sort(a @ dirs, dim=0)  # (N, P)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return (pa - pb).pow(2).mean().sqrt().item()


def _component_log_prob(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """log pi_k + log N(x; mu_k, Sigma_k): (N, K), one component at a time with the cached Cholesky factors.

    Same values as `mixture.component_log_prob(x)`, which builds an (N, K, D, D) covariance stack for its noisy
    case: 6 GB at N = 10k, K = 10, D = 64. This keeps memory at O(N K + N D).
    """
    x = x.to(torch.float64)
    out = torch.empty(x.shape[0], mixture.num_components, dtype=torch.float64)
    for k in range(mixture.num_components):
        chol = mixture.chol[k]  # (D, D)
        sol = torch.linalg.solve_triangular(chol, (x - mixture.means[k]).T, upper=False)  # (D, N)
        logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
        out[:, k] = -0.5 * (sol.pow(2).sum(0) + logdet + mixture.dim * math.log(2 * math.pi))
    return out + torch.log(mixture.weights)


def mode_mass_error(mixture: GaussianMixture, x: torch.Tensor, *, log_probs: torch.Tensor | None = None) -> float:
    """Total variation between the mixture weights and the share of samples each component explains best."""
    lp = _component_log_prob(mixture, x) if log_probs is None else log_probs
    labels = lp.argmax(dim=1)
    share = torch.bincount(labels, minlength=mixture.num_components).to(torch.float64) / x.shape[0]
    return 0.5 * (share - mixture.weights).abs().sum().item()


def mean_log_likelihood(mixture: GaussianMixture, x: torch.Tensor, *, log_probs: torch.Tensor | None = None) -> float:
    """Mean log p(x) of samples under the true mixture (higher is better; samples off the data score low)."""
    lp = _component_log_prob(mixture, x) if log_probs is None else log_probs
    return torch.logsumexp(lp, dim=1).mean().item()


def component_moment_errors(
    mixture: GaussianMixture, x: torch.Tensor, *, min_count: int = 2, log_probs: torch.Tensor | None = None
) -> dict:
    """Per-component first and second moments of the samples, in units of the true component's std.

    Each sample goes to the component that explains it best (argmax of pi_k N(x; mu_k, Sigma_k), as in
    `mode_mass_error`). For component j with n_j assigned samples, mean m_j and unbiased covariance C_j
    (divisor n_j - 1), and L_j the Cholesky factor of the true Sigma_j:
      mean error e_j = ||L_j^{-1} (m_j - mu_j)|| / sqrt(D)          (RMS offset per dimension, in stds)
      cov error  c_j = ||L_j^{-1} C_j L_j^{-T} - I||_F / sqrt(D)    (whitened; 1 for a collapsed component)
    A component with fewer than `min_count` (>= 2) samples has no covariance: it counts e_j = c_j = 1, as if
    collapsed; mode_mass_tv reports the missing mass itself.
    For samples of the true component alone, E[e_j^2] = 1 / n_j and E[c_j^2] = (D + 1) / (n_j - 1) (Wishart);
    with overlapping components the argmax assignment truncates the tails, a bias the `truth` row shows.
    Returns per-component tensors (K,) "mean", "cov", "count" and the weight-averages "mean_err", "cov_err",
    "moment_err" = mean_err + cov_err (floats).
    """
    if min_count < 2:
        raise ValueError(f"min_count={min_count} must be >= 2 (a covariance needs two samples)")
    x = x.to(torch.float64)
    lp = _component_log_prob(mixture, x) if log_probs is None else log_probs
    labels = lp.argmax(dim=1)
    k, d = mixture.num_components, mixture.dim
    mean_e = torch.ones(k, dtype=torch.float64)  # the penalty for components with < min_count samples
    cov_e = torch.ones(k, dtype=torch.float64)
    counts = torch.bincount(labels, minlength=k)
    eye = torch.eye(d, dtype=torch.float64)
    for j in range(k):
        if counts[j] < min_count:
            continue
        xj = x[labels == j]  # (n_j, D)
        chol = mixture.chol[j]
        m = torch.linalg.solve_triangular(chol, (xj.mean(0) - mixture.means[j])[:, None], upper=False)  # (D, 1)
        c = torch.cov(xj.T).reshape(d, d)  # (D, D), divisor n_j - 1
        w = torch.linalg.solve_triangular(chol, c, upper=False)  # L^-1 C
        w = torch.linalg.solve_triangular(chol, w.T, upper=False)  # L^-1 (L^-1 C)^T = L^-1 C L^-T (C symmetric)
        mean_e[j] = m.norm() / math.sqrt(d)
        cov_e[j] = (w - eye).norm() / math.sqrt(d)
    mean_err = (mixture.weights * mean_e).sum().item()
    cov_err = (mixture.weights * cov_e).sum().item()
    return {"mean": mean_e, "cov": cov_e, "count": counts, "mean_err": mean_err, "cov_err": cov_err,
            "moment_err": mean_err + cov_err}


def mixture_metrics(
    mixture: GaussianMixture, x: torch.Tensor, reference: torch.Tensor, *, seed: int = 0
) -> dict[str, float]:
    """The metrics against the truth; `reference` is a fresh sample of the mixture of the same size.

    sw2 needs `reference`; mode_mass_tv, loglik and the component-wise moment errors use the exact mixture.
    """
    g = torch.Generator().manual_seed(seed)
    x = x.to(torch.float64)
    lp = _component_log_prob(mixture, x)  # (N, K), shared by the three mixture metrics
    moments = component_moment_errors(mixture, x, log_probs=lp)
    return {
        "sw2": sliced_wasserstein2(x, reference, generator=g),
        "mode_mass_tv": mode_mass_error(mixture, x, log_probs=lp),
        "loglik": mean_log_likelihood(mixture, x, log_probs=lp),
        "moment_err": moments["moment_err"],
        "mean_err": moments["mean_err"],
        "cov_err": moments["cov_err"],
    }


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), via symmetric eigendecompositions."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    w1, v1 = np.linalg.eigh(cov1)
    sqrt1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    middle = sqrt1 @ cov2 @ sqrt1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features (N, F) in float64."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)
