"""Sample-quality metrics: against an exact mixture, and between two sample sets."""

from __future__ import annotations

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


def mode_mass_error(mixture: GaussianMixture, x: torch.Tensor) -> float:
    """Total variation between the mixture weights and the share of samples each component explains best."""
    labels = mixture.component_log_prob(x).argmax(dim=1)
    share = torch.bincount(labels, minlength=mixture.num_components).to(torch.float64) / x.shape[0]
    return 0.5 * (share - mixture.weights).abs().sum().item()


def mean_log_likelihood(mixture: GaussianMixture, x: torch.Tensor) -> float:
    """Mean log p(x) of samples under the true mixture (higher is better; samples off the data score low)."""
    return mixture.log_prob(x).mean().item()


def mixture_metrics(
    mixture: GaussianMixture, x: torch.Tensor, reference: torch.Tensor, *, seed: int = 0
) -> dict[str, float]:
    """The three metrics against the truth; `reference` is a fresh sample of the mixture of the same size."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sw2": sliced_wasserstein2(x, reference, generator=g),
        "mode_mass_tv": mode_mass_error(mixture, x),
        "loglik": mean_log_likelihood(mixture, x),
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
