"""Moment-matching losses and steps: gradients against their closed forms."""

import copy

import pytest
import torch
from torch.func import functional_call

from rayflow.core.diffusion import Denoiser, diffuse
from rayflow.core.moment_matching import (
    AlternatingMomentMatching,
    ParameterSpaceMomentMatching,
    adam_preconditioner,
    sample_times,
)
from rayflow.core.schedule import CosineSchedule
from rayflow.core.steps import EMA, AlternatingStep, ParameterSpaceStep, clone_trainable, freeze, make_adam
from rayflow.nets import build_net

SCH = CosineSchedule()


def _denoiser(seed=0, dim=3, num_classes=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Denoiser(build_net("mlp", dim=dim, width=32, depth=2, num_classes=num_classes), SCH, "v").to(dtype)


def test_sample_times_ranges_and_importance_weights():
    g = torch.Generator().manual_seed(0)
    s, t, iw = sample_times(200_000, 4, generator=g)
    assert (t >= s).all() and (t <= 1).all() and (t - s <= 0.25 + 1e-6).all()
    assert torch.all(iw == 1)
    s, t, iw = sample_times(400_000, 4, s_sampling="mixed", s_min=1e-3, generator=g)
    # E_p[f(s) / p(s)] = integral of f over (0, 1): check with f(s) = s^2 (= 1/3) and f = 1
    assert (iw * s**2).mean().item() == pytest.approx(1 / 3, rel=1e-2)
    assert iw.mean().item() == pytest.approx(1.0, rel=1e-2)
    # small s is visited often: P(s < 0.01) = 0.5 * 0.01 + 0.5 * log(10) / log(1000) = 0.1717
    assert (s < 0.01).float().mean().item() == pytest.approx(0.1717, abs=0.005)
    _, t_full, _ = sample_times(1000, 4, jump="full", generator=g)
    assert t_full.min().item() >= 0.25 - 1e-6
    with pytest.raises(ValueError, match="s_sampling"):
        sample_times(2, 4, s_sampling="beta")


def test_student_gradient_vanishes_when_aux_and_teacher_agree():
    teacher = freeze(_denoiser(0))
    student, aux = clone_trainable(teacher), clone_trainable(teacher)
    mm = AlternatingMomentMatching(SCH, steps=4)
    x = torch.randn(64, 3)
    r = mm.rollout(student, x, None, torch.Generator().manual_seed(0))
    mm.student_loss(r, aux, teacher, None).mean().backward()
    assert all(p.grad is not None and p.grad.abs().max().item() == 0.0 for p in student.parameters())


def test_student_gradient_is_weighted_moment_difference_through_the_student():
    teacher = freeze(_denoiser(0, dtype=torch.float64))
    student, aux = (
        clone_trainable(_denoiser(1, dtype=torch.float64)),
        clone_trainable(_denoiser(2, dtype=torch.float64)),
    )
    mm = AlternatingMomentMatching(SCH, steps=2, weighting="snr_plus_one", s_sampling="mixed")
    x = torch.randn(16, 3, dtype=torch.float64)
    r = mm.rollout(student, x, None, torch.Generator().manual_seed(0))
    loss = mm.student_loss(r, aux, teacher, None).mean()
    grads = torch.autograd.grad(loss, list(student.parameters()))
    # closed form: mean_b w_b (g_phi - g_theta)_b^T d x_tilde_b / d eta / dim, as a vector-Jacobian product
    with torch.no_grad():
        diff = aux(r.z_s, r.s, None) - teacher(r.z_s, r.s, None)
    v = r.weight[:, None] * diff / (x.shape[0] * x.shape[1])
    x_tilde = student(r.z_t, r.t, None)
    ref = torch.autograd.grad(x_tilde, list(student.parameters()), grad_outputs=v)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_z_s_carries_no_gradient_and_aux_loss_targets():
    teacher = freeze(_denoiser(0))
    student, aux = clone_trainable(_denoiser(1)), clone_trainable(_denoiser(2))
    mm = AlternatingMomentMatching(SCH, steps=2)
    r = mm.rollout(student, torch.randn(8, 3), None)
    assert r.x_tilde.requires_grad and not r.z_s.requires_grad
    loss = mm.aux_loss(r, aux, teacher, None)
    assert loss.shape == (8,)
    loss.mean().backward()
    assert all(p.grad is None for p in student.parameters())  # aux loss never reaches the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in aux.parameters())
    # aux loss value: w (||x_tilde - g_phi||^2 + ||g_theta - g_phi||^2) / dim
    with torch.no_grad():
        a = aux(r.z_s, r.s, None)
        ref = r.weight * ((r.x_tilde - a).pow(2).mean(1) + (teacher(r.z_s, r.s, None) - a).pow(2).mean(1))
    torch.testing.assert_close(loss.detach(), ref)


def test_alternating_step_alternates_and_updates_ema():
    teacher = freeze(_denoiser(0))
    student, aux = clone_trainable(teacher), clone_trainable(_denoiser(3))
    ema = EMA(student, decay=0.5)
    step = AlternatingStep(
        AlternatingMomentMatching(SCH, steps=2),
        teacher,
        student,
        aux,
        make_adam(student.parameters(), 1e-3),
        make_adam(aux.parameters(), 1e-3),
        ema=ema,
    )
    s0, a0 = copy.deepcopy(student.state_dict()), copy.deepcopy(aux.state_dict())
    m0 = step(0, torch.randn(32, 3), None)
    assert set(m0) == {"loss/aux", "grad_norm/aux"}
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in s0.items())
    assert any(not torch.equal(v, aux.state_dict()[k]) for k, v in a0.items())
    a1 = copy.deepcopy(aux.state_dict())
    m1 = step(1, torch.randn(32, 3), None)
    assert set(m1) == {"loss/student", "grad_norm/student"}
    assert all(torch.equal(v, aux.state_dict()[k]) for k, v in a1.items())
    changed = [k for k, v in s0.items() if not torch.equal(v, student.state_dict()[k])]
    assert changed
    # EMA with decay 0.5 after one update: halfway between the initial and the new weights
    k = changed[0]
    torch.testing.assert_close(ema.module.state_dict()[k], 0.5 * (s0[k] + student.state_dict()[k]))


