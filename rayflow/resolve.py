"""The driver's one look at the files a job names, between pure validation and the run.

`resolve(job)` returns a new JobConfig with what needs I/O filled in: the teacher files' SHA-256 (recorded, logged
to MLflow, re-checked wherever the teacher is loaded), a text encoder's embedding size, and the FID Inception
weights' digest (checked against eval.inception_sha256). Workers get the resolved config and never repeat this.
"""

from __future__ import annotations

import dataclasses
import os

from rayflow.config import FID_INCEPTION_URL, ConfigError, JobConfig, invalid
from rayflow.files import sha256_file


def resolve(job: JobConfig) -> JobConfig:
    """`job` with teacher digests, text dimension and FID weights' digest filled in; ConfigError says what to fix."""
    data, teacher, evaluation = job.data, job.teacher, job.eval
    if data.text and data.text_dim <= 0:
        from rayflow.data.text import encoder_dim  # reads the encoder's config.json; no weights are loaded

        try:
            data = dataclasses.replace(data, text_dim=encoder_dim(data.text_encoder, data.text_encoder_path))
        except (ValueError, ImportError, OSError) as e:
            raise ConfigError(f"config key 'data.text_encoder' = {data.text_encoder!r}: {e}") from None
    if not teacher.files_sha256:
        from rayflow.teachers import file_digests

        try:
            teacher = dataclasses.replace(teacher, files_sha256=file_digests(teacher))
        except (OSError, ValueError, KeyError) as e:
            raise invalid("teacher.checkpoint", teacher.checkpoint, f"fixing the teacher's files: {e}") from None
    if evaluation.inception_weights is not None and not evaluation.inception_file_sha256:
        evaluation = _inception(evaluation)
    if evaluation.clip_model is not None and not os.path.isfile(
            os.path.join(os.path.expanduser(evaluation.clip_model), "config.json")):
        raise invalid("eval.clip_model", evaluation.clip_model,
                      "pointing it at a local CLIP folder (save_pretrained of a CLIP model, with config.json)")
    return dataclasses.replace(job, data=data, teacher=teacher, eval=evaluation)


def _inception(evaluation):
    path = os.path.abspath(os.path.expanduser(str(evaluation.inception_weights)))
    fix = (f"downloading {FID_INCEPTION_URL} once and setting eval.inception_weights=/path/to/"
           "pt_inception-2015-12-05-6726825d.pth (or null to skip FID and IS)")
    if not os.path.isfile(path):
        raise invalid("eval.inception_weights", evaluation.inception_weights, f"{fix}; no file is there")
    got, want = sha256_file(path), str(evaluation.inception_sha256).strip().lower()
    if not got.startswith(want):
        raise invalid("eval.inception_weights", evaluation.inception_weights,
                      f"{fix}: this file has SHA-256 {got}, not eval.inception_sha256={want} (a different or damaged "
                      "file gives incomparable FID/IS; set eval.inception_sha256 to its hash only if you mean to use "
                      "other weights)")
    return dataclasses.replace(evaluation, inception_weights=path, inception_file_sha256=got)
