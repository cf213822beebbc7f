"""FID / IS wired into the final evaluation: config keys, the up-front missing-weights error, reference
statistics from the training pipeline cached and reused (random Inception weights: nothing downloaded)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from rayflow import config as config_module
from rayflow.cli import job_from_hydra
from rayflow.config import ConfigError, JobConfig
from rayflow.core.metrics import gaussian_stats
from rayflow.evaluation import inception as inception_module
from rayflow.evaluation.fid import fid_from_stats, inception_features
from rayflow.orchestrate import evaluate as evaluate_module
from rayflow.orchestrate.evaluate import evaluate, fid_reference, real_images
from rayflow.resolve import resolve
from tests.evaluation.test_inception import _random_net
from tests.orchestrate.test_generate import save_tiny_teacher, tiny_job

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def test_config_pins_the_inception_module_hash_and_url():
    assert config_module.FID_INCEPTION_SHA256 == inception_module.FID_WEIGHTS_SHA256
    assert config_module.FID_INCEPTION_URL == inception_module.FID_WEIGHTS_URL
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        job = job_from_hydra(compose(config_name="config", overrides=["eval.workers=2", "eval.labels=[1,2]"]))
    assert job.eval.inception_sha256 == inception_module.FID_WEIGHTS_SHA256 and job.eval.inception_weights is None
    assert job.eval.workers == 2 and job.eval.labels == [1, 2] and job.flat()["eval.fid_reference_samples"] == 50000


def test_missing_weights_fail_before_anything_runs_and_say_where_to_get_them(tmp_path):
    with pytest.raises(ConfigError, match="eval.inception_weights") as e:
        resolve(JobConfig.from_dict({"eval": {"inception_weights": str(tmp_path / "pt_inception.pth")}}))
    assert "FIX THIS" in str(e.value) and inception_module.FID_WEIGHTS_URL in str(e.value)
    with pytest.raises(ConfigError, match="local disk"):
        JobConfig.from_dict({"eval": {"inception_weights": "s3://bucket/pt_inception.pth"}})


@pytest.mark.parametrize("key,value", [
    ("workers", -1), ("fid_reference_samples", 1), ("model", "aux"), ("sampler", "euler"), ("labels", [10]),
    ("inception_sha256", "xyz"), ("gpus_per_worker", -1), ("steps", 0), ("samples", 0), ("cpus_per_worker", 0),
])
def test_bad_eval_values_name_the_key_and_the_fix(key, value):
    with pytest.raises(ConfigError, match=f"eval.{key}") as e:
        JobConfig.from_dict({"eval": {key: value}})
    assert "FIX THIS" in str(e.value)


def test_command_targets_default_to_the_runs_export(tmp_path):
    job = JobConfig.from_dict({"run": {"name": "r", "storage_path": str(tmp_path), "seed": 3},
                               "distill": {"steps": 4}, "teacher": {"sample_steps": 32}})
    with pytest.raises(ConfigError, match="eval.checkpoint"):
        job.eval.target(job, "evaluate")
    export = tmp_path / "r" / "export"
    export.mkdir(parents=True)
    for name in ("student.pt", "teacher.pt"):
        (export / name).write_bytes(b"x")
    t = job.eval.target(job, "evaluate")
    assert (t.checkpoint, t.sampler, t.steps, t.seed) == (str(export / "student.pt"), "student", 4, 20)
    job.eval.model = "teacher"
    t = job.eval.target(job, "evaluate")
    assert (t.checkpoint, t.sampler, t.steps) == (str(export / "teacher.pt"), "ancestral", 32)
    with pytest.raises(ConfigError, match="eval.out"):
        job.eval.target(job, "sample")
    job.eval.out = "grid.png"
    with pytest.raises(ConfigError, match="eval.out"):
        job.eval.target(job, "sample")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[str, str]:
    path = str(tmp_path_factory.mktemp("inception") / "random-inception.pth")
    torch.save(_random_net().state_dict(), path)
    with open(path, "rb") as f:
        return path, hashlib.sha256(f.read()).hexdigest()


def test_weights_hash_is_checked_on_the_driver_and_recorded_for_workers(weights, tmp_path):
    path, sha = weights
    with pytest.raises(ConfigError, match=f"eval.inception_weights.*{sha}") as e:
        resolve(JobConfig.from_dict({"eval": {"inception_weights": path}}))  # the pinned pytorch-fid hash
    assert "FIX THIS" in str(e.value)
    copy = tmp_path / "w.pth"
    copy.write_bytes(Path(path).read_bytes())
    job = resolve(JobConfig.from_dict({"eval": {"inception_weights": str(copy), "inception_sha256": sha[:8]}}))
    assert job.eval.inception_file_sha256 == sha
    copy.unlink()  # a Train worker on another node: the recorded hash stands, no file needed to build the config
    assert JobConfig.from_dict(job.to_dict()).eval.inception_weights == str(copy)


def test_evaluate_reports_fid_and_is_against_cached_training_pipeline_stats(ray_cluster, weights, tmp_path):
    path, sha = weights
    job = tiny_job(run={"eval_samples": 4},
                   eval={"inception_weights": path, "inception_sha256": sha, "fid_reference_samples": 5, "workers": 0})
    student = save_tiny_teacher(job, tmp_path / "student.pt")
    cache = str(tmp_path / "cache")
    ev = evaluate(job, None, student, cache)
    m = ev["metrics"]
    assert m["eval.fid_reference_n"] == 5 and np.isfinite(m["eval.student.fid"]) and m["eval.student.is"] >= 1.0
    assert {"eval.student.fd", "eval.student.accuracy", "eval.student.is_std"} <= set(m)
    (npz,) = [f for f in os.listdir(cache) if f.startswith("inception-ref-")]
    assert ev["fid_reference"]["n"] == 5 and ev["fid_reference"]["meta"]["data"]["source"] == "digits"

    # the reference is the training pipeline's first 5 images, and the FID is of the returned samples
    net = evaluate_module.load_inception(job)
    real_x, _ = real_images(job, 5)
    ref = fid_reference(job, cache, net)  # from the cache: same file, same hash
    assert ref.sha256 == ev["fid_reference"]["sha256"] and os.listdir(cache).count(npz) == 1
    np.testing.assert_allclose(ref.mu, gaussian_stats(inception_features(net, real_x)[0])[0], rtol=1e-6, atol=1e-9)
    fid = fid_from_stats(*gaussian_stats(inception_features(net, ev["samples"]["student"])[0]), ref.mu, ref.sigma)
    assert m["eval.student.fid"] == pytest.approx(fid, rel=1e-6)


def test_reference_size_is_capped_by_the_data(ray_cluster, weights, monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(evaluate_module, "reference_stats", lambda cache, key, fn, model, n, **kw: seen.update(n=n))
    job = tiny_job(eval={"inception_weights": weights[0], "inception_sha256": weights[1]})
    fid_reference(job, str(tmp_path), None)
    assert seen["n"] == 1797  # sklearn's digits: fewer than eval.fid_reference_samples=50000