def test_parameter_space_jvp_equals_finite_difference():
    teacher = freeze(_denoiser(0, dtype=torch.float64))
    mm = ParameterSpaceMomentMatching(SCH, steps=2)
    g = torch.Generator().manual_seed(0)
    z, s = torch.randn(8, 3, dtype=torch.float64, generator=g), torch.rand(8, dtype=torch.float64, generator=g)
    params = {k: v.detach() for k, v in teacher.named_parameters()}
    nu = {k: torch.randn(v.shape, dtype=torch.float64, generator=g) for k, v in params.items()}
    u = mm.teacher_jvp(teacher, nu, z, s, None)
    h = 1e-6
    plus = functional_call(teacher, {k: v + h * nu[k] for k, v in params.items()}, (z, s, None))
    minus = functional_call(teacher, {k: v - h * nu[k] for k, v in params.items()}, (z, s, None))
    torch.testing.assert_close(u, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("use_precond", [False, True])
def test_parameter_space_gradient_equals_gradient_of_g_a_lambda_g_b(use_precond):
    # grad_eta of the surrogate = -1/2 d/deta [ -nu^T G_B(eta) ]... i.e. +1/2 d/deta [ G_A^T Lambda G_B(eta) ],
    # where G_B(eta) is the teacher-loss gradient on half B with z_s held fixed (double backprop reference).
    teacher = freeze(_denoiser(0, dtype=torch.float64))
    student = clone_trainable(_denoiser(1, dtype=torch.float64))
    names = [k for k, _ in teacher.named_parameters()]
    precond = None
    if use_precond:
        precond = {k: torch.rand(v.shape, dtype=torch.float64) + 0.5 for k, v in teacher.named_parameters()}
    mm = ParameterSpaceMomentMatching(SCH, steps=2, precond=precond, s_sampling="mixed")
    x = torch.randn(12, 3, dtype=torch.float64)
    loss = mm.student_loss(student, teacher, x, None, torch.Generator().manual_seed(5)).mean()
    grads = torch.autograd.grad(loss, list(student.parameters()))

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        r_a = mm.rollout(student, x[:6], None, g)
    g_a = mm.teacher_gradient(r_a, teacher, None)
    r_b = mm.rollout(student, x[6:], None, g)
    params = {k: v.detach().requires_grad_(True) for k, v in teacher.named_parameters()}
    x_hat = functional_call(teacher, params, (r_b.z_s, r_b.s, None))
    lb = (r_b.weight * (r_b.x_tilde - x_hat).pow(2).mean(1)).mean()
    g_b = torch.autograd.grad(lb, list(params.values()), create_graph=True)
    lam = precond or {k: torch.ones_like(v) for k, v in params.items()}
    quad = sum((g_a[k] * lam[k] * gb).sum() for k, gb in zip(names, g_b))
    ref = torch.autograd.grad(0.5 * quad, list(student.parameters()))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_adam_preconditioner_reads_second_moments_in_parameter_order():
    teacher = _denoiser(0)
    opt = make_adam(teacher.parameters(), 1e-3, betas=(0.9, 0.999))
    x = torch.randn(16, 3)
    teacher(diffuse(x, torch.rand(16), torch.randn(16, 3), SCH), torch.rand(16)).pow(2).mean().backward()
    opt.step()
    names = [k for k, _ in teacher.named_parameters()]
    pre = adam_preconditioner(opt.state_dict(), names, eps=1e-8)
    for k, p in teacher.named_parameters():
        torch.testing.assert_close(pre[k], 1.0 / (opt.state[p]["exp_avg_sq"].sqrt() + 1e-8))
    with pytest.raises(ValueError, match="identity preconditioner"):
        adam_preconditioner(opt.state_dict(), names[:-1])


def test_parameter_space_step_moves_only_the_student():
    teacher = freeze(_denoiser(0))
    student = clone_trainable(teacher)
    t0 = copy.deepcopy(teacher.state_dict())
    step = ParameterSpaceStep(
        ParameterSpaceMomentMatching(SCH, steps=2), teacher, student, make_adam(student.parameters(), 1e-3)
    )
    s0 = copy.deepcopy(student.state_dict())
    m = step(0, torch.randn(32, 3), None)
    assert set(m) == {"loss/student", "grad_norm/student"}
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in s0.items())
    assert all(p.grad is None for p in teacher.parameters())


