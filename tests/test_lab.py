"""End to end on a 2-D mixture: a k-step student distilled for a few hundred steps moves towards the truth."""

import pytest
import torch

from rayflow import lab
from rayflow.core.gaussian_mixture import GaussianMixture
from rayflow.core.metrics import mixture_metrics
from rayflow.core.samplers import sample
from rayflow.core.schedule import CosineSchedule

SPEC = {
    "weights": [0.5, 0.3, 0.2],
    "means": [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]],
    "stds": [[0.1, 0.3], [0.3, 0.1], [0.15, 0.15]],
}


@pytest.fixture(scope="module")
def setting():
    torch.set_num_threads(1)
    gm = GaussianMixture.from_spec(SPEC)
    sch = CosineSchedule()
    data, _ = gm.sample(20_000, generator=torch.Generator().manual_seed(0))
    teacher = lab.fit_teacher(data, sch, width=64, depth=2, steps=1500, batch=256, lr=2e-3)
    return gm, sch, data, teacher


def _score(gm, sch, den, k, name):
    x = sample(name, den, (4000, 2), k, sch, generator=torch.Generator().manual_seed(1))
    ref, _ = gm.sample(4000, generator=torch.Generator().manual_seed(2))
    return mixture_metrics(gm, x.double(), ref)


@pytest.mark.parametrize("algorithm", ["alternating", "parameter_space"])
def test_two_step_student_moves_towards_the_truth(setting, algorithm):
    gm, sch, data, teacher = setting
    before = _score(gm, sch, teacher.denoiser, 2, "ancestral")  # the student starts as the teacher
    student = lab.distill(teacher, data, sch, algorithm=algorithm, student_steps=2, train_steps=400, batch=256,
                          lr_student=3e-4, ema_decay=0.98)
    after = _score(gm, sch, student, 2, "student")
    # a 2-step sampler of the teacher smears mass between the modes: low likelihood under the truth
    assert after["loglik"] > before["loglik"] + 0.5, (before, after)
    assert after["sw2"] < before["sw2"], (before, after)


def test_parameter_space_with_a_guided_teacher_uses_the_preconditioner_of_the_wrapped_network():
    # used to raise KeyError('denoiser.net.inp.weight'): Lambda was keyed by the unguided network's names
    from rayflow.core.diffusion import GuidedDenoiser

    torch.manual_seed(0)
    gm = GaussianMixture.from_spec(SPEC)
    sch = CosineSchedule()
    data, labels = gm.sample(2_000, generator=torch.Generator().manual_seed(0))
    from rayflow.core.diffusion import Denoiser
    from rayflow.nets import build_net

    den = Denoiser(build_net("mlp", dim=2, width=32, depth=2, num_classes=4), sch, "v")
    teacher = lab.fit_teacher(data, sch, denoiser=den, cond=labels, cond_drop_prob=0.2, null_cond=3, steps=20,
                              batch=64)
    guided = GuidedDenoiser(teacher.denoiser, 1.5, null_cond=3)
    student = lab.distill(teacher, data, sch, algorithm="parameter_space", student_steps=2, train_steps=4, batch=64,
                          cond=labels, guided_teacher=guided)
    assert all(torch.isfinite(p).all() for p in student.parameters())
