"""The final evaluation and the `python -m rayflow.evaluate` / `rayflow.sample` commands: FID weights, sample
generation, and the checkpoint a command draws (EvalTarget)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

from rayflow.config.data import DataConfig
from rayflow.config.errors import check_choice, check_int, check_positive, fail
from rayflow.config.model import TeacherConfig
from rayflow.config.training import DistillConfig, RunConfig
from rayflow.files import export_path

# The FID Inception-v3 weights the field uses (pytorch-fid's port of the 2015 TF graph). Literals here so the
# config stays torch-free; tests hold them equal to rayflow.evaluation.inception's constants.
FID_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")
EVAL_MODELS = ("teacher", "student")
EVAL_SAMPLERS = ("ancestral", "ddim", "student")


class JobSections(Protocol):
    """What `EvalConfig.target` reads of a JobConfig (rayflow.config.job imports this module, not the reverse)."""

    run: RunConfig
    teacher: TeacherConfig
    distill: DistillConfig


@dataclass(frozen=True)
class EvalTarget:
    """One checkpoint and how to sample it: what `EvalConfig.target` resolves for the CLIs."""

    checkpoint: str
    model: str  # teacher | student
    sampler: str
    steps: int
    samples: int
    seed: int


@dataclass
class EvalConfig:
    """Final evaluation (after training) and the `python -m rayflow.evaluate` / `rayflow.sample` commands."""

    # FID and Inception Score: a local copy of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (nothing is
    # downloaded); null reports the classifier-feature metrics only
    inception_weights: str | None = None
    inception_sha256: str = FID_INCEPTION_SHA256  # the weights file must match (a prefix of >= 8 hex digits works)
    fid_reference_samples: int = 50_000  # real images behind the FID reference statistics, capped by the data size
    # Sample generation on a Ray Data actor pool, one model copy per actor; samples do not depend on the count.
    # Two: both cores of a 2-core box sample (the demo's 256-step teacher rows in ~0.6x the time of one actor);
    # on a cluster with room for fewer, the actors that fit do the work. 0: generate on the driver without Ray.
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: actors sample on GPUs
    # python -m rayflow.evaluate / rayflow.sample
    checkpoint: str | None = None  # null: the run's export (teacher: teacher.checkpoint or export/teacher.pt)
    model: str = "student"  # teacher | student: how eval.checkpoint is sampled (teacher with teacher.guidance_scale)
    sampler: str | None = None  # ancestral | ddim | student; null: ancestral for a teacher, student for a student
    steps: int | None = None  # null: teacher.sample_steps for a teacher, distill.steps for a student
    samples: int | None = None  # null: run.eval_samples
    seed: int | None = None  # null: run.seed + 17 (the final evaluation's noise)
    # rayflow.sample: class labels, cycled over the samples; null: 0, 1, ..., C-1. A list of ints; Any (not
    # list[int] | None) so that Hydra takes eval.labels=7 too, which validate() reads as [7]
    labels: Any = None
    # rayflow.sample on text data: prompts, cycled; null: the evaluation captions. A list of strings; Any so that
    # Hydra takes one prompt, eval.captions='a red circle above a blue square', too
    captions: Any = None
    out: str | None = None  # rayflow.sample: x.npz or a directory/ (PNGs); rayflow.evaluate: the metrics JSON
    mlflow: bool = False  # rayflow.evaluate: also log the metrics to an MLflow run (tracking.*)
    # Text data: a local CLIP folder (save_pretrained of a CLIP model) adds eval.*.clip_score; null: none
    clip_model: str | None = None
    # Recorded, not set: the weights file's SHA-256, filled where the config is first validated (the driver), so
    # a missing or wrong file stops the job before training, and Train workers without the file skip the check.
    inception_file_sha256: str | None = None

    def validate(self, data: DataConfig) -> None:
        sha = str(self.inception_sha256).strip().lower()
        if len(sha) < 8 or any(c not in "0123456789abcdef" for c in sha):
            fail("eval.inception_sha256", self.inception_sha256, "giving the weights file's hex SHA-256 (sha256sum "
                 f"FILE), or leaving the default {FID_INCEPTION_SHA256}")
        if self.inception_weights is not None and "://" in str(self.inception_weights):
            fail("eval.inception_weights", self.inception_weights, "copying the file to local disk (it is never "
                 f"downloaded): download {FID_INCEPTION_URL} once and point eval.inception_weights at it")
        check_int("eval.fid_reference_samples", self.fid_reference_samples, 2)
        check_int("eval.workers", self.workers, 0)
        check_positive("eval.cpus_per_worker", self.cpus_per_worker)
        check_positive("eval.gpus_per_worker", self.gpus_per_worker, allow_zero=True)
        check_choice("eval.model", self.model, EVAL_MODELS)
        if self.sampler is not None:
            check_choice("eval.sampler", self.sampler, EVAL_SAMPLERS)
        for key, least in (("steps", 1), ("samples", 1), ("seed", None)):
            if getattr(self, key) is not None:
                check_int(f"eval.{key}", getattr(self, key), least, ", or null for the default")
        if isinstance(self.labels, int) and not isinstance(self.labels, bool):
            self.labels = [self.labels]  # eval.labels=7 on the command line
        if self.labels is not None and (
            not isinstance(self.labels, list) or not self.labels
            or not all(isinstance(y, int) and 0 <= y < data.num_classes for y in self.labels)
        ):
            fail("eval.labels", self.labels, f"listing class labels in 0..{data.num_classes - 1}, e.g. "
                 "eval.labels=[3,7], or null for all classes")
        if isinstance(self.captions, str):
            self.captions = [self.captions]  # eval.captions='a red circle above a blue square'
        if self.captions is not None and (not self.captions or not all(isinstance(c, str) for c in self.captions)):
            fail("eval.captions", self.captions, "listing prompts, e.g. eval.captions='[\"a red circle above a blue "
                 "square\"]', or null for the evaluation captions")
        if self.clip_model is not None:
            if not data.text:
                fail("eval.clip_model", self.clip_model, "leaving it null: CLIP scores captions, and this data has "
                     "none (data.text_encoder=none)")

    def target(self, job: JobSections, command: str) -> EvalTarget:
        """What `python -m rayflow.<command>` (evaluate | sample) draws, defaults filled in; ConfigError when the
        checkpoint (or, for sample, eval.out) is missing."""
        teacher = self.model == "teacher"
        export = export_path(os.path.join(job.run.absolute_storage(), job.run.name, "export"), self.model)
        path = self.checkpoint or (job.teacher.checkpoint if teacher and job.teacher.checkpoint else export)
        path = path if "://" in path else os.path.abspath(os.path.expanduser(path))
        if not (os.path.isfile(path) or (teacher and job.teacher.adapter == "diffusers" and os.path.isdir(path))):
            fail("eval.checkpoint", self.checkpoint, f"pointing eval.checkpoint at a {self.model} checkpoint (nothing "
                 f"at {path}; `python -m rayflow.train` with the same run.name exports one there)")
        if command == "sample" and not self.out:
            fail("eval.out", self.out, "setting eval.out=samples.npz (one array) or eval.out=some/dir/ (PNGs)")
        if command == "sample" and not (self.out.endswith(("/", ".npz")) or not os.path.splitext(self.out)[1]):
            fail("eval.out", self.out, "giving a path ending in .npz, or a directory ending in /")
        return EvalTarget(
            checkpoint=path,
            model=self.model,
            sampler=self.sampler or ("ancestral" if teacher else "student"),
            steps=self.steps or (job.teacher.sample_steps if teacher else job.distill.steps),
            samples=self.samples or job.run.eval_samples,
            seed=job.run.seed + 17 if self.seed is None else self.seed,
        )
