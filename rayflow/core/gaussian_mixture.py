"""Gaussian mixtures: an exact teacher with a closed-form denoiser E[x | z_t] under any VP schedule.

p(x) = sum_k pi_k N(x; mu_k, Sigma_k). Under z_t = alpha x + sigma eps, component k gives
z_t ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I) =: N(m_k, C_k), and
  E[x | z_t, k] = mu_k + alpha Sigma_k C_k^{-1} (z_t - m_k),
  E[x | z_t]    = sum_k r_k(z_t) E[x | z_t, k],  r_k proportional to pi_k N(z_t; m_k, C_k).
Everything is computed in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from rayflow.core.schedule import Schedule


class GaussianMixture:
    """K components in D dimensions, full covariances (diagonal ones are stored as full)."""

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covs, dtype=torch.float64)
        if mu.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(mu.shape)}")
        k, d = mu.shape
        if w.shape != (k,):
            raise ValueError(f"weights must have K={k} entries, got shape {tuple(w.shape)}")
        if (w < 0).any() or not math.isclose(w.sum().item(), 1.0, rel_tol=1e-6):
            raise ValueError(f"weights must be non-negative and sum to 1, got sum {w.sum().item():.6g}")
        if cov.shape != (k, d, d):
            raise ValueError(f"covs must be [K, D, D] = [{k}, {d}, {d}], got shape {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.transpose(1, 2)):
            raise ValueError("covs must be symmetric")
        self.weights, self.means, self.covs = w / w.sum(), mu, cov
        self.chol = torch.linalg.cholesky(cov)  # raises if a covariance is not positive definite

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # ----- construction -----
    @classmethod
    def from_spec(cls, spec: dict) -> GaussianMixture:
        """`{"weights": [...], "means": [[...]], "stds": [[...]]}` (diagonal) or with `"covs"` (full)."""
        if "weights" not in spec or "means" not in spec:
            raise ValueError("a mixture spec needs 'weights' and 'means', plus 'stds' (diagonal) or 'covs' (full)")
        if ("stds" in spec) == ("covs" in spec):
            raise ValueError("a mixture spec needs exactly one of 'stds' (diagonal) or 'covs' (full)")
        if "stds" in spec:
            stds = torch.as_tensor(spec["stds"], dtype=torch.float64)
            if (stds <= 0).any():
                raise ValueError("'stds' must all be positive")
            covs = torch.diag_embed(stds**2)
        else:
            covs = spec["covs"]
        return cls(spec["weights"], spec["means"], covs)

    @classmethod
    def from_json(cls, path: str | Path) -> GaussianMixture:
        with open(path) as f:
            return cls.from_spec(json.load(f))

    def to_spec(self) -> dict:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "covs": self.covs.tolist()}

    # ----- density and sampling -----
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples (n, D) float64 and their component labels (n,)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + torch.einsum("nij,nj->ni", self.chol[labels], eps)
        return x, labels

    def component_log_prob(self, x: torch.Tensor, *, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """log pi_k + log N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I): (N, K). alpha, sigma: floats or (N,)."""
        x = x.to(torch.float64)
        n = x.shape[0]
        alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(n)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(n)
        eye = torch.eye(self.dim, dtype=torch.float64)
        c = alpha[:, None, None, None] ** 2 * self.covs + sigma[:, None, None, None] ** 2 * eye  # (N, K, D, D)
        chol = torch.linalg.cholesky(c)
        diff = x[:, None, :] - alpha[:, None, None] * self.means  # (N, K, D)
        sol = torch.linalg.solve_triangular(chol, diff.unsqueeze(-1), upper=False).squeeze(-1)  # (N, K, D)
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (N, K)
        log_norm = -0.5 * (sol.pow(2).sum(-1) + logdet + self.dim * math.log(2 * math.pi))
        return torch.log(self.weights) + log_norm

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x): (N,)."""
        return torch.logsumexp(self.component_log_prob(x), dim=1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """p(k | x): (N, K)."""
        return torch.softmax(self.component_log_prob(x), dim=1)

    # ----- the exact denoiser -----
    def denoise(
        self, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, component: torch.Tensor | None = None
    ) -> torch.Tensor:
        """E[x | z_t] (N, D) for z: (N, D), alpha, sigma: (N,); given `component` (N,), E[x | z_t, k]."""
        z = z.to(torch.float64)
        n = z.shape[0]
        alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(n)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(n)
        eye = torch.eye(self.dim, dtype=torch.float64)
        c = alpha[:, None, None, None] ** 2 * self.covs + sigma[:, None, None, None] ** 2 * eye  # (N, K, D, D)
        diff = z[:, None, :] - alpha[:, None, None] * self.means  # (N, K, D)
        sol = torch.linalg.solve(c, diff.unsqueeze(-1)).squeeze(-1)  # C_k^{-1} (z - m_k): (N, K, D)
        x_k = self.means + alpha[:, None, None] * torch.einsum("kij,nkj->nki", self.covs, sol)  # (N, K, D)
        if component is not None:
            return x_k[torch.arange(n), component]
        r = torch.softmax(self.component_log_prob(z, alpha=alpha, sigma=sigma), dim=1)  # (N, K)
        return torch.einsum("nk,nkd->nd", r, x_k)

    def denoise_shared(self, z: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """E[x | z_t] (N, D) when the whole batch shares one (alpha, sigma), as in a sampler's step.

        Same values as `denoise`, with K factorisations of C_k instead of N K: in 64-D with K = 12 and N = 10k,
        `denoise` builds 4 GB of (N, K, D, D) covariances per call, this O(K D^2 + N K D) memory.
        """
        z = z.to(torch.float64)
        alpha, sigma = float(alpha), float(sigma)
        eye = torch.eye(self.dim, dtype=torch.float64)
        logits, x_k = [], []
        for k in range(self.num_components):
            chol = torch.linalg.cholesky(alpha**2 * self.covs[k] + sigma**2 * eye)  # C_k = L L^T: (D, D)
            w = torch.linalg.solve_triangular(chol, (z - alpha * self.means[k]).T, upper=False)  # L^-1 (z - m_k)
            logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
            log_norm = -0.5 * (w.pow(2).sum(0) + logdet + self.dim * math.log(2 * math.pi))  # (N,)
            logits.append(torch.log(self.weights[k]) + log_norm)
            sol = torch.linalg.solve_triangular(chol.T, w, upper=True)  # C_k^-1 (z - m_k): (D, N)
            x_k.append(self.means[k] + alpha * (self.covs[k] @ sol).T)  # (N, D)
        r = torch.softmax(torch.stack(logits, dim=1), dim=1)  # (N, K)
        return torch.einsum("nk,knd->nd", r, torch.stack(x_k))


class MixtureDenoiser(nn.Module):
    """The exact denoiser g(z_t, t, cond) = E[x | z_t (, component = cond)] as a module with the net interface."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t.to(torch.float64))
        return self.mixture.denoise(z, alpha, sigma, cond).to(z.dtype)


class SharedTimeMixtureDenoiser(MixtureDenoiser):
    """MixtureDenoiser that takes `denoise_shared`'s K-factorisation path when the batch shares one t (samplers)."""

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None or t.numel() == 0 or not bool((t == t.flatten()[0]).all()):
            return super().forward(z, t, cond)
        alpha, sigma = self.schedule.alpha_sigma(t.flatten()[0].to(torch.float64))
        return self.mixture.denoise_shared(z, alpha.item(), sigma.item()).to(z.dtype)
