"""The parameter-space preconditioner Lambda, resolved once on the driver and handed to the workers.

`auto` reads the Adam second moments rayflow's teacher export writes beside the teacher; any other teacher (a
foreign network, or a native one without its optimizer state) gets 1 / (sqrt(v) + eps) with v the mean squared
gradient of the teacher's own loss on real data, computed at start-up and cached by the teacher's SHA-256.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch

from rayflow.config import JobConfig
from rayflow.core.moment_matching import gradient_preconditioner
from rayflow.models import load_teacher, save_state_dict
from rayflow.orchestrate.evaluate import cache_dir, real_images
from rayflow.teachers import PRECOND_NAME, file_digests

logger = logging.getLogger(__name__)

PRECOND_EPS = 1e-8


def adam_precond_path(job: JobConfig) -> str:
    return os.path.join(os.path.dirname(job.teacher.checkpoint or ""), PRECOND_NAME)


def teacher_preconditioner(job: JobConfig) -> dict[str, torch.Tensor] | None:
    """Lambda's diagonal by the teacher network's parameter names, or None (identity, or not parameter_space)."""
    d = job.distill
    if d.algorithm != "parameter_space" or d.precondition == "identity":
        return None
    adam = adam_precond_path(job)
    has_adam = job.teacher.adapter == "native" and os.path.isfile(adam)
    if d.precondition == "adam" and not has_adam:
        raise ValueError(
            f"distill.precondition=adam but {adam} does not exist (only rayflow's own teacher export writes it); "
            "FIX THIS by setting distill.precondition=gradient (or auto) for this teacher"
        )
    if has_adam and d.precondition in ("auto", "adam"):
        return torch.load(adam, map_location="cpu", weights_only=True)
    path = os.path.join(cache_dir(job), "precond", f"{_cache_key(job)}.pt")
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    logger.info("computing the teacher's gradient preconditioner on %d batches of real data", d.precond_batches)
    precond = gradient_precond_from_data(job)
    save_state_dict(precond, path)
    return precond


def gradient_precond_from_data(job: JobConfig) -> dict[str, torch.Tensor]:
    """`gradient_preconditioner` of the configured teacher over distill.precond_batches training batches."""
    d, b = job.data, job.data.batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_teacher(job.teacher.checkpoint, job.model, d, sha256=job.teacher.sha256, device=device,
                           teacher=job.teacher)
    x, labels = real_images(job, job.distill.precond_batches * b)
    # class labels condition the loss; captions are not encoded here, so text teachers use the null condition
    if d.text:
        cond = torch.zeros(x.shape[0], d.text_max_tokens, d.text_dim + 1)
    else:
        cond = torch.where(labels >= 0, labels, torch.full_like(labels, d.null_condition)) if d.num_classes else None
    batches = [(x[i : i + b].to(device), None if cond is None else cond[i : i + b].to(device))
               for i in range(0, x.shape[0] - b + 1, b)]
    if not batches:
        raise ValueError(f"the training data holds fewer than data.batch_size={b} images; FIX THIS by adding data")
    pre = gradient_preconditioner(teacher, batches, teacher.schedule, weighting=job.teacher.weighting,
                                  eps=PRECOND_EPS, generator=torch.Generator(device=device).manual_seed(job.run.seed))
    return {k: v.cpu() for k, v in pre.items()}


def _cache_key(job: JobConfig) -> str:
    # the teacher's files (weights, configs) by SHA-256, plus what the estimate depends on
    files = {k: v for k, v in (job.teacher.files_sha256 or file_digests(job.teacher)).items() if k != PRECOND_NAME}
    what = [job.teacher.checkpoint if not files else "", sorted(files.items()), job.teacher.weighting,
            job.distill.precond_batches, job.data.batch_size, job.data.resolution, job.data.source, job.run.seed]
    return "gradient-" + hashlib.sha256(repr(what).encode()).hexdigest()[:24]
