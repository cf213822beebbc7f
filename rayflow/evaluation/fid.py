"""FID and Inception Score with the FID Inception-v3, and cached reference statistics of the real data.

Reference statistics (mean and covariance of the real set's pool3 features) cost a pass of Inception over
the whole dataset, so they are computed once per (data, preprocessing, weights, sample count) and kept as
`.npz` files: mu, sigma, n, a JSON `meta` saying what made them, and a content hash that `load_reference_stats`
checks, so a truncated or altered file fails loudly instead of giving a wrong FID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import log_softmax, logsumexp

from rayflow.core.metrics import frechet_distance
from rayflow.evaluation.inception import FEATURE_DIM, INPUT_SIZE, FIDInceptionV3, sha256_file

STATS_FORMAT = 1
# What the features are of: written into every reference file so a reader can tell how it was made.
PREPROCESSING = (f"images in [-1, 1] (uint8 x / 127.5 - 1, floats clamped), grayscale repeated to RGB, bilinear "
                 f"resize to {INPUT_SIZE}x{INPUT_SIZE} (align_corners=False), FID Inception-v3 pool3 "
                 f"({FEATURE_DIM}-d), float32 forward without TF32, float64 statistics")

Images = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class ReferenceStats:
    """Gaussian statistics of a real set's Inception features, as saved in a reference `.npz`."""

    mu: np.ndarray  # (2048,) float64
    sigma: np.ndarray  # (2048, 2048) float64
    n: int  # number of images they were computed from
    meta: dict  # what data, preprocessing and weights made them
    sha256: str  # of the .npz file, to log next to the FID it produced


