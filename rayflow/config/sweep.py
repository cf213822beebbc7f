"""SweepConfig: a Ray Tune sweep of distillation runs and its search space over the training keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rayflow.config.errors import ConfigError, check_choice, check_positive, fail
from rayflow.config.job import JobConfig, build, with_overrides

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# Keys a sweep must not vary: they name, place or track the trials themselves.
UNSWEEPABLE = ("task", "run.name", "run.storage_path", "tracking.uri", "tracking.experiment", "teacher.checkpoint")


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
            fail("sweep.name", self.name, "choosing a non-empty name without '/'")
        if not self.space:
            fail("sweep.space", self.space, "giving at least one key, e.g. {distill.steps: {grid: [1, 2, 4, 8]}}")
        if not job.data.scorable:
            fail("data.source", job.data.source, "sweeping on data whose samples rayflow can score (class data or "
                 "data=shapes): trials are ranked by an evaluation metric, and these captions have none")
        flat = job.flat()
        for key, spec in self.space.items():
            where = f"sweep.space.{key}"
            if key not in flat:
                examples = sorted(k for k in flat if k.startswith("distill."))[:4]
                fail(where, spec, f"sweeping a training key such as {examples}")
            if key in UNSWEEPABLE:
                fail(where, spec, f"leaving {key} out of the space (sweeps set it per trial)")
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
                fail(where, spec, f"giving exactly one of {list(SEARCH_KINDS)}, e.g. {{grid: [1, 2, 4]}}")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, (list, tuple)) or not values:
                fail(where, spec, f"giving {kind} a non-empty list")
            if kind in ("uniform", "loguniform", "randint"):
                if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                    fail(where, spec, f"giving {kind} two numbers [low, high] with low < high")
                if kind == "loguniform" and values[0] <= 0:
                    fail(where, spec, "giving loguniform a low bound > 0")
            # Every value must make a valid job: fail here, not in trial 7 an hour into the sweep.
            for v in values if kind in ("grid", "choice") else values[:1]:
                try:
                    with_overrides(job, {key: v})
                except ConfigError as err:
                    raise ConfigError(f"config key '{where}' value {v!r} makes an invalid job: {err}") from None
        check_choice("sweep.mode", self.mode, ("min", "max"))
        check_choice("sweep.search", self.search, ("random",))
        check_choice("sweep.scheduler", self.scheduler, ("asha", "fifo"))
        for key in ("num_samples", "max_concurrent_trials", "grace_images", "eval_every_images"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                fail(f"sweep.{key}", value, "setting an integer >= 1")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 2:
            fail("sweep.reduction_factor", self.reduction_factor, "setting an integer >= 2")
        check_positive("sweep.trial_cpus", self.trial_cpus)
        if not self.metric.startswith("eval."):
            fail("sweep.metric", self.metric, "ranking by an evaluation metric such as eval.proxy_fd")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any], job: JobConfig) -> SweepConfig:
        return build(cls, d, "sweep.").validate(job)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

