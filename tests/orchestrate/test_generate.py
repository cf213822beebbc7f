"""Distributed sample generation on a Ray Data actor pool: the worker count cannot change any sample."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rayflow.config import JobConfig
from rayflow.evaluation.generate import generate_samples
from rayflow.models import build_denoiser, save_state_dict
from rayflow.orchestrate.generate import draw_samples, image_shape, load_for_sampling

N, CHUNK, SEED = 11, 4, 5  # 3 chunks, the last one short


def tiny_job(**sections) -> JobConfig:
    """An 8 px digits job with a 2-level 8-channel UNet (~30k parameters)."""
    d = {"data": {"source": "digits", "resolution": 8, "batch_size": 8},
         "model": {"channels": 8, "channel_mult": [1, 2], "attn_levels": []},
         "run": {"eval_batch": CHUNK}, "eval": {"cpus_per_worker": 0.5}}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return JobConfig.from_dict(d)


def save_tiny_teacher(job: JobConfig, path) -> str:
    """Random weights, perturbed: a fresh UNet's zero-initialised output layer would make every sample a
    function of its noise alone, hiding any dependence on the network's batch."""
    torch.manual_seed(0)
    den = build_denoiser(job.model, job.data)
    with torch.no_grad():
        for p in den.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_state_dict(den.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    job = tiny_job(teacher={"guidance_scale": 0.5})
    return job, save_tiny_teacher(job, tmp_path_factory.mktemp("gen") / "teacher.pt")


@contextlib.contextmanager
def _one_thread():
    # as in the 1-CPU actors: a different thread count splits CPU reductions differently (last-bit changes)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _on_driver(job, path, model, sampler, steps, labels):
    with _one_thread():
        den = load_for_sampling(job, path, model)
        return generate_samples(den, sampler, steps, labels, image_shape(job), batch=CHUNK, seed=SEED)[0]


def test_one_and_two_workers_and_the_driver_give_identical_samples(ray_cluster, tiny):
    job, path = tiny
    labels = torch.arange(N) % 10
    one, secs = draw_samples(job, path, "student", "student", 3, labels, seed=SEED, workers=1)
    two, _ = draw_samples(job, path, "student", "student", 3, labels, seed=SEED, workers=2)
    assert one.shape == (N, 1, 8, 8) and secs > 0
    assert torch.equal(one, two)
    assert torch.equal(one, _on_driver(job, path, "student", "student", 3, labels))
    with _one_thread():
        assert torch.equal(one, draw_samples(job, path, "student", "student", 3, labels, seed=SEED, workers=0)[0])
        other_seed = draw_samples(job, path, "student", "student", 3, labels, seed=SEED + 1, workers=0)[0]
    assert not torch.equal(one, other_seed)


def test_guided_teacher_on_two_workers_matches_the_driver(ray_cluster, tiny):
    job, path = tiny
    labels = torch.tensor([7] * N)
    two, _ = draw_samples(job, path, "teacher", "ancestral", 4, labels, seed=SEED, workers=2)
    assert torch.equal(two, _on_driver(job, path, "teacher", "ancestral", 4, labels))