def inception_features(
    model: FIDInceptionV3,
    images: Images | Iterable[Images],
    batch_size: int = 50,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, C, H, W), or an iterable of such batches -> pool3 features (N, 2048), logits (N, 1008), float64.

    Images are in [-1, 1] (floats, clamped) or uint8 in [0, 255]; C is 1 or 3. Runs in eval mode without
    gradients, `batch_size` images at a time, on `device` (default: the model's; the model is moved there).
    """
    feats, logits = [], []
    for f, lg in _feature_batches(model, images, batch_size, device):
        feats.append(f)
        logits.append(lg)
    if not feats:
        raise ValueError("no images to compute Inception features of; FIX THIS by passing at least one image")
    return np.concatenate(feats), np.concatenate(logits)


def _feature_batches(
    model: FIDInceptionV3, images: Images | Iterable[Images], batch_size: int, device: str | torch.device | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} < 1; FIX THIS by passing a positive batch size")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    model.eval()
    batches = [images] if isinstance(images, torch.Tensor | np.ndarray) else images
    with torch.no_grad(), _no_tf32(device):
        for batch in batches:
            x = _as_images(batch)
            for chunk in x.split(batch_size):
                f, lg = model(chunk.to(device))
                yield f.double().cpu().numpy(), lg.double().cpu().numpy()


def _as_images(images: Images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images of shape {tuple(x.shape)} are not (N, 1 or 3, H, W); FIX THIS by passing "
                         "channel-first images (x.permute(0, 3, 1, 2))")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0  # what saving and reloading a sample as PNG would feed pytorch-fid
    # Clamped as saving the images would: samples overshooting [-1, 1] slightly are not a different set.
    return x.float().clamp(-1.0, 1.0)


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    # TF32 convolutions (cuDNN's default on Ampere+) move pool3 features by ~1e-3 and FID in the first
    # decimal; the reference numbers were computed in full float32.
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between the Gaussians (mu1, sigma1) and (mu2, sigma2) of two feature sets (lower is better)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
                         f"{sigma2.shape}; FIX THIS by comparing statistics of the same feature layer")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"FID statistic {name} has NaN or inf entries; FIX THIS by checking the images "
                             "(a diverged sampler produces NaN)")
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` equal parts) of logits (N, K): exp E_x KL(p(y|x) || p(y)).

    Higher is better; 1 for identical or uniform predictions, K for confident predictions spread evenly
    over K classes. The field reports it for 50,000 samples with 10 splits.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
        raise ValueError(f"inception_score needs logits (N, K) with N >= splits={splits}, got shape "
                         f"{logits.shape}; FIX THIS by scoring more samples or using fewer splits")
    scores = []
    for part in np.array_split(logits, splits):
        log_p = log_softmax(part, axis=1)  # (n, K) log p(y|x)
        log_py = logsumexp(log_p, axis=0) - np.log(part.shape[0])  # (K,) log p(y), the split's marginal
        p = np.exp(log_p)
        # p log(p / p(y)) -> 0 where p underflows to 0 (there log p - log p(y) may be -inf - -inf = nan).
        with np.errstate(invalid="ignore"):
            kl = np.where(p > 0, p * (log_p - log_py), 0.0).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _content_hash(mu: np.ndarray, sigma: np.ndarray, n: int, meta_json: str) -> str:
    h = hashlib.sha256()
    for a in (mu, sigma):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, np.float64).tobytes())
    h.update(f"{n}\n{meta_json}".encode())
    return h.hexdigest()


def save_reference_stats(path: str, mu: np.ndarray, sigma: np.ndarray, n: int, meta: dict) -> str:
    """Write reference statistics to `path` (.npz) atomically; returns the file's SHA-256.

    `meta` (JSON-serialisable) should say what data and preprocessing made them. A content hash is stored
    inside, so `load_reference_stats` detects a damaged file.
    """
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()) or int(n) < 2:
        raise ValueError(f"reference stats mu {mu.shape}, sigma {sigma.shape}, n={n} are not finite Gaussian "
                         "statistics of >= 2 samples; FIX THIS by passing mean (D,), covariance (D, D) and n")
    meta_json = json.dumps(meta, sort_keys=True)
    digest = _content_hash(mu, sigma, int(n), meta_json)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Unique temp name + os.replace: parallel evaluators may write the same key; readers never see half a file.
    fd, tmp = tempfile.mkstemp(prefix=".refstats-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, n=np.int64(n), meta=np.str_(meta_json), sha256=np.str_(digest),
                     format=np.int64(STATS_FORMAT))
        file_digest = sha256_file(tmp)  # of our own bytes, even if a parallel writer replaces the file after us
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return file_digest


def load_reference_stats(path: str, expect_n: int | None = None) -> ReferenceStats:
    """Reference statistics saved by `save_reference_stats`, verified against their content hash.

    Raises FileNotFoundError when missing and ValueError when the file is damaged or was computed from a
    number of samples other than `expect_n`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference stats {path} not found; FIX THIS by computing them with "
                                "reference_stats(...) (or fixing the path)")
    fix = "FIX THIS by deleting the file so reference_stats(...) recomputes it"
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma, n = z["mu"], z["sigma"], int(z["n"])
            meta_json, stored = str(z["meta"]), str(z["sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"reference stats {path} are unreadable or incomplete ({type(err).__name__}: {err}); "
                         f"{fix}") from err
    if _content_hash(mu, sigma, n, meta_json) != stored:
        raise ValueError(f"reference stats {path} do not match their stored content hash (damaged or edited); {fix}")
    if expect_n is not None and n != expect_n:
        raise ValueError(f"reference stats {path} were computed from n={n} images, expected n={expect_n}; FIX THIS "
                         f"by asking for n={n}, or deleting the file to recompute with {expect_n}")
    return ReferenceStats(mu, sigma, n, json.loads(meta_json), sha256_file(path))


class _RunningGaussian:
    """Mean and covariance of streamed features without keeping them (50k x 2048 float64 would be 800 MB)."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None  # first batch's mean: sums of shifted values lose less precision
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def add(self, f: np.ndarray) -> None:
        if self.shift is None:
            self.shift = f.mean(0)
            self.sum, self.outer = np.zeros_like(self.shift), np.zeros((f.shape[1], f.shape[1]))
        c = f - self.shift
        self.sum += c.sum(0)
        self.outer += c.T @ c
        self.n += f.shape[0]

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        mean_c = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mean_c, mean_c)) / (self.n - 1)  # unbiased, like np.cov
        return self.shift + mean_c, (cov + cov.T) / 2


def weights_fingerprint(model: FIDInceptionV3) -> str:
    """SHA-256 of the weights file the model was loaded from, else of its state_dict's tensors."""
    if getattr(model, "weights_sha256", None):
        return model.weights_sha256
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        h.update(f"{key}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_stats(
    cache_dir: str,
    key: str,
    images_iter_fn: Callable[[], Iterable[Images]],
    model: FIDInceptionV3,
    n: int,
    *,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    meta: dict | None = None,
) -> ReferenceStats:
    """The real set's Inception statistics over its first `n` images, computed once and cached as `.npz`.

    `key` must name the data and its preprocessing (e.g. "mnist-32-train" or a hash of the shards); the
    cache file name adds the weights' SHA-256 and n, so other weights or sizes never reuse it.
    `images_iter_fn()` yields batches (B, C, H, W) as training sees them; it is called only on a cache miss.
    """
    if n < 2:
        raise ValueError(f"reference stats need n >= 2 images, got {n}; FIX THIS by asking for more (FID is "
                         "reported with 50,000 or at least 10,000)")
    weights = weights_fingerprint(model)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80]
    ident = hashlib.sha256(f"{key}\n{weights}\n{n}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"inception-ref-{slug}-n{n}-{ident}.npz")
    if os.path.exists(path):
        ref = load_reference_stats(path, expect_n=n)
        if ref.meta.get("key") != key or ref.meta.get("weights_sha256") != weights:
            raise ValueError(f"reference stats {path} were made for key {ref.meta.get('key')!r} and weights "
                             f"{ref.meta.get('weights_sha256')}, not {key!r} and {weights}; FIX THIS by deleting it")
        return ref
    acc = _RunningGaussian()
    for f, _ in _feature_batches(model, _first_n(images_iter_fn(), n), batch_size, device):
        acc.add(f)
    if acc.n < n:
        raise ValueError(f"the data for reference stats {key!r} gave {acc.n} images, {n} requested; FIX THIS by "
                         "asking for at most as many images as the dataset has")
    mu, sigma = acc.stats()
    full_meta = {**(meta or {}), "key": key, "n": n, "weights_sha256": weights, "preprocessing": PREPROCESSING,
                 "format": STATS_FORMAT}
    digest = save_reference_stats(path, mu, sigma, n, full_meta)
    return ReferenceStats(mu, sigma, n, full_meta, digest)


def _first_n(batches: Iterable[Images], n: int) -> Iterator[torch.Tensor]:
    left = n
    for batch in batches:
        if left <= 0:
            return
        x = torch.as_tensor(batch)[:left]
        left -= x.shape[0]
        yield x

