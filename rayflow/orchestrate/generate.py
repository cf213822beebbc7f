"""Sample generation for evaluation on a Ray Data actor pool: one model copy per actor, GPU when asked for.

The N samples are cut into fixed chunks of run.eval_batch consecutive indices; an actor draws a chunk with
per-index noise (`rayflow.evaluation.generate`), so which actor draws which chunk, and how many actors there
are, cannot change any sample: 1 worker, 8 workers and the driver give the same tensors. On CPUs a different
run.eval_batch does not change them either; on GPUs it moves them by ~1e-3 (cuDNN picks kernels by batch shape;
seen on an H200), which is why chunks, not workers, fix the batches.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import ray
import ray.data
import torch

from rayflow.config import DataConfig, JobConfig
from rayflow.data import shapes
from rayflow.data.text import make_encoder, pack_text
from rayflow.evaluation.generate import generate_samples
from rayflow.malloc import keep_freed_memory
from rayflow.models import guided, load_teacher

logger = logging.getLogger(__name__)


def load_for_sampling(job: JobConfig, path: str, model: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A teacher (with classifier-free guidance at teacher.guidance_scale) or a student (same architecture and
    adapter as the teacher, weights only) from `path`, frozen, on `device`."""
    den = load_teacher(path, job.model, job.data, teacher=job.teacher, device=device)
    return guided(den, job.teacher.guidance_scale, job.data) if model == "teacher" else den


def image_shape(job: JobConfig) -> tuple[int, int, int]:
    d = job.data
    return d.channels, d.resolution, d.resolution


def eval_labels(job: JobConfig, n: int) -> torch.Tensor:
    """Class labels (n,) for `python -m rayflow.sample` on class data: eval.labels cycled, else every class in turn."""
    pool = torch.tensor(job.eval.labels) if job.eval.labels else torch.arange(job.data.num_classes)
    return pool[torch.arange(n) % len(pool)]


def sample_conditions(job: JobConfig, n: int) -> tuple[torch.Tensor, list[int] | None, list[str] | None]:
    """(conditions, class labels or None, captions or None) for `python -m rayflow.sample`: eval.labels on class
    data; on text data eval.captions cycled, else the evaluation captions."""
    if not job.data.text:
        labels = eval_labels(job, n)
        return labels, labels.tolist(), None
    if job.eval.captions:
        captions = [job.eval.captions[i % len(job.eval.captions)] for i in range(n)]
        return encode_captions(job.data, captions), None, captions
    cond, labels, captions = eval_conditions(job, n)
    return cond, labels.tolist(), captions


def encode_captions(data: DataConfig, captions: list[str]) -> torch.Tensor:
    """Captions -> packed text conditions (N, L, D + 1) with the job's text encoder, on the driver."""
    if data.text_encoder == "precomputed":
        raise ValueError("captions cannot be encoded with data.text_encoder=precomputed (there is no encoder); "
                         "FIX THIS by evaluating with the encoder the embeddings were made with (minilm or hf)")
    encoder = _encoder(data.text_encoder, data.text_encoder_path, data.text_max_tokens)
    emb, mask = encoder.encode(list(captions))
    return torch.from_numpy(pack_text(emb, mask, where="evaluation captions"))


@functools.lru_cache(maxsize=2)
def _encoder(kind: str, path: str | None, max_tokens: int):
    return make_encoder(kind, path=path, max_tokens=max_tokens)


