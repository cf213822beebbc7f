"""Evaluation of teacher and student checkpoints: samples drawn on Ray actors, offline image metrics (and FID /
Inception Score with the standard Inception-v3 when eval.inception_weights is set), scored on the driver."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from rayflow.config import EvalTarget, JobConfig
from rayflow.core.metrics import gaussian_stats
from rayflow.data.transforms import scale_to_unit_range, scale_to_unit_range_torch
from rayflow.evaluation.classifier import load_or_train_classifier
from rayflow.evaluation.fid import (
    ReferenceStats,
    fid_from_stats,
    inception_features,
    inception_score,
    reference_stats,
)
from rayflow.evaluation.generate import generate_samples
from rayflow.evaluation.inception import FIDInceptionV3, load_fid_inception
from rayflow.evaluation.metrics import image_metrics, real_reference, save_reference, with_caption_consistency
from rayflow.files import sha256_file
from rayflow.models import save_state_dict
from rayflow.orchestrate.datasets import train_dataset
from rayflow.orchestrate.generate import draw_samples, eval_conditions, image_shape

# Real images behind the metrics' reference: enough for stable feature statistics on the built-in data, and
# enough per class for the classifier to learn every class (the shapes set has 144 attribute combinations: 7,200
# images give it 98% held-out accuracy, 2,000 gave 58%).
MIN_REAL = 2000
REAL_PER_CLASS, MAX_REAL = 50, 20_000  # capped: ImageNet's 1,000 classes would ask for 50,000
FID_BATCH = 50  # Inception forward batch (the 299 px activations of 50 images take ~1 GB)


def cache_dir(job: JobConfig) -> str:
    """Where evaluation classifiers and references are cached: beside the runs, or (for a remote
    storage_path such as s3://) in the driver's ~/.cache/rayflow."""
    storage = job.run.absolute_storage()
    return os.path.join(os.path.expanduser("~/.cache/rayflow") if "://" in storage else storage, "cache")


def real_images(job: JobConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n preprocessed real images (N, C, H, W) in [-1, 1] and labels, from the training pipeline (scaled as
    the training workers scale them)."""
    batch = train_dataset(job.data, encode_text=False).limit(n).take_batch(n, batch_format="numpy")
    x = scale_to_unit_range_torch(torch.from_numpy(np.stack(batch["image"])))  # uint8 -> float32 (N, C, H, W)
    return x, torch.from_numpy(np.array(batch["label"])).long()


def generate(
    denoiser: torch.nn.Module, job: JobConfig, sampler: str, steps: int, n: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n conditional samples (`eval_conditions`) from a loaded denoiser on the driver; returns samples, labels,
    seconds. The same samples as `draw_samples` gives for the same checkpoint and seed."""
    cond, labels, _ = eval_conditions(job, n)
    x, secs = generate_samples(denoiser, sampler, steps, cond, image_shape(job), batch=job.run.eval_batch, seed=seed)
    return x, labels, secs


def classifier_and_real(job: JobConfig, cache_dir: str, n: int):
    """(classifier, its file's SHA-256, real images, labels): what the metrics of n samples are computed against,
    the classifier trained once per data set and cached in cache_dir (benchmarks/mnist_curve.py exports them).

    The classifier always learns from the same first real images, however many samples the evaluation that
    trains it scores: the cache is keyed by the data set alone, so a classifier that depended on n would make
    every later metric depend on which evaluation happened to run first on the machine."""
    n_classifier = max(MIN_REAL, min(REAL_PER_CLASS * job.data.num_classes, MAX_REAL))
    real_x, real_y = real_images(job, max(n, n_classifier))
    classifier, sha = load_or_train_classifier(cache_dir, _data_key(job), real_x[:n_classifier],
                                               real_y[:n_classifier])
    return classifier, sha, real_x, real_y


def prepare_reference(job: JobConfig, cache_dir: str) -> str:
    """The file in-training evaluation loads on a worker (classifier + real features, see
    `rayflow.evaluation.metrics.save_reference`), written once per data set into cache_dir."""
    path = os.path.join(cache_dir, f"reference-{_data_key(job)}.pt")
    if not os.path.isfile(path):
        classifier, _, real_x, real_y = classifier_and_real(job, cache_dir, MIN_REAL)
        save_reference(path, classifier, real_reference(classifier, real_x, real_y))
    return path


def evaluate(
    job: JobConfig, teacher_path: str | None, student_path: str | None, cache_dir: str
) -> dict:
    """Teacher (ancestral at teacher.sample_steps, and DDIM at k) versus the k-step student; either side
    may be None (a sweep evaluates its teacher once and each trial's student alone).

    Metrics in the feature space of a small classifier trained on the same data (cached in cache_dir):
    Frechet distance `fd`, class accuracy of the samples (caption consistency on text data), precision and recall;
    with eval.inception_weights also FID and Inception Score; with eval.clip_model (text data) the CLIP score.
    Samples are drawn on eval.workers Ray actors. Returns
    {"metrics": {...}, "samples": {name: tensor}, "classifier_sha256": ..., "fid_reference": ... | None}.
    """
    k = job.distill.steps
    runs = []
    if teacher_path:
        runs += [EvalRun("teacher_ancestral", teacher_path, "teacher", "ancestral", job.teacher.sample_steps),
                 EvalRun("teacher_ddim", teacher_path, "teacher", "ddim", k)]
    if student_path:
        runs.append(EvalRun("student", student_path, "student", "student", k))
    return evaluate_runs(job, runs, cache_dir, n=job.run.eval_samples, seed=job.run.seed + 17)


@dataclass(frozen=True)
class EvalRun:
    """One evaluated row: metrics land under eval.<name>.*."""

    name: str
    path: str  # checkpoint
    model: str  # teacher | student: how the checkpoint is called
    sampler: str
    steps: int


def evaluate_runs(job: JobConfig, runs: list[EvalRun], cache_dir: str, *, n: int, seed: int) -> dict:
    """n conditional samples (`eval_conditions`) per run, scored as `evaluate` describes."""
    inception = load_inception(job)  # first: a wrong weights file fails before minutes of sampling
    classifier, clf_sha, real_x, real_y = classifier_and_real(job, cache_dir, n)
    ref = fid_reference(job, cache_dir, inception) if inception is not None else None
    metrics: dict[str, float] = {"eval.classifier_sha256_prefix": int(clf_sha[:8], 16)}
    if ref is not None:
        metrics |= {"eval.fid_reference_n": ref.n, "eval.fid_reference_sha256_prefix": int(ref.sha256[:8], 16)}
    cond, labels, captions = eval_conditions(job, n)
    clip = load_clip(job)
    samples = {}
    for r in runs:
        x, secs = _teacher_samples_cached(job, r, cond, seed, cache_dir)
        m = with_caption_consistency(image_metrics(classifier, x, labels, real_x, real_y), job.data.text)
        if clip is not None:
            m |= clip.score(x, captions)
        if ref is not None:
            m |= fid_metrics(inception, x, ref)
        metrics.update({f"eval.{r.name}.{key}": float(v) for key, v in m.items()})
        metrics[f"eval.{r.name}.nfe"] = r.steps
        metrics[f"eval.{r.name}.s_per_1k"] = secs * 1000.0 / n
        samples[r.name] = x
    return {"metrics": metrics, "samples": samples, "classifier_sha256": clf_sha,
            "fid_reference": None if ref is None else {"sha256": ref.sha256, "n": ref.n, "meta": ref.meta}}


def _teacher_samples_cached(job: JobConfig, r: EvalRun, cond: torch.Tensor, seed: int, cache_dir: str):
    """draw_samples for a run; a teacher's samples are cached by (teacher file SHA-256, guidance, sampler, steps,
    seed, conditions): the demo's 256-step teacher rows cost minutes and never change between runs. Samples depend
    only on these (per-sample seeds), so a cached row equals a fresh one."""
    if r.model != "teacher" or not os.path.isfile(r.path):
        return draw_samples(job, r.path, r.model, r.sampler, r.steps, cond, seed=seed)
    key = hashlib.sha256(repr((sha256_file(r.path), job.teacher.guidance_scale, r.sampler, r.steps, seed,
                               hashlib.sha256(cond.numpy().tobytes()).hexdigest())).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, "teacher-samples", f"{key}.pt")
    if os.path.isfile(path):
        hit = torch.load(path, map_location="cpu", weights_only=True)
        return hit["x"], float(hit["seconds"])
    x, secs = draw_samples(job, r.path, r.model, r.sampler, r.steps, cond, seed=seed)
    save_state_dict({"x": x, "seconds": torch.tensor(secs)}, path)
    return x, secs


def evaluate_checkpoint(job: JobConfig, target: EvalTarget) -> dict:
    """`python -m rayflow.evaluate`: one checkpoint at its sampler and steps, scored as `evaluate` does; the row
    is named like the final evaluation's (student, teacher_ancestral, teacher_ddim, ...)."""
    name = "student" if (target.model, target.sampler) == ("student", "student") else f"{target.model}_{target.sampler}"
    run = EvalRun(name, target.checkpoint, target.model, target.sampler, target.steps)
    ev = evaluate_runs(job, [run], cache_dir(job), n=target.samples, seed=target.seed)
    return {**ev, "name": name}


def load_clip(job: JobConfig):
    """eval.clip_model's CLIP scorer on the driver's device, or None."""
    if not job.eval.clip_model:
        return None
    from rayflow.evaluation.clip import ClipScorer  # transformers loads only when asked for

    return ClipScorer(os.path.expanduser(job.eval.clip_model), device=_device())


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_inception(job: JobConfig) -> FIDInceptionV3 | None:
    """The FID Inception-v3 from eval.inception_weights (checked against eval.inception_sha256), or None."""
    if not job.eval.inception_weights:
        return None
    return load_fid_inception(job.eval.inception_weights, job.eval.inception_sha256, device=_device())


def fid_reference(job: JobConfig, cache_dir: str, inception: FIDInceptionV3) -> ReferenceStats:
    """Inception statistics of the first min(eval.fid_reference_samples, data size) training images, preprocessed
    by the training pipeline itself, cached in cache_dir as .npz (with their hash and n) and reused."""
    n = train_dataset(job.data, encode_text=False).limit(job.eval.fid_reference_samples).count()
    d = job.data
    key = f"{_data_key(job)}-train-flip{int(d.random_flip)}-seed{d.seed}"

    def batches():
        ds = train_dataset(job.data, encode_text=False).limit(n)
        # uint8 (B, C, H, W) -> float32 [-1, 1], as the training workers scale them (a new, writable array)
        return (scale_to_unit_range(b["image"]) for b in ds.iter_batches(batch_size=FID_BATCH, batch_format="numpy"))

    meta = {"data": {k: getattr(d, k) for k in ("source", "path", "resolution", "channels", "random_flip", "seed")},
            "pipeline": "rayflow.orchestrate.datasets.train_dataset"}
    return reference_stats(cache_dir, key, batches, inception, n, batch_size=FID_BATCH, device=_device(), meta=meta)


def fid_metrics(inception: FIDInceptionV3, x: torch.Tensor, ref: ReferenceStats) -> dict[str, float]:
    """FID of samples x (N, C, H, W) against the reference statistics, and their Inception Score (10 splits,
    fewer when N < 10)."""
    feats, logits = inception_features(inception, x, batch_size=FID_BATCH, device=_device())
    mu, sigma = gaussian_stats(feats)
    is_mean, is_std = inception_score(logits, splits=min(10, len(x)))
    return {"fid": fid_from_stats(mu, sigma, ref.mu, ref.sigma), "is": is_mean, "is_std": is_std}


def _data_key(job: JobConfig) -> str:
    d = job.data
    key = f"{d.source}-{d.resolution}px-{d.channels}ch-{d.num_classes}cls"
    # two folders of the same shape are different real sets
    return key + (f"-{hashlib.sha1(d.path.encode(), usedforsecurity=False).hexdigest()[:8]}" if d.path else "")
