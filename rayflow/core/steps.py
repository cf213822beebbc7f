"""Optimisers, EMA and the training steps that own the update schedule (plain torch, no Ray).

The even/odd alternation of moment matching lives here, in the step, not in the losses. Steps run outside any
autocast: only network forwards may run in low precision (the methods' `forward_dtype`), so the backward's
accumulation, clipping, the optimizer and the EMA are in the parameters' float32.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from rayflow.core.diffusion import denoising_loss
from rayflow.core.moment_matching import AlternatingMomentMatching, ParameterSpaceMomentMatching, rekey
from rayflow.core.schedule import Schedule


def make_adam(
    params: Iterable[torch.Tensor], lr: float, *, betas=(0.0, 0.99), eps: float = 1e-12, weight_decay: float = 0.0
) -> torch.optim.Adam:
    """Adam with the paper's moment-matching defaults beta1 = 0, beta2 = 0.99, eps = 1e-12."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def cosine_lr(base: float, i: int, total: int, *, warmup: int = 0) -> float:
    """Linear warm-up over `warmup` updates, then cosine decay from `base` to 0 at update `total`."""
    if warmup and i < warmup:
        return base * (i + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * min(i, total) / max(total, 1)))


def linear_lr(base: float, i: int, total: int, *, warmup: int = 0) -> float:
    """Linear warm-up over `warmup` updates, then linear decay from `base` to 0 at update `total`."""
    if warmup and i < warmup:
        return base * (i + 1) / warmup
    return base * max(0.0, 1.0 - (min(i, total) - warmup) / max(total - warmup, 1))


LR_SCHEDULES = ("cosine", "linear", "constant")


def scheduled_lr(kind: str, base: float, i: int, total: int, *, warmup: int = 0) -> float:
    """The learning rate of update i under `kind` ('cosine', 'linear' or 'constant', each after a warm-up)."""
    if kind == "cosine":
        return cosine_lr(base, i, total, warmup=warmup)
    if kind == "linear":
        return linear_lr(base, i, total, warmup=warmup)
    if kind == "constant":
        return base * (i + 1) / warmup if warmup and i < warmup else base
    raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {LR_SCHEDULES}")


