"""Regenerate the generated mixture specs (ring2d.json, gmm64d.json) bit for bit: python benchmarks/specs/make_specs.py

gmm2d.json was written by hand and gmm16d.json by an earlier script (see its _comment). An optional "teacher" entry
sizes gmm_quality.py's teacher for that spec (its flag names, e.g. {"teacher_iters": 18000}); flags override it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _r(a, nd: int = 6):
    return np.round(np.asarray(a, dtype=np.float64), nd).tolist()


def ring2d(k: int = 8, radius: float = 1.5, tangential: float = 0.2, radial: float = 0.025, seed: int = 2) -> dict:
    """k thin components evenly spaced on a circle, long axis along the tangent, unequal weights."""
    rng = np.random.default_rng(seed)
    theta = 2 * np.pi * np.arange(k) / k + rng.uniform(0, 2 * np.pi / k)
    w = rng.uniform(0.5, 1.5, k)
    w = np.round(w / w.sum(), 4)
    w[-1] = round(1.0 - w[:-1].sum(), 4)  # sums to 1 exactly after rounding
    means, covs = [], []
    for t in theta:
        u_r, u_t = np.array([np.cos(t), np.sin(t)]), np.array([-np.sin(t), np.cos(t)])  # radial, tangential
        means.append(radius * u_r)
        covs.append(radial**2 * np.outer(u_r, u_r) + tangential**2 * np.outer(u_t, u_t))
    comment = (f"{k} thin components on a ring of radius {radius}: covariance = {tangential}^2 along the tangent + "
               f"{radial}^2 along the radius (std ratio {tangential / radial:g}, rotated with the angle); angles "
               f"2 pi i / {k} + a random offset, weights uniform(0.5, 1.5) normalised; "
               f"benchmarks/specs/make_specs.py ring2d(), numpy default_rng({seed})")
    return {"_comment": comment, "weights": w.tolist(), "means": _r(means), "covs": _r(covs, 8)}


def gmm64d(d: int = 64, k: int = 12, mean_scale: float = 0.5, var_range=(0.002, 0.2), seed: int = 64) -> dict:
    """k components in d dims: means N(0, mean_scale^2 I), covariances Q diag(s) Q^T, Q random rotations,
    s log-uniform in var_range (std ratio up to 10), weights Dirichlet(2) with a floor, sorted."""
    rng = np.random.default_rng(seed)
    means = mean_scale * rng.standard_normal((k, d))
    covs = []
    for _ in range(k):
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        q = q * np.sign(np.diag(r))  # Haar-distributed rotation
        s = np.exp(rng.uniform(np.log(var_range[0]), np.log(var_range[1]), d))
        c = (q * s) @ q.T
        covs.append((c + c.T) / 2)
    w = np.sort(np.maximum(rng.dirichlet(2.0 * np.ones(k)), 0.03))[::-1]
    w = np.round(w / w.sum(), 4)
    w[0] = round(1.0 - w[1:].sum(), 4)
    comment = (f"{d}-D, {k} components, unequal weights: means {mean_scale} * N(0, I); covariances Q diag(s) Q^T "
               f"with random rotations Q and s log-uniform in [{var_range[0]}, {var_range[1]}]; weights "
               f"Dirichlet(2) floored at 0.03, renormalised, sorted; benchmarks/specs/make_specs.py gmm64d(), numpy "
               f"default_rng({seed})")
    # gmm_quality.py's teacher for this spec: 3x the default updates (README: teacher sizing; 6,000 left teacher-256
    # at 2.4x the truth's moment error, 18,000 at 1.4x)
    teacher = {"teacher_iters": 18000}
    return {"_comment": comment, "teacher": teacher, "weights": w.tolist(), "means": _r(means, 4), "covs": _r(covs, 6)}


def main(out: Path = HERE) -> None:
    for name, spec in [("ring2d", ring2d()), ("gmm64d", gmm64d())]:
        (out / f"{name}.json").write_text(json.dumps(spec) + "\n")
        print(f"wrote {out / name}.json: weights {spec['weights']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
