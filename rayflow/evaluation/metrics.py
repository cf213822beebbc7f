"""Image metrics in a `FeatureClassifier`'s feature space: Frechet distance, k-NN precision/recall, accuracy.

The real set's features, Gaussian statistics and k-NN radii are computed once per (classifier weights,
real set) and kept in memory, so evaluating many checkpoints or step counts against one real set pays
for it once.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from rayflow.core.metrics import frechet_distance, gaussian_stats
from rayflow.evaluation.classifier import FeatureClassifier

EVAL_BATCH = 500


@dataclass(frozen=True)
class RealReference:
    """What the metrics need of the real set, computed once."""

    features: torch.Tensor  # (N, F)
    mu: np.ndarray  # (F,)
    cov: np.ndarray  # (F, F)
    radii: torch.Tensor  # (N,) distance of each real point to its k-th nearest real neighbour
    accuracy: float | None  # the classifier's accuracy on the real set: the ceiling for sample accuracy


# Classifier -> {fingerprint of weights + real set + k: reference}. Weak keys: the cache goes when the
# classifier does, instead of pinning every evaluated real set for the life of the process.
_REAL_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, RealReference]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def features_and_logits(
    classifier: FeatureClassifier, images: torch.Tensor | np.ndarray, *, batch: int = EVAL_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) images in [-1, 1] (clamped, as saving them would) -> features (N, F), logits (N, K) on CPU."""
    classifier.eval()
    x = _as_images(images, classifier)
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for chunk in x.split(batch):
        f = classifier.features(chunk.to(device).clamp(-1.0, 1.0))  # (B, F)
        feats.append(f.float().cpu())
        logits.append(classifier.head(f).float().cpu())  # (B, K)
    return torch.cat(feats), torch.cat(logits)


def _as_images(images: torch.Tensor | np.ndarray, classifier: FeatureClassifier) -> torch.Tensor:
    x = torch.as_tensor(images, dtype=torch.float32)
    want = (classifier.in_channels, classifier.res, classifier.res)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"images of shape {tuple(x.shape)} do not fit the classifier, which takes (N, {want[0]}, "
                         f"{want[1]}, {want[2]}); FIX THIS by evaluating at the resolution and channels the "
                         "classifier was trained on (or train one for this data)")
    return x


def knn_radii(features: torch.Tensor, k: int = 3, *, batch: int = 1000) -> torch.Tensor:
    """(N, F) -> (N,): each point's distance to its k-th nearest neighbour in the same set (itself excluded)."""
    if features.shape[0] <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {features.shape[0]}; FIX THIS by "
                         "evaluating more samples")
    out = []
    for chunk in features.split(batch):
        d = torch.cdist(chunk, features)  # (B, N)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the point itself
    return torch.cat(out)


def manifold_coverage(
    query: torch.Tensor, reference: torch.Tensor, radii: torch.Tensor, *, batch: int = 1000
) -> float:
    """Share of query points (Q, F) inside at least one ball (reference[j], radii[j])."""
    inside = [(torch.cdist(chunk, reference) <= radii[None]).any(dim=1) for chunk in query.split(batch)]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, *, real_radii: torch.Tensor | None = None
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features fake (M, F) against real (N, F).

    Precision: share of fake points inside the real manifold (union of k-NN balls around real points);
    recall: share of real points inside the fake manifold.
    """
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    precision = manifold_coverage(fake, real, real_radii)
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def real_reference(
    classifier: FeatureClassifier,
    real_images: torch.Tensor | np.ndarray,
    real_labels: torch.Tensor | np.ndarray | None,
    *,
    k: int = 3,
) -> RealReference:
    """The real set's features, Gaussian stats and k-NN radii, memoised per classifier weights and real set."""
    x = _as_images(real_images, classifier)
    labels = None if real_labels is None else torch.as_tensor(real_labels, dtype=torch.int64)
    key = _fingerprint(classifier, x, labels, k)
    per_classifier = _REAL_CACHE.setdefault(classifier, {})
    if key not in per_classifier:
        feats, logits = features_and_logits(classifier, x)
        mu, cov = gaussian_stats(feats.numpy())
        accuracy = None if labels is None else (logits.argmax(1) == labels).double().mean().item()
        per_classifier[key] = RealReference(feats, mu, cov, knn_radii(feats, k), accuracy)
    return per_classifier[key]


