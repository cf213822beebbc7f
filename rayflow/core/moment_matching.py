"""Multistep moment matching (Salimans et al., 2024): the alternating and the parameter-space variant.

Both start the student from forward-diffused data (not from noise) and compare the student's and the
teacher's conditional means E[x | z_s] at a time s on the student's sampling trajectory (method.md 4, 5).
Losses are per example (B,) and already include w(s) and the importance weight of p(s).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, jvp

from rayflow.core.diffusion import denoise, denoising_loss, diffuse, loss_weight, posterior_sample
from rayflow.core.schedule import Schedule

S_SAMPLINGS = ("uniform", "mixed")
JUMPS = ("uniform", "full")


def sample_times(
    b: int,
    steps: int,
    *,
    s_sampling: str = "uniform",
    s_min: float = 1e-3,
    jump: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """s ~ p(s), t = min(s + u / steps, 1); returns s, t and the importance weight 1 / p(s), all (b,).

    p(s): 'uniform' on (0, 1), or 'mixed': half uniform, half log-uniform on [s_min, 1], so small s (where
    w(s) is heavy) is visited often; the weight 1 / p(s) keeps the loss an estimate under uniform s.
    jump: 'uniform' (u ~ U(0, 1), the paper's choice) or 'full' (u = 1, an always-full grid interval).
    """
    if s_sampling not in S_SAMPLINGS:
        raise ValueError(f"unknown s_sampling {s_sampling!r}; choose one of {S_SAMPLINGS}")
    if jump not in JUMPS:
        raise ValueError(f"unknown jump {jump!r}; choose one of {JUMPS}")
    s = torch.rand(b, generator=generator, device=device)
    iw = torch.ones(b, device=device)
    if s_sampling == "mixed":
        log_min = math.log(s_min)
        log_uniform = torch.exp(log_min * torch.rand(b, generator=generator, device=device))
        pick = torch.rand(b, generator=generator, device=device) < 0.5
        s = torch.where(pick, log_uniform, s)
        q = torch.where(s >= s_min, 1.0 / (s * -log_min), torch.zeros_like(s))  # log-uniform density
        iw = 1.0 / (0.5 + 0.5 * q)
    u = torch.rand(b, generator=generator, device=device) if jump == "uniform" else torch.ones(b, device=device)
    t = (s + u / steps).clamp(max=1.0)
    return s, t, iw


@dataclass
class Rollout:
    """One student step from forward-diffused data: z_t -> x_tilde -> z_s (all (B, ...) or (B,))."""

    s: torch.Tensor
    t: torch.Tensor
    weight: torch.Tensor  # w(s) / p(s)
    z_t: torch.Tensor
    x_tilde: torch.Tensor  # carries the student's graph when the student ran with grad
    z_s: torch.Tensor  # drawn given stopgrad(x_tilde): never carries a graph


class _MomentMatchingBase:
    def __init__(
        self,
        schedule: Schedule,
        steps: int,
        *,
        weighting: str = "snr_plus_one",
        s_sampling: str = "uniform",
        s_min: float = 1e-3,
        jump: str = "uniform",
        forward_dtype: torch.dtype | None = None,
    ):
        """forward_dtype: autocast dtype of the network forwards only (None: full precision); outputs, their
        differences and the losses are always in the data's dtype (see `denoise`)."""
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.schedule, self.steps = schedule, int(steps)
        self.weighting, self.s_sampling, self.s_min, self.jump = weighting, s_sampling, s_min, jump
        self.forward_dtype = forward_dtype
        loss_weight(torch.zeros(1), weighting)  # validate early

    def _g(self, net, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return denoise(net, z, t, cond, dtype=self.forward_dtype)

    def rollout(
        self, student: nn.Module, x: torch.Tensor, cond: torch.Tensor | None, generator=None
    ) -> Rollout:
        """Steps 1-4 of method.md section 4: s, t; z_t from data; x_tilde = g_eta(z_t, t); z_s ~ q(. | z_t, x_tilde)."""
        s, t, iw = sample_times(
            x.shape[0], self.steps, s_sampling=self.s_sampling, s_min=self.s_min, jump=self.jump,
            generator=generator, device=x.device,
        )
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        z_t = diffuse(x, t, eps, self.schedule)  # (B, ...)
        x_tilde = self._g(student, z_t, t, cond)  # (B, ...)
        z_s = posterior_sample(z_t, x_tilde.detach(), s, t, self.schedule, generator=generator)
        weight = loss_weight(self.schedule.logsnr(s), self.weighting) * iw  # (B,)
        return Rollout(s=s, t=t, weight=weight, z_t=z_t, x_tilde=x_tilde, z_s=z_s)


def _sqnorm(a: torch.Tensor) -> torch.Tensor:
    return a.pow(2).flatten(1).mean(1)  # (B,) mean over dimensions: scale-free in resolution


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).mean(1)  # (B,)


class AlternatingMomentMatching(_MomentMatchingBase):
    """Algorithm 1: an aux denoiser tracks E_student[x_tilde | z_s]; the student moves it onto the teacher's.

    `aux_teacher_weight` scales the aux loss's stabilising teacher term (1 in the paper; 0 drops it).
    """

    def __init__(self, schedule: Schedule, steps: int, *, aux_teacher_weight: float = 1.0, **kw):
        super().__init__(schedule, steps, **kw)
        self.aux_teacher_weight = float(aux_teacher_weight)

    def aux_loss(self, r: Rollout, aux: nn.Module, teacher: nn.Module, cond: torch.Tensor | None) -> torch.Tensor:
        """L_phi = w(s) (||sg(x_tilde) - g_phi(z_s)||^2 + c ||sg(g_theta(z_s)) - g_phi(z_s)||^2), (B,), c = 1."""
        x_aux = self._g(aux, r.z_s, r.s, cond)
        loss = _sqnorm(r.x_tilde.detach() - x_aux)
        if self.aux_teacher_weight:
            with torch.no_grad():
                x_teacher = self._g(teacher, r.z_s, r.s, cond)
            loss = loss + self.aux_teacher_weight * _sqnorm(x_teacher - x_aux)
        return r.weight * loss

    def student_loss(
        self, r: Rollout, aux: nn.Module, teacher: nn.Module, cond: torch.Tensor | None
    ) -> torch.Tensor:
        """L_eta = w(s) <x_tilde, sg(g_phi(z_s) - g_theta(z_s))>, (B,); gradient w (g_phi - g_theta)^T dx_tilde/deta."""
        with torch.no_grad():
            direction = self._g(aux, r.z_s, r.s, cond) - self._g(teacher, r.z_s, r.s, cond)
        return r.weight * _inner(r.x_tilde, direction)


class ParameterSpaceMomentMatching(_MomentMatchingBase):
    """Algorithm 2: push the teacher's loss gradient, measured on student samples, to zero. No aux network.

    L(eta) = G^T Lambda G with G = E[grad_theta w ||x_tilde - g_theta(z_s)||^2]; unbiased with two halves:
    nu = -Lambda G_A from half A, u = J_theta(z_s_B) nu by forward-mode JVP, loss w <x_tilde_B, sg(u)>.
    `precond` maps teacher parameter names to Lambda's diagonal (`adam_preconditioner`, `gradient_preconditioner`;
    `rekey` moves one onto a wrapped teacher); None = identity. `grad_reduce` averages G_A over data-parallel
    workers (`all_reduce_mean`), so nu comes from the global half-batch, as with one worker.
    """

    def __init__(
        self,
        schedule: Schedule,
        steps: int,
        *,
        precond: dict[str, torch.Tensor] | None = None,
        grad_reduce: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        **kw,
    ):
        super().__init__(schedule, steps, **kw)
        self.precond, self.grad_reduce = precond, grad_reduce

    def teacher_gradient(self, r: Rollout, teacher: nn.Module, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """G = grad_theta mean w(s) ||x_tilde - g_theta(z_s, s)||^2 on a rollout (student held fixed)."""
        grads = _loss_gradient(
            teacher, lambda g: (r.weight * _sqnorm(r.x_tilde.detach() - g(r.z_s, r.s, cond))).mean(),
            self.forward_dtype,
        )
        return self.grad_reduce(grads) if self.grad_reduce is not None else grads

    def direction(self, grad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """nu = -Lambda G."""
        if self.precond is None:
            return {k: -g for k, g in grad.items()}
        missing = sorted(set(grad) - set(self.precond))
        if missing:
            raise KeyError(f"the preconditioner has no entry for teacher parameters {missing[:3]} (of {len(missing)}); "
                           "build it for this teacher module, or move it onto a wrapped teacher with `rekey`")
        return {k: -self.precond[k].to(g) * g for k, g in grad.items()}

    def teacher_jvp(
        self, teacher: nn.Module, nu: dict[str, torch.Tensor], z_s: torch.Tensor, s: torch.Tensor, cond
    ) -> torch.Tensor:
        """u = J_theta g_theta(z_s, s) nu, the change of the teacher's output along nu in parameter space.

        Always in full precision: autocast does not compose with torch.func's forward-mode transform (a
        convolution inside `jvp` under autocast gets a bf16 weight and a float32 input and fails; pytorch/functorch
        issue 305), so `forward_dtype` applies to the rollouts and the teacher gradient, not to this pass."""
        primals = {k: v.detach() for k, v in teacher.named_parameters()}
        tangents = {k: nu[k].to(v) for k, v in primals.items()}

        def f(p):
            return denoise(lambda *a: functional_call(teacher, p, a), z_s, s, cond)

        _, u = jvp(f, (primals,), (tangents,))
        return u  # (B, ...)

    def student_loss(
        self,
        student: nn.Module,
        teacher: nn.Module,
        x: torch.Tensor,
        cond: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-example loss on half B, (B - B // 2,); its gradient is an unbiased estimate of grad L(eta) / 4."""
        h = x.shape[0] // 2
        if h < 1:
            raise ValueError("parameter-space moment matching needs a batch of at least 2 (two halves)")
        cond_a, cond_b = (None, None) if cond is None else (cond[:h], cond[h:])
        with torch.no_grad():
            r_a = self.rollout(student, x[:h], cond_a, generator)
        r_b = self.rollout(student, x[h:], cond_b, generator)
        return self.halves_loss(r_a, r_b, teacher, cond_a, cond_b)

    def halves_loss(
        self, r_a: Rollout, r_b: Rollout, teacher: nn.Module, cond_a: torch.Tensor | None, cond_b: torch.Tensor | None
    ) -> torch.Tensor:
        """w <x_tilde_B, sg(J_theta(z_s_B) nu)> with nu = -Lambda G_A (G_A reduced over workers), (B_half,)."""
        nu = self.direction(self.teacher_gradient(r_a, teacher, cond_a))
        u = self.teacher_jvp(teacher, nu, r_b.z_s, r_b.s, cond_b).detach()
        return r_b.weight * _inner(r_b.x_tilde, u)


def adam_preconditioner(
    optimizer_state: dict, param_names: list[str], *, eps: float = 1e-8
) -> dict[str, torch.Tensor]:
    """Lambda = 1 / (sqrt(v) + eps) from a torch Adam state_dict of the teacher (param order = names order)."""
    state = optimizer_state["state"]
    order = [i for g in optimizer_state["param_groups"] for i in g["params"]]
    if len(order) != len(param_names):
        raise ValueError(
            f"teacher optimizer state has {len(order)} parameters but the teacher has {len(param_names)}; "
            "pass the optimizer state saved with this teacher, or use the identity preconditioner"
        )
    out = {}
    for idx, name in zip(order, param_names):
        if idx not in state or "exp_avg_sq" not in state[idx]:
            raise ValueError(f"teacher optimizer state has no second moment for {name!r}")
        out[name] = 1.0 / (state[idx]["exp_avg_sq"].sqrt() + eps)
    return out


def _loss_gradient(
    teacher: nn.Module, loss_fn: Callable, forward_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """grad_theta loss_fn(g_theta) by parameter name, for a frozen teacher; loss_fn gets g(z, t, cond)."""
    params = {k: v.detach().requires_grad_(True) for k, v in teacher.named_parameters()}

    def g(z, t, cond):
        return denoise(lambda *a: functional_call(teacher, params, a), z, t, cond, dtype=forward_dtype)

    grads = torch.autograd.grad(loss_fn(g), list(params.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if gr is None else gr for (k, v), gr in zip(params.items(), grads)}


def all_reduce_mean(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average a gradient dict over the default process group (one flat all-reduce); identity without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads.values()])  # (P,)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, i = {}, 0
    for k, g in grads.items():
        out[k] = flat[i : i + g.numel()].view_as(g)
        i += g.numel()
    return out


def gradient_preconditioner(
    teacher: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    schedule: Schedule,
    *,
    weighting: str = "snr_plus_one",
    eps: float = 1e-8,
    generator: torch.Generator | None = None,
    grad_reduce: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Lambda = 1 / (sqrt(v) + eps) for any teacher, with v the mean over `batches` of the squared gradient of the
    teacher's own loss on real data: what Adam's second moment estimates, for a teacher whose optimizer state is
    gone. `grad_reduce` (e.g. `all_reduce_mean`) averages v over workers."""
    v: dict[str, torch.Tensor] | None = None
    n = 0
    for x, cond in batches:
        grads = _loss_gradient(
            teacher,
            lambda g, x=x, cond=cond: denoising_loss(g, x, cond, schedule, weighting=weighting,
                                                     generator=generator).mean(),
        )
        sq = {k: gr.pow(2) for k, gr in grads.items()}
        v = sq if v is None else {k: v[k] + sq[k] for k in v}
        n += 1
    if v is None:
        raise ValueError("gradient_preconditioner needs at least one batch of real data")
    v = {k: t / n for k, t in v.items()}
    if grad_reduce is not None:
        v = grad_reduce(v)
    return {k: 1.0 / (t.sqrt() + eps) for k, t in v.items()}


def rekey(precond: dict[str, torch.Tensor], source: nn.Module, target: nn.Module) -> dict[str, torch.Tensor]:
    """Move a preconditioner keyed by `source`'s parameter names onto `target`, a module that holds the same
    parameter tensors under other names (a guided teacher wraps its network: 'denoiser.' + name)."""
    by_id = {id(p): name for name, p in source.named_parameters()}
    out = {}
    for name, p in target.named_parameters():
        if id(p) not in by_id or by_id[id(p)] not in precond:
            raise KeyError(f"teacher parameter {name!r} has no preconditioner entry; FIX THIS by building the "
                           "preconditioner from the network this teacher wraps")
        out[name] = precond[by_id[id(p)]]
    return out