def _unet_denoiser(seed=0, dropout=0.3):
    torch.manual_seed(seed)
    net = build_net("unet", in_channels=1, channels=8, channel_mult=(1, 2), attn_levels=(), num_classes=3,
                    dropout=dropout)
    return Denoiser(net, SCH, "v")


def test_student_gradient_is_exactly_zero_at_init_for_a_teacher_with_dropout():
    # aux = student = teacher at initialisation: g_phi - g_theta = 0, so the student gradient must be exactly 0.
    # With dropout active in the clones (independent masks) it was ~1e-2.
    teacher = freeze(_unet_denoiser(dropout=0.3))
    student, aux = clone_trainable(teacher), clone_trainable(teacher)
    assert not student.training and not aux.training and all(p.requires_grad for p in student.parameters())
    mm = AlternatingMomentMatching(SCH, steps=4)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    r = mm.rollout(student, x, y, torch.Generator().manual_seed(0))
    mm.student_loss(r, aux, teacher, y).mean().backward()
    assert all(p.grad is not None and p.grad.abs().max().item() == 0.0 for p in student.parameters())
    # and the student trains on the outputs it samples with
    torch.testing.assert_close(r.x_tilde, student(r.z_t, r.t, y), rtol=0, atol=0)


def _record_matmul_dtypes(module):
    seen = []
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_bf16_forward_keeps_differences_losses_and_updates_in_float32():
    teacher = freeze(_denoiser(0))
    student, aux = clone_trainable(teacher), clone_trainable(_denoiser(3))
    seen = _record_matmul_dtypes(aux)
    mm = AlternatingMomentMatching(SCH, steps=2, forward_dtype=torch.bfloat16)
    ema = EMA(student, decay=0.5)
    opt_s, opt_a = make_adam(student.parameters(), 1e-3), make_adam(aux.parameters(), 1e-3)
    step = AlternatingStep(mm, teacher, student, aux, opt_s, opt_a, ema=ema)
    x = torch.randn(32, 3)
    step(0, x, None, torch.Generator().manual_seed(0))
    step(1, x, None, torch.Generator().manual_seed(1))
    assert seen and set(seen) == {torch.bfloat16}  # the network forward ran in bf16 ...
    r = mm.rollout(student, x, None, torch.Generator().manual_seed(2))
    assert r.x_tilde.dtype == torch.float32  # ... its output, the losses and their reductions in fp32
    loss = mm.student_loss(r, aux, teacher, None)
    assert loss.dtype == torch.float32 and mm.aux_loss(r, aux, teacher, None).dtype == torch.float32
    # the direction is the float32 difference of the two forwards (not a bf16-rounded difference)
    with torch.no_grad():
        a = mm._g(aux, r.z_s, r.s, None)
        t = mm._g(teacher, r.z_s, r.s, None)
    torch.testing.assert_close(loss.detach(), r.weight * (r.x_tilde.detach() * (a - t)).mean(1), rtol=0, atol=0)
    for opt in (opt_s, opt_a):
        for st in opt.state.values():
            assert st["exp_avg_sq"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    assert all(p.grad.dtype == torch.float32 for p in student.parameters() if p.grad is not None)


def test_bf16_forward_runs_the_parameter_space_gradient_and_jvp():
    teacher = freeze(_denoiser(0))
    student = clone_trainable(teacher)
    mm = ParameterSpaceMomentMatching(SCH, steps=2, forward_dtype=torch.bfloat16)
    loss = mm.student_loss(student, teacher, torch.randn(16, 3), None, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    ref = ParameterSpaceMomentMatching(SCH, steps=2).student_loss(
        student, teacher, torch.randn(16, 3), None, torch.Generator().manual_seed(0))
    assert loss.shape == ref.shape


def test_bf16_forward_runs_the_parameter_space_step_through_a_unet():
    """Convolutions: autocast inside torch.func.jvp failed (bf16 weight, float32 input); the JVP runs in float32
    and equals the full-precision one, while the rollouts still run their forwards in bf16."""
    torch.manual_seed(0)
    net = build_net("unet", in_channels=1, channels=8, channel_mult=[1, 2], attn_levels=[1], num_classes=10)
    teacher = freeze(Denoiser(net, SCH, "v"))
    student = clone_trainable(teacher)
    x, cond = torch.randn(4, 1, 8, 8), torch.arange(4)
    mm = ParameterSpaceMomentMatching(SCH, steps=2, forward_dtype=torch.bfloat16)
    seen = []
    for m in student.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    loss = mm.student_loss(student, teacher, x, cond, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and set(seen) == {torch.bfloat16}
    nu = {k: torch.randn_like(v) for k, v in teacher.named_parameters()}
    z, s = torch.randn(4, 1, 8, 8), torch.rand(4)
    full = ParameterSpaceMomentMatching(SCH, steps=2)
    torch.testing.assert_close(mm.teacher_jvp(teacher, nu, z, s, cond), full.teacher_jvp(teacher, nu, z, s, cond),
                               rtol=0, atol=0)


def test_gradient_preconditioner_is_inverse_root_mean_squared_teacher_loss_gradient():
    from rayflow.core.diffusion import denoising_loss
    from rayflow.core.moment_matching import gradient_preconditioner

    teacher = freeze(_denoiser(0, dtype=torch.float64))
    batches = [(torch.randn(16, 3, dtype=torch.float64), None) for _ in range(3)]
    pre = gradient_preconditioner(teacher, batches, SCH, weighting="snr_plus_one", eps=1e-8,
                                  generator=torch.Generator().manual_seed(0))
    # reference: plain autograd on a trainable copy, same noise draws
    ref_net = copy.deepcopy(teacher).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    sq = {k: torch.zeros_like(v) for k, v in ref_net.named_parameters()}
    for x, _ in batches:
        ref_net.zero_grad()
        denoising_loss(ref_net, x, None, SCH, weighting="snr_plus_one", generator=g).mean().backward()
        for k, p in ref_net.named_parameters():
            sq[k] += p.grad.pow(2) / len(batches)
    for k, v in sq.items():
        torch.testing.assert_close(pre[k], 1.0 / (v.sqrt() + 1e-8))
    with pytest.raises(ValueError, match="at least one batch"):
        gradient_preconditioner(teacher, [], SCH)


def test_preconditioner_rekeyed_onto_a_guided_teacher():
    from rayflow.core.diffusion import GuidedDenoiser
    from rayflow.core.moment_matching import rekey

    base = freeze(_denoiser(0, num_classes=3))
    guided = GuidedDenoiser(base, 2.0, null_cond=3)
    pre = {k: torch.rand_like(v) for k, v in base.named_parameters()}
    moved = rekey(pre, base, guided)
    assert set(moved) == {k for k, _ in guided.named_parameters()}
    assert all(torch.equal(moved[f"denoiser.{k}"], v) for k, v in pre.items())
    mm = ParameterSpaceMomentMatching(SCH, steps=2, precond=pre)
    with pytest.raises(KeyError, match="rekey"):  # the old crash, now a message that says what to do
        mm.student_loss(clone_trainable(base), guided, torch.randn(8, 3), torch.randint(0, 3, (8,)))
    mm.precond = moved
    mm.student_loss(clone_trainable(base), guided, torch.randn(8, 3), torch.randint(0, 3, (8,)))
    with pytest.raises(KeyError, match="no preconditioner entry"):
        rekey(pre, _denoiser(1, num_classes=3), guided)


def test_learning_rate_schedules_warm_up_then_decay_to_zero():
    from rayflow.core.steps import scheduled_lr

    assert scheduled_lr("linear", 1.0, 0, 100, warmup=10) == pytest.approx(0.1)
    assert scheduled_lr("linear", 1.0, 10, 100, warmup=10) == pytest.approx(1.0)
    assert scheduled_lr("linear", 1.0, 55, 100, warmup=10) == pytest.approx(0.5)
    assert scheduled_lr("linear", 1.0, 100, 100, warmup=10) == 0.0
    assert scheduled_lr("cosine", 2.0, 50, 100) == pytest.approx(1.0)
    assert scheduled_lr("constant", 2.0, 99, 100, warmup=10) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        scheduled_lr("step", 1.0, 0, 10)


def test_aux_teacher_term_weight():
    teacher = freeze(_denoiser(0))
    student, aux = clone_trainable(_denoiser(1)), clone_trainable(_denoiser(2))
    r = AlternatingMomentMatching(SCH, steps=2).rollout(student, torch.randn(8, 3), None)
    with torch.no_grad():
        a, t = aux(r.z_s, r.s, None), teacher(r.z_s, r.s, None)
        first, second = (r.x_tilde - a).pow(2).mean(1), (t - a).pow(2).mean(1)
    for c in (0.0, 0.5, 1.0):
        got = AlternatingMomentMatching(SCH, steps=2, aux_teacher_weight=c).aux_loss(r, aux, teacher, None)
        torch.testing.assert_close(got.detach(), r.weight * (first + c * second))


def _count_calls(module, counts, name):
    module.register_forward_pre_hook(lambda *_: counts.__setitem__(f"{name}.forward", counts[f"{name}.forward"] + 1))
    module.register_full_backward_hook(
        lambda *_: counts.__setitem__(f"{name}.backward", counts[f"{name}.backward"] + 1))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_each_update_makes_no_redundant_network_passes():
    """The cost per update, counted: an aux update is student (no grad) + teacher + aux forward, aux backward; a
    student update is student forward/backward + aux + teacher forward (method.md 4). A teacher step is one
    forward and one backward, so alternating costs ~5/3 teacher steps per update at most."""
    from collections import Counter

    teacher = freeze(_denoiser(0))
    student, aux = clone_trainable(teacher), clone_trainable(_denoiser(3))
    counts = Counter()
    for net, name in ((teacher, "teacher"), (student, "student"), (aux, "aux")):
        _count_calls(net, counts, name)
    step = AlternatingStep(AlternatingMomentMatching(SCH, steps=2), teacher, student, aux,
                           make_adam(student.parameters(), 1e-3), make_adam(aux.parameters(), 1e-3))
    step(0, torch.randn(16, 3), None)
    assert counts == {"student.forward": 1, "teacher.forward": 1, "aux.forward": 1, "aux.backward": 1}
    counts.clear()
    step(1, torch.randn(16, 3), None)
    assert counts == {"student.forward": 1, "student.backward": 1, "teacher.forward": 1, "aux.forward": 1}


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_decay_is_a_torch_scheduler_that_follows_the_closed_form_and_seeks(kind):
    from rayflow.core.steps import WarmupDecay, scheduled_lr

    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([{"params": [w], "lr": 1.0}, {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5}])
    sched = WarmupDecay(opt, kind, 20, warmup=5)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])  # the rate update i runs at
        opt.step()
        sched.step()
    assert seen == [[scheduled_lr(kind, b, i, 20, warmup=5) for b in (1.0, 0.5)] for i in range(20)]
    fresh = WarmupDecay(torch.optim.SGD([w], lr=1.0), kind, 20, warmup=5)
    fresh.seek(13)  # a resumed run: the rate of update 13 without replaying 13 steps
    assert fresh.optimizer.param_groups[0]["lr"] == seen[13][0] == fresh.get_last_lr()[0]
    with pytest.raises(ValueError, match="schedule"):
        WarmupDecay(opt, "step", 20)


@pytest.mark.parametrize("aux_per_student", [1, 2, 3])
def test_alternation_runs_aux_per_student_aux_updates_then_one_student_update(aux_per_student):
    teacher = freeze(_denoiser(0))
    student, aux = clone_trainable(teacher), clone_trainable(_denoiser(3))
    step = AlternatingStep(AlternatingMomentMatching(SCH, steps=2), teacher, student, aux,
                           make_adam(student.parameters(), 1e-2), make_adam(aux.parameters(), 1e-2),
                           aux_per_student=aux_per_student)
    moved = []
    for n in range(2 * (aux_per_student + 1)):
        before = [p.clone() for p in (*student.parameters(), *aux.parameters())]
        metrics = step(n, torch.randn(16, 3), None)
        after = list((*student.parameters(), *aux.parameters()))
        n_student = len(list(student.parameters()))
        student_moved = any(not torch.equal(a, b) for a, b in zip(before[:n_student], after[:n_student]))
        aux_moved = any(not torch.equal(a, b) for a, b in zip(before[n_student:], after[n_student:]))
        assert student_moved != aux_moved and (("loss/aux" in metrics) == aux_moved)
        moved.append("aux" if aux_moved else "student")
    assert moved == (["aux"] * aux_per_student + ["student"]) * 2
    with pytest.raises(ValueError, match="aux_per_student"):
        AlternatingStep(step.method, teacher, student, aux, step.opt_student, step.opt_aux, aux_per_student=0)
