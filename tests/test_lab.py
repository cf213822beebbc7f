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


# ----- best-checkpoint selection (lab.Selection) -----


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    sch = CosineSchedule()
    data, _ = GaussianMixture.from_spec(SPEC).sample(2_000, generator=torch.Generator().manual_seed(0))
    return sch, data, lab.fit_teacher(data, sch, width=16, depth=1, steps=20, batch=64)


def _distill(tiny, train_steps: int, select=None):
    # a large lr and a short EMA: every checkpoint's weights differ from the next one's
    sch, data, teacher = tiny
    return lab.distill(teacher, data, sch, student_steps=2, train_steps=train_steps, batch=64, lr_student=1e-2,
                       ema_decay=0.5, select=select)


def _recording_proxy(values):
    """A proxy that returns values[i] at its i-th call and keeps a copy of each set of weights it scored."""
    seen = []

    def proxy(student):
        seen.append({k: v.clone() for k, v in student.state_dict().items()})
        return values[len(seen) - 1]

    return proxy, seen


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("train_steps, updates", [(10, [3, 6, 9, 10]), (9, [3, 6, 9])])
def test_selection_scores_every_n_updates_and_at_the_end(tiny, train_steps, updates):
    proxy, _ = _recording_proxy(list(range(len(updates), 0, -1)))
    select = lab.Selection(proxy, every=3)
    _distill(tiny, train_steps, select)
    assert [u for u, _ in select.curve] == updates
    assert select.selected_update == updates[-1]  # the proxy fell at every score


def test_selection_returns_the_weights_at_the_proxys_minimum_not_the_last(tiny):
    proxy, seen = _recording_proxy([3.0, 1.0, 2.0, 4.0])  # scored at updates 3, 6, 9, 10: best at 6
    select = lab.Selection(proxy, every=3)
    student = _distill(tiny, 10, select)
    assert select.selected_update == 6 and select.curve[1] == (6, 1.0)
    assert _same(student.state_dict(), seen[1])
    assert not _same(student.state_dict(), seen[-1])
    assert not any(p.requires_grad for p in student.parameters()) and not student.training  # frozen, as before


def test_selection_leaves_the_training_alone(tiny):
    # the proxy scores the student's EMA and the run without select is the run with it: its last checkpoint
    # (selected here, the proxy falls) is bit for bit what distill returns without select
    proxy, seen = _recording_proxy([4.0, 3.0, 2.0, 1.0])
    select = lab.Selection(proxy, every=3)
    selected = _distill(tiny, 10, select).state_dict()
    plain = _distill(tiny, 10).state_dict()
    assert _same(plain, selected) and _same(plain, seen[-1])


def test_selection_a_nan_proxy_never_beats_a_number():
    select = lab.Selection(lambda m: m.weight.item(), every=1)
    net = torch.nn.Linear(1, 1, bias=False)
    for update, value in enumerate([float("nan"), 2.0, float("nan"), 1.0, 3.0], start=1):
        net.weight.data.fill_(value)
        select.observe(update, 5, net)
    assert select.selected_update == 4 and select.best.weight.item() == 1.0
    with pytest.raises(ValueError, match="every"):
        lab.Selection(lambda m: 0.0, every=0)
