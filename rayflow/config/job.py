"""JobConfig, the whole job: its sections, the cross-section rules, and building it from a nested mapping (what
Hydra composes; missing keys take the dataclass defaults, unknown ones are errors)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rayflow.config.data import DataConfig
from rayflow.config.errors import check_choice, fail
from rayflow.config.evaluation import EvalConfig
from rayflow.config.model import ModelConfig, TeacherConfig
from rayflow.config.training import DistillConfig, ResourcesConfig, RunConfig, TrackingConfig

TASKS = ("demo", "teacher", "distill")


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
        check_choice("task", self.task, TASKS)
        self.data.validate()
        self.model.validate(self.data)
        self.teacher.validate()
        self.distill.validate()
        self.resources.validate()
        self.tracking.validate()
        self.run.validate()
        self.eval.validate(self.data)
        if self.run.eval_every_images and not self.data.scorable:
            fail("run.eval_every_images", self.run.eval_every_images, f"setting 0: samples of data.source="
                 f"{self.data.source} captions cannot be scored (caption consistency needs data.source=shapes)")
        if self.data.batch_size % self.resources.num_workers:
            fail(
                "data.batch_size",
                self.data.batch_size,
                f"using a global batch divisible by resources.num_workers={self.resources.num_workers}",
            )
        if self.distill.algorithm == "parameter_space" and self.data.batch_size // self.resources.num_workers < 2:
            fail("data.batch_size", self.data.batch_size, "using >= 2 images per worker (two batch halves)")
        if self.resources.channels_last and self.task != "teacher" and self.distill.algorithm == "parameter_space":
            fail("resources.channels_last", True, "setting resources.channels_last=false: distill.algorithm="
                 "parameter_space's teacher JVP (forward-mode AD) fails on channels_last activations")
        if self.task == "distill" and not self.teacher.checkpoint:
            fail(
                "teacher.checkpoint",
                None,
                "pointing teacher.checkpoint at a teacher state_dict (train one with task=teacher)",
            )
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        """Build and validate from a nested dict (Hydra's composed config); unknown keys are errors."""
        return build(cls, d, "").validate()

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


def build(cls, d: dict[str, Any], prefix: str):
    """The dataclass `cls` from the nested mapping `d`: keys it leaves out take the dataclass defaults, nested
    sections recursively; an unknown key is a ConfigError naming `prefix` + key and the known ones."""
    if not isinstance(d, dict):
        fail(prefix.rstrip(".") or "<root>", d, "giving a mapping of keys")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        fail(prefix + unknown[0], d[unknown[0]], f"using one of {sorted(known)} under '{prefix or '<root>'}'")
    kwargs = {}
    for name, value in d.items():
        f = known[name]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(sub):
            kwargs[name] = build(sub, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = list(value) if isinstance(value, tuple) else value
    return cls(**kwargs)