def _fingerprint(classifier: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None, k: int) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    # The weights too: a classifier trained further in place must not hit stale features.
    for t in [*classifier.state_dict().values(), x] + ([] if labels is None else [labels]):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(str(k).encode())
    return h.hexdigest()


def image_metrics(
    classifier: FeatureClassifier,
    samples: torch.Tensor | np.ndarray,
    sample_labels: torch.Tensor | np.ndarray | None,
    real_images: torch.Tensor | np.ndarray,
    real_labels: torch.Tensor | np.ndarray | None,
    *,
    k: int = 3,
) -> dict[str, float]:
    """Metrics of samples (N, C, H, W) in [-1, 1] against the real set, in the classifier's feature space.

    Returns `fd` (Frechet distance of features; lower is better), `precision` and `recall` (k-NN manifold
    estimates in [0, 1]), `accuracy` (share of class-conditional samples classified as their label; only
    when `sample_labels` is given) and `real_accuracy` (the same on the real set, its ceiling; only when
    `real_labels` is given). Use a few hundred samples or more: FD is biased upward at small N.
    """
    return metrics_against(classifier, real_reference(classifier, real_images, real_labels, k=k), samples,
                           sample_labels, k=k)


def metrics_against(
    classifier: FeatureClassifier,
    ref: RealReference,
    samples: torch.Tensor | np.ndarray,
    sample_labels: torch.Tensor | np.ndarray | None,
    *,
    k: int = 3,
) -> dict[str, float]:
    """`image_metrics` against a precomputed real reference (e.g. one loaded in a training worker)."""
    feats, logits = features_and_logits(classifier, samples)
    if feats.shape[0] < 2:
        raise ValueError("image metrics need at least 2 samples; FIX THIS by evaluating more samples")
    mu, cov = gaussian_stats(feats.numpy())
    precision, recall = precision_recall(ref.features, feats, k, real_radii=ref.radii)
    out = {"fd": frechet_distance(mu, cov, ref.mu, ref.cov), "precision": precision, "recall": recall}
    if sample_labels is not None:
        labels = torch.as_tensor(sample_labels, dtype=torch.int64)
        if labels.shape != feats.shape[:1]:
            raise ValueError(f"{labels.numel()} sample labels for {feats.shape[0]} samples; FIX THIS by passing "
                             "the class each sample was generated for (or None when unconditional)")
        out["accuracy"] = (logits.argmax(1) == labels).double().mean().item()
    if ref.accuracy is not None:
        out["real_accuracy"] = ref.accuracy
    return out


def save_reference(path: str, classifier: FeatureClassifier, ref: RealReference) -> None:
    """Write classifier weights and the real reference as one weights-only file (atomic), for workers
    that evaluate during training without the real images."""
    state = {
        "classifier": classifier.state_dict(),
        "shape": torch.tensor([classifier.in_channels, classifier.num_classes, classifier.res]),
        "features": ref.features,
        "mu": torch.from_numpy(ref.mu),
        "cov": torch.from_numpy(ref.cov),
        "radii": ref.radii,
        "accuracy": torch.tensor(float("nan") if ref.accuracy is None else ref.accuracy, dtype=torch.float64),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".reference-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_reference(path: str | BinaryIO) -> tuple[FeatureClassifier, RealReference]:
    """Read what `save_reference` wrote (a path or an open binary file): (classifier in eval mode, reference)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    in_channels, num_classes, res = (int(v) for v in state["shape"])
    classifier = FeatureClassifier(in_channels, num_classes, res)
    classifier.load_state_dict(state["classifier"])
    acc = float(state["accuracy"])
    ref = RealReference(state["features"], state["mu"].numpy(), state["cov"].numpy(), state["radii"],
                        None if math.isnan(acc) else acc)
    return classifier.eval(), ref


def with_caption_consistency(metrics: dict[str, float], text: bool) -> dict[str, float]:
    """Text data (the captioned shapes): the classifier recognises a caption's attributes, so its accuracy on
    samples is the caption consistency (share of samples showing what their caption says); named so too."""
    if text and "accuracy" in metrics:
        return {**metrics, "caption_consistency": metrics["accuracy"]}
    return metrics
