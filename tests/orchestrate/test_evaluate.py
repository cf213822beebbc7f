"""Evaluation's cached classifier (what every FD, precision and recall is measured with)."""

from __future__ import annotations

from rayflow.orchestrate.evaluate import MIN_REAL, classifier_and_real
from tests.orchestrate.test_generate import tiny_job


def test_the_cached_classifier_does_not_depend_on_which_evaluation_trained_it(ray_cluster, tmp_path):
    """The cache is keyed by the data set only: the demo's 1,000-sample evaluation and a 5,000-sample one on a fresh
    machine must train the same classifier, or the same command reports different FDs depending on history."""
    job = tiny_job(data={"source": "mnist", "resolution": 8})
    _, small_sha, small_x, _ = classifier_and_real(job, str(tmp_path / "a"), 100)
    _, large_sha, large_x, large_y = classifier_and_real(job, str(tmp_path / "b"), 3000)
    assert len(small_x) == MIN_REAL and len(large_x) == len(large_y) == 3000  # the real reference follows n
    assert large_sha == small_sha
