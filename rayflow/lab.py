"""Single-process runs of the core on in-memory low-dimensional data (Gaussian mixtures).

The GMM benchmark and the tests use these loops; the cluster path (Ray Train workers) runs the same core
steps (`rayflow.core.steps`) on streamed images instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rayflow.core.diffusion import Denoiser
from rayflow.core.moment_matching import adam_preconditioner
from rayflow.core.schedule import Schedule
from rayflow.core.steps import EMA, TeacherStep, WarmupDecay, build_distillation, freeze, make_adam
from rayflow.nets import build_net


@dataclass
class TeacherResult:
    denoiser: nn.Module  # the EMA of the trained teacher, frozen
    optimizer_state: dict  # for the parameter-space preconditioner
    param_names: list[str]


@dataclass
class Selection:
    """Best-checkpoint selection for `distill`: score the student's EMA by `proxy` (lower is better) every `every`
    updates and after the last one, and keep a copy of the best-scoring weights.

    Why: the k-step student's quality is not monotone in its updates (benchmarks/README.md, the knob study), so the
    last weights need not be the best ones. The proxy must draw any randomness from its own generators (distill's
    stream is the training's) and must not change the module it scores. One Selection per distillation: it records
    `curve` [(update, proxy)], the `selected_update` and its copy of the weights (`best`, the EMA module).
    """

    proxy: Callable[[nn.Module], float]
    every: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    selected_update: int | None = None
    best: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Selection.every={self.every} must be an integer >= 1")

    def observe(self, update: int, total: int, student: nn.Module) -> None:
        """After `update` of `total` updates (counted from 1): score `student` if due, keep a copy if best so far."""
        if update % self.every and update != total:
            return
        with torch.no_grad():
            value = float(self.proxy(student))
        self.curve.append((update, value))
        best = math.inf if self.selected_update is None else dict(self.curve)[self.selected_update]
        if self.best is None or value < best or math.isnan(best):  # a NaN proxy never beats a number
            self.best, self.selected_update = copy.deepcopy(student), update


def _batches(data: torch.Tensor, cond: torch.Tensor | None, batch: int, generator: torch.Generator, device=None):
    """Endless random batches (x, cond) on device; cond rows follow their images (None: unconditional)."""
    while True:
        i = torch.randint(0, data.shape[0], (batch,), generator=generator)
        yield data[i].to(device), None if cond is None else cond[i].to(device)


def _noise_generator(g: torch.Generator, seed: int, device) -> torch.Generator:
    # The step draws its noise where the batch lives; on the CPU it shares the batch generator (as it always has).
    return g if torch.device(device).type == "cpu" else torch.Generator(device=device).manual_seed(seed)


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
    denoiser: Denoiser | None = None,
    cond: torch.Tensor | None = None,
    cond_drop_prob: float = 0.0,
    null_cond: int | None = None,
    device: torch.device | str = "cpu",
) -> TeacherResult:
    """Train a teacher on `data` (N, ...) with the denoising loss; Adam(0.9, 0.99), cosine decay, EMA.

    The network is an MLP (width, depth) unless `denoiser` is given (e.g. a conditional UNet); `cond` (N, ...)
    conditions each example, dropped to `null_cond` with probability cond_drop_prob (classifier-free guidance).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    den = denoiser or Denoiser(build_net("mlp", dim=data.shape[1], width=width, depth=depth), schedule, prediction)
    den = den.to(device)
    opt = make_adam(den.parameters(), lr, betas=(0.9, 0.99), eps=1e-8)
    sched = WarmupDecay(opt, "cosine", steps, warmup=100)
    ema = EMA(den, ema_decay)
    step = TeacherStep(den, opt, schedule, weighting=weighting, cond_drop_prob=cond_drop_prob, null_cond=null_cond,
                       ema=ema)
    gd = _noise_generator(g, seed, device)
    for i, (x, c) in zip(range(steps), _batches(data.float(), cond, batch, g, device)):
        step(i, x, c, gd)
        sched.step()
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
    lr_schedule: str = "cosine",
    warmup: int = 0,
    aux_teacher_weight: float = 1.0,
    aux_per_student: int = 1,
    seed: int = 0,
    cond: torch.Tensor | None = None,
    guided_teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    select: Selection | None = None,
) -> nn.Module:
    """Distil a `student_steps`-step student from the teacher; returns the student's EMA, frozen (with `select`:
    the EMA weights with the best proxy seen, see `Selection`; the training itself is the same).

    algorithm: 'alternating' (`aux_per_student` aux updates then a student update, lr_aux = lr_ratio * lr_student)
    or 'parameter_space'.
    `train_steps` counts optimizer updates of any network; the learning rates follow `lr_schedule` ('cosine',
    'linear' or 'constant') after `warmup` updates. `cond` (N, ...)
    conditions each example; `guided_teacher` (the teacher under classifier-free guidance) replaces the teacher in
    the moment-matching targets, while student and aux start from the unguided teacher's weights.
    """
    torch.manual_seed(seed + 1)
    g = torch.Generator().manual_seed(seed + 1)
    precond = None
    if algorithm == "parameter_space" and precondition:
        precond = adam_preconditioner(teacher.optimizer_state, teacher.param_names)
    dist = build_distillation(
        teacher.denoiser, guided_teacher or teacher.denoiser, schedule, algorithm=algorithm, steps=student_steps,
        total_updates=train_steps, lr_schedule=lr_schedule, warmup=warmup, lr_student=lr_student, lr_ratio=lr_ratio,
        weighting=weighting, s_sampling=s_sampling, grad_clip=grad_clip, ema_decay=ema_decay,
        aux_teacher_weight=aux_teacher_weight, aux_per_student=aux_per_student, precond=precond,
    )
    gd = _noise_generator(g, seed + 1, device)
    for i, (x, c) in zip(range(train_steps), _batches(data.float(), cond, batch, g, device)):
        dist.step(i, x, c, gd)
        for sched in dist.schedulers.values():
            sched.step()
        if select is not None:
            select.observe(i + 1, train_steps, dist.ema.module)
    return freeze(dist.ema.module if select is None else select.best)
