"""How a run trains: the distillation's optimisation, the Ray Train resources, MLflow tracking and the run's
name, storage and cadence."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rayflow.config.errors import check_choice, check_positive, fail

ALGORITHMS = ("alternating", "parameter_space")
PRECISIONS = ("auto", "fp32", "bf16")
PRECONDITIONS = ("auto", "adam", "gradient", "identity")


@dataclass
class DistillConfig:
    algorithm: str = "alternating"  # alternating | parameter_space
    steps: int = 8  # k: the student's sampling steps
    lr_student: float = 1e-4
    lr_ratio: float = 1.0  # lr_aux / lr_student
    train_images: int = 100_000  # images the distillation consumes (each optimizer update takes a batch)
    weighting: str = "snr_plus_one"
    s_sampling: str = "mixed"  # uniform | mixed (half log-uniform near 0, reweighted)
    jump: str = "uniform"  # t = s + u / k with u ~ U(0, 1) | full
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    beta1: float = 0.0
    beta2: float = 0.99
    adam_eps: float = 1e-12
    lr_decay: str = "cosine"  # cosine | linear | constant (to 0 at the last update; core.steps.WarmupDecay)
    warmup_images: int = 0  # images over which both lrs ramp linearly from ~0 up to theirs, before the decay
    # alternating: aux updates per student update (1 = the paper's strict alternation). 2 by the quality study
    # (benchmarks/README.md, "What moves the 8-step MNIST student"): FD better on every training seed, moment error
    # on every mixture seed, at the same update count and cost
    aux_per_student: int = 2
    # parameter_space's diagonal Lambda: auto = the teacher's Adam second moments when its export has them
    # (teacher_precond.pt), else `gradient`: 1 / (sqrt(mean squared teacher-loss gradient) + 1e-8) over
    # precond_batches batches of real data, computed on the driver once per teacher SHA-256 and cached
    precondition: str = "auto"  # auto | adam | gradient | identity
    precond_batches: int = 8

    @property
    def lr_aux(self) -> float:
        return self.lr_student * self.lr_ratio

    def validate(self) -> None:
        check_choice("distill.algorithm", self.algorithm, ALGORITHMS)
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1024:
            fail("distill.steps", self.steps, "setting an integer number of student steps in 1..1024 (e.g. 8)")
        check_positive("distill.lr_student", self.lr_student)
        check_positive("distill.lr_ratio", self.lr_ratio)
        check_positive("distill.train_images", self.train_images)
        if not isinstance(self.warmup_images, int) or not 0 <= self.warmup_images < self.train_images:
            fail("distill.warmup_images", self.warmup_images,
                 f"setting an integer in [0, distill.train_images={self.train_images}) (e.g. a tenth of it)")
        check_choice("distill.weighting", self.weighting, ("snr", "snr_plus_one", "truncated_snr", "one"))
        check_choice("distill.s_sampling", self.s_sampling, ("uniform", "mixed"))
        check_choice("distill.jump", self.jump, ("uniform", "full"))
        check_choice("distill.lr_decay", self.lr_decay, ("cosine", "linear", "constant"))
        check_choice("distill.precondition", self.precondition, PRECONDITIONS)
        if not isinstance(self.aux_per_student, int) or self.aux_per_student < 1:
            fail("distill.aux_per_student", self.aux_per_student, "setting an integer >= 1 (1 = strict alternation)")
        if not isinstance(self.precond_batches, int) or self.precond_batches < 1:
            fail("distill.precond_batches", self.precond_batches, "setting an integer >= 1 (e.g. 8)")
        if not 0.0 <= self.ema_decay < 1.0:
            fail("distill.ema_decay", self.ema_decay, "setting a decay in [0, 1)")


@dataclass
class ResourcesConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on small machines leaves CPU for Ray Data's tasks
    gpus_per_worker: float = 1.0
    # dtype of the network forwards only (autocast); differences of outputs, losses, reductions, clipping, the
    # optimizer, the EMA and the parameter-space teacher JVP always run in float32. auto = bf16 on GPU, fp32 on CPU
    precision: str = "auto"  # auto | fp32 | bf16
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    torch_threads: int = 0  # per worker; 0 = torch's default
    # glibc keeps freed CPU memory for reuse (rayflow.malloc): no page-fault storm every step on CPU workers and
    # driver-side sampling; the process then holds its peak memory
    keep_freed_memory: bool = True
    # Train workers hold student, aux, teacher and the EMA in channels_last memory format (NHWC) and feed them 4-D
    # image batches in it; results equal the default layout's to float rounding. Faster convolutions on some
    # hardware and sizes (benchmarks/README.md, "channels_last and torch.compile"). Not with
    # distill.algorithm=parameter_space: its teacher JVP (forward-mode AD) fails through group_norm on channels_last
    # activations (torch 2.13; tests/worker/test_state.py)
    channels_last: bool = False

    def forward_dtype(self, device_type: str):
        """The autocast dtype of network forwards on a device type, or None for full precision."""
        import torch  # here: the config module stays importable without loading torch

        if self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda"):
            return torch.bfloat16
        return None

    def validate(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            fail("resources.num_workers", self.num_workers, "setting an integer >= 1")
        check_positive("resources.cpus_per_worker", self.cpus_per_worker)
        check_choice("resources.precision", self.precision, PRECISIONS)
        if self.use_gpu:
            check_positive("resources.gpus_per_worker", self.gpus_per_worker)


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: sqlite store in the working directory; or http://host:port
    experiment: str = "rayflow"
    sample_grid: int = 64  # images in the logged PNG grids

    def resolved_uri(self) -> str:
        return self.uri or f"sqlite:///{os.path.abspath('mlflow.db')}"

    def validate(self) -> None:
        uri = self.resolved_uri()
        if not uri.startswith(("sqlite:///", "http://", "https://", "databricks")):
            fail(
                "tracking.uri",
                self.uri,
                "using sqlite:////absolute/path.db or http://host:port (MLflow 3's file store is disabled)",
            )


@dataclass
class RunConfig:
    name: str = "demo"  # stable: rerunning the same name resumes from its latest checkpoint
    storage_path: str = ".rayflow/runs"  # made absolute; a URI (s3://, gs://) on clusters
    seed: int = 0
    report_every_images: int = 4096
    checkpoint_every_images: int = 16_384
    eval_samples: int = 1000  # samples per model in the final evaluation
    eval_batch: int = 250
    # In-training evaluation of the student's EMA (distillation only): every this many images, and at the
    # end, rank 0 draws eval_proxy_samples k-step samples (same noise each time) and reports eval.proxy_*
    # (classifier FD, accuracy, precision, recall). 0 turns it off. Sweeps early-stop on it.
    eval_every_images: int = 0
    eval_proxy_samples: int = 256

    def absolute_storage(self) -> str:
        if "://" in self.storage_path:
            return self.storage_path
        return os.path.abspath(os.path.expanduser(self.storage_path))

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            fail("run.name", self.name, "choosing a non-empty name without '/'")
        for key in ("report_every_images", "checkpoint_every_images", "eval_samples", "eval_batch"):
            check_positive(f"run.{key}", getattr(self, key))
        check_positive("run.eval_every_images", self.eval_every_images, allow_zero=True)
        if self.eval_every_images and self.eval_proxy_samples < 4:
            fail("run.eval_proxy_samples", self.eval_proxy_samples, "drawing at least 4 samples (256 or more "
                 "for a stable Frechet distance)")

