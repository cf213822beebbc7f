"""Single-process runs of the core on in-memory low-dimensional data (Gaussian mixtures).

The GMM benchmark and the tests use these loops; the cluster path (Ray Train workers) runs the same core
steps (`rayflow.core.steps`) on streamed images instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayflow.core.diffusion import Denoiser
from rayflow.core.moment_matching import AlternatingMomentMatching, ParameterSpaceMomentMatching, adam_preconditioner
from rayflow.core.schedule import Schedule
from rayflow.core.steps import (
    EMA,
    AlternatingStep,
    ParameterSpaceStep,
    TeacherStep,
    clone_trainable,
    cosine_lr,
    freeze,
    make_adam,
    set_lr,
)
from rayflow.nets import build_net


@dataclass
class TeacherResult:
    denoiser: nn.Module  # the EMA of the trained teacher, frozen
    optimizer_state: dict  # for the parameter-space preconditioner
    param_names: list[str]


def _batches(data: torch.Tensor, batch: int, generator: torch.Generator):
    while True:
        yield data[torch.randint(0, data.shape[0], (batch,), generator=generator)]


def fit_teacher(
    data: torch.Tensor,
    schedule: Schedule,
    *,
    width: int = 256,
    depth: int = 4,
    steps: int = 6000,
    batch: int = 1024,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    prediction: str = "v",
    weighting: str = "snr_plus_one",
    seed: int = 0,
) -> TeacherResult:
    """Train an MLP teacher on `data` (N, D) with the denoising loss; Adam(0.9, 0.99), cosine decay, EMA."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    den = Denoiser(build_net("mlp", dim=data.shape[1], width=width, depth=depth), schedule, prediction)
    opt = make_adam(den.parameters(), lr, betas=(0.9, 0.99), eps=1e-8)
    ema = EMA(den, ema_decay)
    step = TeacherStep(den, opt, schedule, weighting=weighting, ema=ema)
    for i, x in zip(range(steps), _batches(data.float(), batch, g)):
        set_lr(opt, cosine_lr(lr, i, steps, warmup=100))
        step(i, x, None, g)
    names = [k for k, _ in den.named_parameters()]
    return TeacherResult(freeze(ema.module), opt.state_dict(), names)


def distill(
    teacher: TeacherResult,
    data: torch.Tensor,
    schedule: Schedule,
    *,
    algorithm: str = "alternating",
    student_steps: int = 8,
    train_steps: int = 4000,
    batch: int = 1024,
    lr_student: float = 1e-4,
    lr_ratio: float = 1.0,
    ema_decay: float = 0.995,
    weighting: str = "snr_plus_one",
    s_sampling: str = "mixed",
    precondition: bool = True,
    grad_clip: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """Distil a `student_steps`-step student from the teacher; returns the student's EMA, frozen.

    algorithm: 'alternating' (aux + student, 1:1, lr_aux = lr_ratio * lr_student) or 'parameter_space'.
    `train_steps` counts optimizer updates of any network; the learning rates decay on a cosine.
    """
    torch.manual_seed(seed + 1)
    g = torch.Generator().manual_seed(seed + 1)
    student = clone_trainable(teacher.denoiser)
    opt_s = make_adam(student.parameters(), lr_student)
    ema = EMA(student, ema_decay)
    kw = dict(weighting=weighting, s_sampling=s_sampling)
    if algorithm == "alternating":
        aux = clone_trainable(teacher.denoiser)
        opt_a = make_adam(aux.parameters(), lr_student * lr_ratio)
        method = AlternatingMomentMatching(schedule, student_steps, **kw)
        step = AlternatingStep(method, teacher.denoiser, student, aux, opt_s, opt_a, grad_clip=grad_clip, ema=ema)
        schedules = [(opt_s, lr_student), (opt_a, lr_student * lr_ratio)]
    elif algorithm == "parameter_space":
        precond = adam_preconditioner(teacher.optimizer_state, teacher.param_names) if precondition else None
        method = ParameterSpaceMomentMatching(schedule, student_steps, precond=precond, **kw)
        step = ParameterSpaceStep(method, teacher.denoiser, student, opt_s, grad_clip=grad_clip, ema=ema)
        schedules = [(opt_s, lr_student)]
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose 'alternating' or 'parameter_space'")
    for i, x in zip(range(train_steps), _batches(data.float(), batch, g)):
        for opt, base in schedules:
            set_lr(opt, cosine_lr(base, i, train_steps))
        step(i, x, None, g)
    return freeze(ema.module)
