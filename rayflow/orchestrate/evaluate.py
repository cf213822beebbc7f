"""Evaluation of teacher and student checkpoints on the driver: samples, offline image metrics, grids."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from rayflow.config import JobConfig
from rayflow.evaluation.classifier import load_or_train_classifier
from rayflow.evaluation.generate import generate_samples
from rayflow.evaluation.metrics import image_metrics, real_reference, save_reference
from rayflow.models import guided, load_teacher
from rayflow.orchestrate.datasets import train_dataset

# Real images behind the metrics' reference: enough for stable feature statistics on the built-in data.
MIN_REAL = 2000


def cache_dir(job: JobConfig) -> str:
    """Where evaluation classifiers and references are cached: beside the runs, or (for a remote
    storage_path such as s3://) in the driver's ~/.cache/rayflow."""
    storage = job.run.absolute_storage()
    return os.path.join(os.path.expanduser("~/.cache/rayflow") if "://" in storage else storage, "cache")


def real_images(job: JobConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to n preprocessed real images (N, C, H, W) in [-1, 1] and labels, from the training pipeline."""
    batch = train_dataset(job.data).limit(n).take_batch(n, batch_format="numpy")
    return torch.from_numpy(np.stack(batch["image"])).float(), torch.from_numpy(np.array(batch["label"])).long()


def generate(
    denoiser: torch.nn.Module, job: JobConfig, sampler: str, steps: int, n: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n class-conditional samples (labels cycle over the classes); returns samples, labels, seconds."""
    d = job.data
    labels = torch.arange(n) % d.num_classes
    x, secs = generate_samples(denoiser, sampler, steps, labels, (d.channels, d.resolution, d.resolution),
                               batch=job.run.eval_batch, seed=seed)
    return x, labels, secs


def _classifier(job: JobConfig, cache_dir: str, n: int):
    real_x, real_y = real_images(job, max(n, MIN_REAL))
    classifier, sha = load_or_train_classifier(cache_dir, _data_key(job), real_x, real_y)
    return classifier, sha, real_x, real_y


def prepare_reference(job: JobConfig, cache_dir: str) -> str:
    """The file in-training evaluation loads on a worker (classifier + real features, see
    `rayflow.evaluation.metrics.save_reference`), written once per data set into cache_dir."""
    path = os.path.join(cache_dir, f"reference-{_data_key(job)}.pt")
    if not os.path.isfile(path):
        classifier, _, real_x, real_y = _classifier(job, cache_dir, MIN_REAL)
        save_reference(path, classifier, real_reference(classifier, real_x, real_y))
    return path


def evaluate(
    job: JobConfig, teacher_path: str | None, student_path: str | None, cache_dir: str
) -> dict:
    """Teacher (ancestral at teacher.sample_steps, and DDIM at k) versus the k-step student; either side
    may be None (a sweep evaluates its teacher once and each trial's student alone).

    Metrics in the feature space of a small classifier trained on the same data (cached in cache_dir):
    Frechet distance `fd`, class accuracy of the samples, precision and recall. Returns
    {"metrics": {...}, "samples": {name: tensor}}.
    """
    n, k = job.run.eval_samples, job.distill.steps
    classifier, clf_sha, real_x, real_y = _classifier(job, cache_dir, n)
    runs = []
    if teacher_path:
        teacher = guided(load_teacher(teacher_path, job.model, job.data, teacher=job.teacher),
                         job.teacher.guidance_scale, job.data.num_classes)
        runs += [("teacher_ancestral", teacher, "ancestral", job.teacher.sample_steps),
                 ("teacher_ddim", teacher, "ddim", k)]
    if student_path:
        # same architecture and adapter as the teacher, weights only
        student = load_teacher(student_path, job.model, job.data, teacher=job.teacher)
        runs.append(("student", student, "student", k))
    metrics: dict[str, float] = {"eval.classifier_sha256_prefix": int(clf_sha[:8], 16)}
    samples = {}
    for name, den, sampler, steps in runs:
        x, y, secs = generate(den, job, sampler, steps, n, seed=job.run.seed + 17)
        m = image_metrics(classifier, x, y, real_x, real_y)
        metrics.update({f"eval.{name}.{key}": float(v) for key, v in m.items()})
        metrics[f"eval.{name}.nfe"] = steps
        metrics[f"eval.{name}.s_per_1k"] = secs * 1000.0 / n
        samples[name] = x
    return {"metrics": metrics, "samples": samples, "classifier_sha256": clf_sha}


def _data_key(job: JobConfig) -> str:
    d = job.data
    key = f"{d.source}-{d.resolution}px-{d.channels}ch-{d.num_classes}cls"
    # two folders of the same shape are different real sets
    return key + (f"-{hashlib.sha1(d.path.encode(), usedforsecurity=False).hexdigest()[:8]}" if d.path else "")
