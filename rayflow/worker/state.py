"""Training state of one role (teacher or distill) on a worker: models, optimizers, EMA, step, counters.

The frozen teacher is reloaded from its own file on every start and never enters a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rayflow.config import JobConfig
from rayflow.core.moment_matching import all_reduce_mean
from rayflow.core.steps import EMA, TeacherStep, WarmupDecay, build_distillation, clone_trainable, make_adam
from rayflow.models import build_denoiser, guided, load_teacher
from rayflow.teachers import freeze_unused

ROLES = ("teacher", "distill")


@dataclass
class Counters:
    updates: int = 0  # optimizer updates of any network (the alternation index n)
    images_seen: int = 0  # global images consumed
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this worker's shard consumed in the current epoch


@dataclass
class TrainState:
    role: str
    trainables: dict[str, nn.Module]  # possibly DDP-wrapped
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, WarmupDecay]  # one per optimizer; closed form in counters.updates
    ema: EMA
    step: object
    total_updates: int
    counters: Counters = field(default_factory=Counters)

    def step_schedules(self) -> None:
        """After an optimizer update: the learning rates of the next one."""
        for sched in self.schedulers.values():
            sched.step()

    @property
    def lr(self) -> float:
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "role": self.role,
            "models": {k: _unwrap(m).state_dict() for k, m in self.trainables.items()},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "ema": self.ema.state_dict(),
            "counters": vars(self.counters).copy(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["role"] != self.role:
            raise ValueError(
                f"checkpoint is for role {state['role']!r}, this run trains {self.role!r}; "
                "FIX THIS by using a different run.name"
            )
        for k, m in self.trainables.items():
            _unwrap(m).load_state_dict(state["models"][k])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        self.ema.load_state_dict(state["ema"])
        self.counters = Counters(**state["counters"])
        for sched in self.schedulers.values():
            sched.seek(self.counters.updates)
        torch.set_rng_state(state["torch_rng"])


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """`x` in the networks' memory format: channels_last for a 4-D image batch when `channels_last`, else as is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


class ChannelsLastBatches:
    """A step fed its image batches in channels_last memory format (resources.channels_last), the layout of its
    networks' weights, so that no convolution converts its input. Everything else is the wrapped step's."""

    def __init__(self, step) -> None:
        self.step = step

    def __call__(self, n: int, x: torch.Tensor, cond, generator=None) -> dict[str, float]:
        return self.step(n, in_layout(x, True), cond, generator)


def _network_layout(module: nn.Module, job: JobConfig) -> nn.Module:
    """The network in resources.channels_last's memory format (in place). Applied before student, aux and the EMA
    are copied from it, so that they inherit it, and before DDP wraps it."""
    return module.to(memory_format=torch.channels_last) if job.resources.channels_last else module


def _batch_layout(step, job: JobConfig):
    """The step, fed batches in resources.channels_last's memory format."""
    return ChannelsLastBatches(step) if job.resources.channels_last else step


def _trainable_copy(base: nn.Module, job: JobConfig) -> nn.Module:
    """A student or aux: the adapted teacher, trainable; parameters a foreign network leaves unused stay frozen."""
    module = clone_trainable(base)
    if job.teacher.adapter != "native":
        freeze_unused(module, job.data)
    return module


def build_state(
    job: JobConfig, role: str, device: torch.device, wrap=lambda m: m, *, precond: dict | None = None
) -> TrainState:
    """Build the role's networks on `device`; `wrap` is DDP preparation (ray.train.torch.prepare_model);
    `precond` the parameter-space preconditioner keyed by the teacher network's parameter names."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
    updates = lambda images: max(1, images // job.data.batch_size)  # noqa: E731
    forward_dtype = job.resources.forward_dtype(torch.device(device).type)
    if role == "teacher":
        if job.teacher.adapter != "native":
            raise ValueError(
                f"task=teacher trains rayflow's own UNet, but teacher.adapter={job.teacher.adapter!r}. FIX THIS by "
                "distilling your teacher (task=distill) or training with teacher.adapter=native"
            )
        den = wrap(_network_layout(build_denoiser(job.model, job.data).to(device), job))
        t = job.teacher
        opt = make_adam(den.parameters(), t.lr, betas=(0.9, 0.99), eps=1e-8)
        total = updates(t.train_images)
        sched = WarmupDecay(opt, "cosine", total, warmup=min(500, total // 10))
        ema = EMA(den, t.ema_decay)
        step = TeacherStep(
            den,
            opt,
            _unwrap(den).schedule,
            weighting=t.weighting,
            cond_drop_prob=t.cond_drop_prob,
            null_cond=job.data.null_condition,
            ema=ema,
            forward_dtype=forward_dtype,
        )
        return TrainState(role, {"teacher": den}, {"teacher": opt}, {"teacher": sched}, ema,
                          _batch_layout(step, job), total)
    d = job.distill
    # the teacher through its adapter; student and aux are clones of it (same architecture, weights, adapter)
    base = _network_layout(load_teacher(
        job.teacher.checkpoint, job.model, job.data, sha256=job.teacher.sha256, device=device, teacher=job.teacher
    ), job)
    if d.algorithm == "parameter_space" and precond is None and d.precondition != "identity":
        raise ValueError(
            f"distill.precondition={d.precondition!r} but the worker got no preconditioner; FIX THIS by launching "
            "through rayflow.orchestrate (it computes one), or setting distill.precondition=identity"
        )
    total = updates(d.train_images)
    dist = build_distillation(
        base, guided(base, job.teacher.guidance_scale, job.data), base.schedule, algorithm=d.algorithm, steps=d.steps,
        total_updates=total, lr_student=d.lr_student, lr_ratio=d.lr_ratio, lr_schedule=d.lr_decay,
        warmup=d.warmup_images // job.data.batch_size,
        betas=(d.beta1, d.beta2),
        adam_eps=d.adam_eps, weighting=d.weighting, s_sampling=d.s_sampling, jump=d.jump, grad_clip=d.grad_clip,
        ema_decay=d.ema_decay, aux_per_student=d.aux_per_student, forward_dtype=forward_dtype, precond=precond,
        grad_reduce=all_reduce_mean,
        make_trainable=lambda m: _trainable_copy(m, job), wrap=wrap,
    )
    return TrainState(role, dist.trainables, dist.optimizers, dist.schedulers, dist.ema,
                      _batch_layout(dist.step, job), total)
