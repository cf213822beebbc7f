from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rayflow.evaluation.metrics import (
    features_and_logits,
    image_metrics,
    knn_radii,
    precision_recall,
    real_reference,
)


def _blur(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # (N, C, H, W)


def _noise(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def real_vs_real(mnist, trained) -> dict[str, float]:
    return image_metrics(trained.model, mnist.test_x, mnist.test_y, mnist.train_x, mnist.train_y)


def test_fd_real_halves_far_below_noise_and_blur(mnist, trained, real_vs_real):
    blurred = image_metrics(trained.model, _blur(mnist.test_x), None, mnist.train_x, mnist.train_y)
    noise = image_metrics(trained.model, _noise(1000), None, mnist.train_x, mnist.train_y)
    assert real_vs_real["fd"] >= 0
    # Measured: real ~0.8, 3x3 box blur ~80, uniform noise ~360.
    assert 10 * real_vs_real["fd"] < blurred["fd"] < noise["fd"]


def test_precision_recall_of_real_sets_high_and_of_noise_zero(mnist, trained, real_vs_real):
    feats, _ = features_and_logits(trained.model, mnist.test_x)
    assert precision_recall(feats, feats) == (1.0, 1.0)  # every point lies in its own k-NN ball
    assert real_vs_real["precision"] > 0.8 and real_vs_real["recall"] > 0.8
    noise = image_metrics(trained.model, _noise(500), None, mnist.train_x, mnist.train_y)
    assert noise["precision"] < 0.05 and noise["recall"] < 0.05


def test_mode_collapse_keeps_precision_and_loses_recall(mnist, trained):
    threes = mnist.test_x[mnist.test_y == 3]
    m = image_metrics(trained.model, threes, None, mnist.train_x, mnist.train_y)
    # One class of ten: recall near 0.1 ideally; the k-NN balls of ~100 points overestimate it (~0.3).
    assert m["precision"] > 0.8 and m["recall"] < 0.5


def test_accuracy_of_true_and_shuffled_labels(mnist, trained, real_vs_real):
    assert real_vs_real["accuracy"] > 0.9
    assert real_vs_real["real_accuracy"] >= real_vs_real["accuracy"] - 0.05
    shuffled = mnist.test_y[torch.randperm(1000, generator=torch.Generator().manual_seed(2))]
    m = image_metrics(trained.model, mnist.test_x, shuffled, mnist.train_x, mnist.train_y)
    assert 0.03 < m["accuracy"] < 0.2


def test_unconditional_samples_have_no_accuracy(mnist, trained):
    m = image_metrics(trained.model, mnist.test_x[:100], None, mnist.train_x, None)
    assert set(m) == {"fd", "precision", "recall"}


def test_real_reference_is_cached_per_weights_and_set(mnist, trained):
    a = real_reference(trained.model, mnist.train_x, mnist.train_y)
    assert real_reference(trained.model, mnist.train_x.clone(), mnist.train_y) is a  # by content, not identity
    assert real_reference(trained.model, mnist.train_x[:3000], mnist.train_y[:3000]) is not a
    clone = type(trained.model)(1, 10, 32)
    clone.load_state_dict(trained.model.state_dict())
    with torch.no_grad():
        clone.head.bias += 1.0  # changed weights must not hit the cache of the original
    b = real_reference(clone, mnist.train_x, mnist.train_y)
    assert b is not a and real_reference(clone, mnist.train_x, mnist.train_y) is b


def test_knn_radii_exclude_the_point_itself():
    pts = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    torch.testing.assert_close(knn_radii(pts, k=1), torch.tensor([1.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(knn_radii(pts, k=3), torch.tensor([6.0, 5.0, 3.0, 6.0]))
    with pytest.raises(ValueError, match="FIX THIS"):
        knn_radii(pts, k=4)


def test_wrong_shape_says_how_to_fix(mnist, trained):
    with pytest.raises(ValueError, match="resolution and channels"):
        image_metrics(trained.model, torch.zeros(10, 3, 32, 32), None, mnist.train_x, None)
    with pytest.raises(ValueError, match="sample labels"):
        image_metrics(trained.model, mnist.test_x[:10], mnist.test_y[:9], mnist.train_x, None)
