"""Typed job configuration below the entry points: dataclasses with validation that says how to fix a value.

The dataclasses are the only home of every default. `rayflow.cli` registers them with Hydra as structured configs
(`base_job`, `base_sweep`), so the YAML in conf/ only selects and overrides; Hydra composes it into a plain dict and
`JobConfig.from_dict` turns that into these objects and validates them: types, ranges, cross-field rules, no I/O.
What needs files (teacher digests, encoder dimensions, the FID weights' hash) is filled in once on the driver by
`rayflow.resolve.resolve` before anything starts. Nothing below the entry points sees Hydra or OmegaConf.

Modules, each importing only from those before it: errors (ConfigError, the checks), data, model (student and
teacher), training (distill, resources, tracking, run), evaluation, job (JobConfig), sweep.
"""

from rayflow.config.data import SOURCES, TEXT_ENCODERS, DataConfig
from rayflow.config.errors import ConfigError, invalid
from rayflow.config.evaluation import (
    EVAL_MODELS,
    EVAL_SAMPLERS,
    FID_INCEPTION_SHA256,
    FID_INCEPTION_URL,
    EvalConfig,
    EvalTarget,
)
from rayflow.config.job import TASKS, JobConfig, set_dotted, with_overrides
from rayflow.config.model import TEACHER_ADAPTERS, TEACHER_SCHEDULES, ModelConfig, TeacherConfig
from rayflow.config.sweep import SEARCH_KINDS, UNSWEEPABLE, SweepConfig
from rayflow.config.training import (
    ALGORITHMS,
    PRECISIONS,
    PRECONDITIONS,
    DistillConfig,
    ResourcesConfig,
    RunConfig,
    TrackingConfig,
)

__all__ = [
    "ALGORITHMS", "EVAL_MODELS", "EVAL_SAMPLERS", "FID_INCEPTION_SHA256", "FID_INCEPTION_URL", "PRECISIONS",
    "PRECONDITIONS", "SEARCH_KINDS", "SOURCES", "TASKS", "TEACHER_ADAPTERS", "TEACHER_SCHEDULES", "TEXT_ENCODERS",
    "UNSWEEPABLE", "ConfigError", "DataConfig", "DistillConfig", "EvalConfig", "EvalTarget", "JobConfig",
    "ModelConfig", "ResourcesConfig", "RunConfig", "SweepConfig", "TeacherConfig", "TrackingConfig", "invalid",
    "set_dotted", "with_overrides",
]