def eval_conditions(job: JobConfig, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """(conditions, labels, captions) of n evaluation samples: class data cycles through the classes (condition =
    label); text data (data.source=shapes) uses rayflow's evaluation captions, encoded like the training data, and
    their attribute classes as labels, so the classifier's accuracy is the caption consistency."""
    if not job.data.text:
        labels = torch.arange(n) % job.data.num_classes
        return labels, labels, None
    if not job.data.scorable:
        raise ValueError(
            f"evaluating text-to-image samples needs captions whose content can be checked; data.source="
            f"{job.data.source} has none rayflow can score. FIX THIS by evaluating on data.source=shapes, or set "
            "run.eval_every_images=0 and task=distill and score your student with your own prompts and metric"
        )
    labels, captions = shapes.eval_prompts(n)
    return encode_captions(job.data, captions), torch.from_numpy(labels).long(), captions


class GeneratorActor:
    """Ray Data callable class: loads the model once, then turns batches of chunk ids into their samples."""

    def __init__(self, job: JobConfig, path: str, model: str, sampler: str, steps: int, labels: np.ndarray,
                 seed: int, chunk: int) -> None:
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        if job.resources.keep_freed_memory:
            keep_freed_memory()
        self.denoiser = load_for_sampling(job, path, model, self.device)
        self.job, self.sampler, self.steps, self.seed, self.chunk = job, sampler, steps, seed, chunk
        self.labels = torch.from_numpy(labels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, images, seconds = [], [], []
        for c in batch["chunk"].tolist():
            first = c * self.chunk
            y = self.labels[first : first + self.chunk]
            x, secs = generate_samples(self.denoiser, self.sampler, self.steps, y, image_shape(self.job),
                                       batch=self.chunk, seed=self.seed, device=self.device, first_index=first)
            index.append(np.arange(first, first + len(y)))
            images.append(x.numpy())
            seconds.append(np.full(len(y), secs / len(y)))
        return {"index": np.concatenate(index), "image": np.concatenate(images), "seconds": np.concatenate(seconds)}


def draw_samples(
    job: JobConfig, path: str, model: str, sampler: str, steps: int, labels: torch.Tensor, *, seed: int,
    workers: int | None = None,
) -> tuple[torch.Tensor, float]:
    """One sample per condition (labels: class labels (N,) or packed text conditions (N, L, D + 1)) from the
    checkpoint at `path` (`model`: teacher | student) with `sampler` at `steps`: (N, C, H, W) in [-1, 1] on CPU and
    the sampling seconds summed over chunks (one worker's time).

    `workers` (default eval.workers) actors with eval.cpus_per_worker / eval.gpus_per_worker each; 0 samples
    on the driver. The result is the same for every worker count.
    """
    workers = job.eval.workers if workers is None else workers
    chunk, n = job.run.eval_batch, len(labels)
    if workers == 0:
        device = "cuda" if job.eval.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        den = load_for_sampling(job, path, model, device)
        return generate_samples(den, sampler, steps, labels, image_shape(job), batch=chunk, seed=seed, device=device)
    n_chunks = -(-n // chunk)
    workers = min(workers, n_chunks)
    _warn_if_unschedulable(job, workers)
    # from_items: one in-memory block per chunk, so actors share the chunks and no read task needs a CPU
    # slot beside the actors (on a 2-CPU machine that would hang silently).
    ds = ray.data.from_items([{"chunk": c} for c in range(n_chunks)], override_num_blocks=n_chunks)
    ds = ds.map_batches(
        GeneratorActor,
        fn_constructor_kwargs={"job": job, "path": path, "model": model, "sampler": sampler, "steps": steps,
                               "labels": labels.numpy(), "seed": seed, "chunk": chunk},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=job.eval.cpus_per_worker,
        num_gpus=job.eval.gpus_per_worker or None,
    )
    out = torch.empty(n, *image_shape(job))
    seen = np.zeros(n, bool)
    secs = 0.0
    t0 = time.perf_counter()
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):  # chunks arrive in any order
        out[torch.tensor(b["index"])] = torch.tensor(b["image"])  # copies: Ray's blocks are read-only
        seen[b["index"]] = True
        secs += float(b["seconds"].sum())
    if not seen.all():
        raise RuntimeError(f"distributed sampling returned {seen.sum()} of {n} samples")
    logger.info("%d samples (%s, %d steps) on %d actor(s) in %.1f s wall, %.1f s sampling", n, sampler, steps,
                workers, time.perf_counter() - t0, secs)
    return out, secs


def _warn_if_unschedulable(job: JobConfig, workers: int) -> None:
    # Not an error: an autoscaling cluster adds the nodes once the actors ask for them.
    have = ray.cluster_resources()
    for kind, per in (("CPU", job.eval.cpus_per_worker), ("GPU", job.eval.gpus_per_worker)):
        if per and have.get(kind, 0) < workers * per:
            logger.warning("eval.workers=%d x %s %s each exceed the cluster's %s %s; the actors that fit sample, "
                           "the rest wait for resources. FIX THIS by lowering eval.workers or eval.%s_per_worker",
                           workers, per, kind, have.get(kind, 0), kind, kind.lower())