class WarmupDecay(torch.optim.lr_scheduler.LRScheduler):
    """A torch LRScheduler: `scheduled_lr(kind, base, i, total, warmup)` for update i, per parameter group.

    Construction sets update 0's rate; call `step()` after each optimizer update. The rate is a closed form of the
    update index, so a resumed run only needs `seek(updates)` (no scheduler state in checkpoints).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, total: int, *, warmup: int = 0):
        if kind not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {LR_SCHEDULES}")
        self.kind, self.total, self.warmup = kind, int(total), int(warmup)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        i, total, warmup = self.last_epoch, self.total, self.warmup
        return [scheduled_lr(self.kind, base, i, total, warmup=warmup) for base in self.base_lrs]

    def step(self) -> None:  # type: ignore[override]
        """To the next update's rates. Steps every update of an alternation, also those that leave this optimizer
        alone (torch's base class would warn that the optimizer has not stepped)."""
        self.seek(self.last_epoch + 1)

    def seek(self, update: int) -> None:
        """Set the rates of update `update` (after a resume)."""
        self.last_epoch = int(update)
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def clone_trainable(module: nn.Module) -> nn.Module:
    """A trainable copy (student or aux initialised from the teacher): same architecture and weights.

    It stays in eval mode (dropout off): moment matching compares student, aux and teacher outputs on the same
    z_s, and with independent dropout masks the student gradient is not 0 when aux = teacher, and the student
    would train on outputs that differ from those it samples with.
    """
    clone = copy.deepcopy(module)
    clone.requires_grad_(True)
    clone.eval()
    return clone


def freeze(module: nn.Module) -> nn.Module:
    """The teacher: eval mode, no gradients for its parameters."""
    module.requires_grad_(False)
    module.eval()
    return module


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must lie in [0, 1)")
        self.decay = float(decay)
        self.module = copy.deepcopy(_unwrap(module)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        src = _unwrap(module)
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in src.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), src.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.module.load_state_dict(state["module"])


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def _update(loss: torch.Tensor, params: list[torch.Tensor], opt: torch.optim.Optimizer, clip: float | None):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
    opt.step()
    return norm


class TeacherStep:
    """One denoising-loss update of a teacher (with condition dropout for classifier-free guidance)."""

    def __init__(
        self,
        denoiser: nn.Module,
        opt: torch.optim.Optimizer,
        schedule: Schedule,
        *,
        weighting: str = "snr_plus_one",
        cond_drop_prob: float = 0.0,
        null_cond: int | None = None,
        grad_clip: float | None = 1.0,
        ema: EMA | None = None,
        forward_dtype: torch.dtype | None = None,
    ):
        self.denoiser, self.opt, self.schedule, self.ema = denoiser, opt, schedule, ema
        self.weighting, self.cond_drop_prob, self.null_cond, self.grad_clip = (
            weighting, cond_drop_prob, null_cond, grad_clip,
        )
        self.forward_dtype = forward_dtype
        self.params = [p for p in denoiser.parameters() if p.requires_grad]

    def __call__(self, n: int, x: torch.Tensor, cond: torch.Tensor | None, generator=None) -> dict[str, float]:
        loss = denoising_loss(
            self.denoiser, x, cond, self.schedule, weighting=self.weighting,
            cond_drop_prob=self.cond_drop_prob, null_cond=self.null_cond, generator=generator,
            forward_dtype=self.forward_dtype,
        ).mean()
        norm = _update(loss, self.params, self.opt, self.grad_clip)
        if self.ema is not None:
            self.ema.update(self.denoiser)
        return {"loss/teacher": loss.item(), "grad_norm/teacher": norm.item()}


class AlternatingStep:
    """The alternation of method.md 4, step 6: `aux_per_student` aux updates, then one student update; the default
    1 is the paper's strict 1:1 (even n the aux, odd n the student)."""

    def __init__(
        self,
        method: AlternatingMomentMatching,
        teacher: nn.Module,
        student: nn.Module,
        aux: nn.Module,
        opt_student: torch.optim.Optimizer,
        opt_aux: torch.optim.Optimizer,
        *,
        grad_clip: float | None = 1.0,
        ema: EMA | None = None,
        aux_per_student: int = 1,
    ):
        if not isinstance(aux_per_student, int) or aux_per_student < 1:
            raise ValueError(f"aux_per_student={aux_per_student} must be an integer >= 1")
        self.method, self.teacher, self.student, self.aux = method, teacher, student, aux
        self.opt_student, self.opt_aux, self.grad_clip, self.ema = opt_student, opt_aux, grad_clip, ema
        self.aux_per_student = aux_per_student
        self.student_params = [p for p in student.parameters() if p.requires_grad]
        self.aux_params = [p for p in aux.parameters() if p.requires_grad]

    def updates_aux(self, n: int) -> bool:
        """Whether update n moves the aux (else the student)."""
        return n % (self.aux_per_student + 1) < self.aux_per_student

    def __call__(self, n: int, x: torch.Tensor, cond: torch.Tensor | None, generator=None) -> dict[str, float]:
        if self.updates_aux(n):
            with torch.no_grad():
                r = self.method.rollout(self.student, x, cond, generator)
            loss = self.method.aux_loss(r, self.aux, self.teacher, cond).mean()
            norm = _update(loss, self.aux_params, self.opt_aux, self.grad_clip)
            return {"loss/aux": loss.item(), "grad_norm/aux": norm.item()}
        r = self.method.rollout(self.student, x, cond, generator)
        loss = self.method.student_loss(r, self.aux, self.teacher, cond).mean()
        norm = _update(loss, self.student_params, self.opt_student, self.grad_clip)
        if self.ema is not None:
            self.ema.update(self.student)
        return {"loss/student": loss.item(), "grad_norm/student": norm.item()}


class ParameterSpaceStep:
    """Every n updates the student with the parameter-space moment-matching loss (no aux network)."""

    def __init__(
        self,
        method: ParameterSpaceMomentMatching,
        teacher: nn.Module,
        student: nn.Module,
        opt_student: torch.optim.Optimizer,
        *,
        grad_clip: float | None = 1.0,
        ema: EMA | None = None,
    ):
        self.method, self.teacher, self.student = method, teacher, student
        self.opt_student, self.grad_clip, self.ema = opt_student, grad_clip, ema
        self.student_params = [p for p in student.parameters() if p.requires_grad]

    def __call__(self, n: int, x: torch.Tensor, cond: torch.Tensor | None, generator=None) -> dict[str, float]:
        loss = self.method.student_loss(self.student, self.teacher, x, cond, generator).mean()
        norm = _update(loss, self.student_params, self.opt_student, self.grad_clip)
        if self.ema is not None:
            self.ema.update(self.student)
        return {"loss/student": loss.item(), "grad_norm/student": norm.item()}


ALGORITHMS = ("alternating", "parameter_space")


@dataclass
class Distillation:
    """What a distillation trains (student, and aux for the alternating algorithm), each optimizer and its
    learning-rate schedule, the student's EMA, and the step that schedules the updates."""

    trainables: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, WarmupDecay]
    ema: EMA
    step: AlternatingStep | ParameterSpaceStep


