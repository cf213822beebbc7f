"""Evaluation of teacher and student checkpoints on the driver: samples, offline image metrics, grids."""

from __future__ import annotations

import time

import numpy as np
import torch

from rayflow.config import JobConfig
from rayflow.core.samplers import sample
from rayflow.evaluation.classifier import load_or_train_classifier
from rayflow.evaluation.metrics import image_metrics
from rayflow.models import guided, load_teacher
from rayflow.orchestrate.datasets import train_dataset


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
    g = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for lo in range(0, n, job.run.eval_batch):
        y = labels[lo : lo + job.run.eval_batch]
        out.append(
            sample(
                sampler,
                denoiser,
                (len(y), d.channels, d.resolution, d.resolution),
                steps,
                denoiser_schedule(denoiser),
                cond=y,
                generator=g,
            )
        )
    return torch.cat(out).clamp(-1, 1), labels, time.perf_counter() - t0


def denoiser_schedule(denoiser: torch.nn.Module):
    inner = getattr(denoiser, "denoiser", denoiser)  # through the guidance wrapper
    return inner.schedule


def evaluate(job: JobConfig, teacher_path: str, student_path: str | None, cache_dir: str) -> dict:
    """Teacher (ancestral at teacher.sample_steps, and DDIM at k) versus the k-step student.

    Metrics in the feature space of a small classifier trained on the same data (cached in cache_dir):
    Frechet distance `fd`, class accuracy of the samples, precision and recall. Returns
    {"metrics": {...}, "samples": {name: tensor}}.
    """
    n, k = job.run.eval_samples, job.distill.steps
    real_x, real_y = real_images(job, max(n, 2000))
    classifier, clf_sha = load_or_train_classifier(cache_dir, _data_key(job), real_x, real_y)
    teacher = guided(load_teacher(teacher_path, job.model, job.data), job.teacher.guidance_scale, job.data.num_classes)
    runs = [("teacher_ancestral", teacher, "ancestral", job.teacher.sample_steps), ("teacher_ddim", teacher, "ddim", k)]
    if student_path:
        student = load_teacher(student_path, job.model, job.data)  # same architecture, weights only
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
    return f"{d.source}-{d.resolution}px-{d.channels}ch-{d.num_classes}cls"
