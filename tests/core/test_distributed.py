"""Parameter-space moment matching under data parallelism: 2 workers equal 1 worker at the same global batch.

Two real processes on a gloo process group (no Ray): nu must come from the all-reduced global half-batch A, and
the DDP-averaged student gradient then equals the single-worker gradient on the concatenated batch.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayflow.core.diffusion import Denoiser
from rayflow.core.moment_matching import ParameterSpaceMomentMatching, Rollout, all_reduce_mean
from rayflow.core.schedule import CosineSchedule
from rayflow.core.steps import clone_trainable, freeze
from rayflow.nets import build_net

SCH = CosineSchedule()
H = 4  # examples per half per worker


def _nets():
    torch.manual_seed(0)
    teacher = freeze(Denoiser(build_net("mlp", dim=3, width=16, depth=2), SCH, "v").double())
    torch.manual_seed(1)
    student = clone_trainable(Denoiser(build_net("mlp", dim=3, width=16, depth=2), SCH, "v").double())
    return teacher, student


def _halves(n):
    """Fixed rollout inputs for n examples: s, t, weight, z_t, z_s, x_a (half A's student sample)."""
    g = torch.Generator().manual_seed(7)
    s = torch.rand(2, n, generator=g, dtype=torch.float64) * 0.5
    t = s + 0.3
    w = 1.0 + torch.rand(2, n, generator=g, dtype=torch.float64)
    z_t, z_s, x_a = (torch.randn(2, n, 3, generator=g, dtype=torch.float64) for _ in range(3))
    return s, t, w, z_t, z_s, x_a


def _loss_and_nu(mm, teacher, student, idx):
    s, t, w, z_t, z_s, x_a = _halves(2 * H)
    r_a = Rollout(s=s[0, idx], t=t[0, idx], weight=w[0, idx], z_t=z_t[0, idx], x_tilde=x_a[0, idx], z_s=z_s[0, idx])
    x_b = student(z_t[1, idx], t[1, idx], None)
    r_b = Rollout(s=s[1, idx], t=t[1, idx], weight=w[1, idx], z_t=z_t[1, idx], x_tilde=x_b, z_s=z_s[1, idx])
    nu = mm.direction(mm.teacher_gradient(r_a, teacher, None))
    return mm.halves_loss(r_a, r_b, teacher, None, None).mean(), nu


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        teacher, student = _nets()
        mm = ParameterSpaceMomentMatching(SCH, steps=2, grad_reduce=all_reduce_mean)
        loss, nu = _loss_and_nu(mm, teacher, student, slice(rank * H, (rank + 1) * H))
        grads = torch.autograd.grad(loss, list(student.parameters()))
        grads = list(all_reduce_mean(dict(enumerate(grads))).values())  # what DDP does to the student gradient
        torch.save({"nu": nu, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_equal_one_worker_at_the_same_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    teacher, student = _nets()
    mm = ParameterSpaceMomentMatching(SCH, steps=2)
    loss, nu = _loss_and_nu(mm, teacher, student, slice(0, 2 * H))
    ref_grads = torch.autograd.grad(loss, list(student.parameters()))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in nu.items():
            torch.testing.assert_close(got["nu"][k], v, rtol=1e-10, atol=1e-12)
        for a, b in zip(got["grads"], ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the check can fail: without the reduction, rank 0's nu is its own half-batch's, far from the global one
    _, local = _loss_and_nu(mm, teacher, student, slice(0, H))
    assert not all(torch.allclose(local[k], v) for k, v in nu.items())