def build_distillation(
    base: nn.Module,
    teacher: nn.Module,
    schedule: Schedule,
    *,
    algorithm: str = "alternating",
    steps: int = 8,
    total_updates: int,
    lr_student: float = 1e-4,
    lr_ratio: float = 1.0,
    lr_schedule: str = "cosine",
    warmup: int = 0,
    betas: tuple[float, float] = (0.0, 0.99),
    adam_eps: float = 1e-12,
    weighting: str = "snr_plus_one",
    s_sampling: str = "uniform",
    jump: str = "uniform",
    grad_clip: float | None = 1.0,
    ema_decay: float = 0.999,
    aux_teacher_weight: float = 1.0,
    aux_per_student: int = 1,
    forward_dtype: torch.dtype | None = None,
    precond: dict[str, torch.Tensor] | None = None,
    grad_reduce=None,
    make_trainable: Callable[[nn.Module], nn.Module] = clone_trainable,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
) -> Distillation:
    """The one place that wires a distillation (the Ray worker and `rayflow.lab` both call it).

    `base` is the teacher network that student and aux start from; `teacher` the denoiser the moments are matched
    to (`base` itself, or `base` under classifier-free guidance). lr_aux = lr_student * lr_ratio; both follow
    `lr_schedule` after `warmup` over `total_updates` optimizer updates (of any network). `precond` is
    keyed by `base`'s parameter names (moved onto `teacher` here); `grad_reduce` averages the parameter-space G_A
    over workers; `make_trainable` copies `base` (e.g. freezing parameters a foreign network never uses); `wrap`
    prepares a trainable for data parallelism (DDP).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")

    def schedules(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, WarmupDecay]:
        return {k: WarmupDecay(opt, lr_schedule, total_updates, warmup=warmup) for k, opt in optimizers.items()}

    student = wrap(make_trainable(base))
    ema = EMA(student, ema_decay)
    opt_s = make_adam(student.parameters(), lr_student, betas=betas, eps=adam_eps)
    kw = dict(weighting=weighting, s_sampling=s_sampling, jump=jump, forward_dtype=forward_dtype)
    if algorithm == "alternating":
        aux = wrap(make_trainable(base))
        lr_aux = lr_student * lr_ratio
        opt_a = make_adam(aux.parameters(), lr_aux, betas=betas, eps=adam_eps)
        method = AlternatingMomentMatching(schedule, steps, aux_teacher_weight=aux_teacher_weight, **kw)
        step = AlternatingStep(method, teacher, student, aux, opt_s, opt_a, grad_clip=grad_clip, ema=ema,
                               aux_per_student=aux_per_student)
        optimizers = {"student": opt_s, "aux": opt_a}
        return Distillation({"student": student, "aux": aux}, optimizers, schedules(optimizers), ema, step)
    if precond is not None:
        device = next(teacher.parameters()).device
        precond = rekey({k: v.to(device) for k, v in precond.items()}, base, teacher)
    method = ParameterSpaceMomentMatching(schedule, steps, precond=precond, grad_reduce=grad_reduce, **kw)
    step = ParameterSpaceStep(method, teacher, student, opt_s, grad_clip=grad_clip, ema=ema)
    return Distillation({"student": student}, {"student": opt_s}, schedules({"student": opt_s}), ema, step)
