"""The student's network (ModelConfig) and the teacher it is distilled from (TeacherConfig, with the adapters
for networks of your own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayflow.config.data import DataConfig
from rayflow.config.errors import check_choice, check_positive, fail


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
        check_choice("model.net", self.net, ("unet",))
        check_choice("model.prediction", self.prediction, ("eps", "v", "x"))
        check_choice("model.schedule", self.schedule, ("cosine",))
        check_positive("model.channels", self.channels)
        factor = 2 ** (len(self.channel_mult) - 1)
        if data.resolution % factor:
            fail(
                "model.channel_mult",
                self.channel_mult,
                f"using fewer levels or a data.resolution divisible by {factor} (got {data.resolution})",
            )
        bad = [a for a in self.attn_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            fail("model.attn_levels", self.attn_levels, f"using levels in 0..{len(self.channel_mult) - 1}")


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
        check_positive("teacher.train_images", self.train_images)
        check_positive("teacher.lr", self.lr)
        if not 0.0 <= self.cond_drop_prob < 1.0:
            fail("teacher.cond_drop_prob", self.cond_drop_prob, "setting a probability in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            fail("teacher.ema_decay", self.ema_decay, "setting a decay in [0, 1)")
        check_positive("teacher.guidance_scale", self.guidance_scale, allow_zero=True)
        check_positive("teacher.sample_steps", self.sample_steps)
        self._validate_adapter()

    def _validate_adapter(self) -> None:
        check_choice("teacher.adapter", self.adapter, TEACHER_ADAPTERS)
        if not isinstance(self.net, dict):
            fail("teacher.net", self.net, "giving a mapping {_target_: pkg.module.factory, **kwargs}")
        if self.adapter in ("module", "edm"):
            target = self.net.get("_target_")
            if not isinstance(target, str) or "." not in target:
                fail("teacher.net._target_", target, f"naming the function or class that builds your network "
                     f"(e.g. my_pkg.nets.make_model) for teacher.adapter={self.adapter}")
        elif self.net:
            fail("teacher.net", self.net, f"setting teacher.adapter=module or edm (adapter={self.adapter} "
                 "does not build from teacher.net)")
        if self.prediction is not None:
            check_choice("teacher.prediction", self.prediction, ("eps", "v", "x"))
        if self.adapter == "module":
            if self.prediction is None:
                fail("teacher.prediction", None, "saying what your network outputs: eps, v or x")
            check_choice("teacher.schedule", self.schedule, TEACHER_SCHEDULES)
            if self.schedule == "table" and not self.schedule_table:
                fail("teacher.schedule_table", None, 'pointing it at a JSON file {"alpha": [...], "sigma": [...]}')
        if self.label_format is not None:
            check_choice("teacher.label_format", self.label_format, ("index", "one_hot", "none"))
        if not isinstance(self.num_train_steps, int) or self.num_train_steps < 2:
            fail("teacher.num_train_steps", self.num_train_steps, "setting the teacher's number of steps N >= 2")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            fail("teacher.beta_end", self.beta_end, f"setting 0 < beta_start ({self.beta_start}) < beta_end < 1")
        check_positive("teacher.time_scale", self.time_scale)
        if self.sigma_data is not None:
            check_positive("teacher.sigma_data", self.sigma_data)
        check_positive("teacher.sigma_min", self.sigma_min)
        if not self.sigma_max > self.sigma_min:
            fail("teacher.sigma_max", self.sigma_max, f"setting a sigma_max above sigma_min={self.sigma_min}")

