"""Per-example noise: a sample depends on (seed, its index) only, never on the batch it was drawn in."""

import pytest
import torch

from rayflow.core.diffusion import standard_normal
from rayflow.core.samplers import example_generators, sample
from rayflow.core.schedule import CosineSchedule

SHAPE = (1, 3, 3)  # (C, H, W) of one example


def _denoiser(z, t, cond):
    # elementwise per example (no cross-example reduction), so any difference would come from the noise
    return torch.tanh(z) * (1 - t.view(-1, 1, 1, 1)) + 0.01 * cond.view(-1, 1, 1, 1)


def _draw(name: str, indices: list[int], batch: int, seed: int = 3) -> torch.Tensor:
    out = []
    for start in range(0, len(indices), batch):
        idx = indices[start : start + batch]
        cond = torch.tensor(idx) % 10
        out.append(sample(name, _denoiser, (len(idx), *SHAPE), 4, CosineSchedule(), cond=cond,
                          generator=example_generators(seed, idx)))
    return torch.cat(out)  # (N, C, H, W)


@pytest.mark.parametrize("name", ["ancestral", "student", "ddim"])
def test_batch_size_does_not_change_samples(name):
    indices = list(range(7))
    whole = _draw(name, indices, batch=7)
    for batch in (1, 2, 3):
        assert torch.equal(_draw(name, indices, batch), whole), batch
    # a sample drawn alone, far from its neighbours, is the same sample
    assert torch.equal(_draw(name, [5], batch=1)[0], whole[5])


def test_every_step_draws_noise_from_the_example_generator():
    a = _draw("ancestral", [0, 1], batch=2)
    b = _draw("ancestral", [0, 1], batch=2, seed=4)
    assert not torch.equal(a, b)  # the seed matters
    assert not torch.equal(a[0], a[1])  # and so does the index


def test_example_generators_depend_on_seed_and_index_only():
    first = [g.initial_seed() for g in example_generators(0, range(4))]
    assert first == [g.initial_seed() for g in example_generators(0, [0, 1, 2, 3])]
    assert len(set(first)) == 4
    assert first[1] != example_generators(1, [0])[0].initial_seed()  # (0, 1) and (1, 0) differ


def test_one_generator_keeps_the_batch_noise_of_torch_randn():
    got = standard_normal((4, 2), torch.Generator().manual_seed(0))
    assert torch.equal(got, torch.randn(4, 2, generator=torch.Generator().manual_seed(0)))


def test_wrong_number_of_generators_says_how_to_fix():
    with pytest.raises(ValueError, match="FIX THIS"):
        standard_normal((3, 2), example_generators(0, range(2)))
