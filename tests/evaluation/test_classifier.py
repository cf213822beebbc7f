from __future__ import annotations

import hashlib
import os

import pytest
import torch

from rayflow.evaluation import classifier as classifier_mod
from rayflow.evaluation.classifier import FEATURE_DIM, FeatureClassifier, load_or_train_classifier, train_classifier


def test_heldout_accuracy_above_90_percent(mnist, trained):
    with torch.no_grad():
        pred = trained.model(mnist.test_x).argmax(1)
    accuracy = (pred == mnist.test_y).double().mean().item()
    assert accuracy > 0.90, f"held-out accuracy {accuracy:.3f}"


def test_features_are_128d_and_batch_independent(mnist, trained):
    with torch.no_grad():
        one_by_one = torch.cat([trained.model.features(x[None]) for x in mnist.test_x[:8]])
        batched = trained.model.features(mnist.test_x[:8])
    assert batched.shape == (8, FEATURE_DIM)
    torch.testing.assert_close(one_by_one, batched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("res", [8, 28, 32, 64])
def test_architecture_handles_resolutions(res):
    model = FeatureClassifier(3, 7, res).eval()
    x = torch.zeros(2, 3, res, res)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, FEATURE_DIM)


def test_cache_hit_loads_without_training(mnist, trained, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("cached classifier should have been loaded, not retrained")

    monkeypatch.setattr(classifier_mod, "train_classifier", no_training)
    model, sha = load_or_train_classifier(trained.cache_dir, trained.key, mnist.train_x, mnist.train_y)
    path = os.path.join(trained.cache_dir, f"classifier-{trained.key}.pt")
    assert sha == trained.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert os.listdir(trained.cache_dir) == [os.path.basename(path)]  # no temp files left behind
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(mnist.test_x[:16]), trained.model(mnist.test_x[:16]))


def test_cache_that_does_not_fit_says_how_to_fix(mnist, trained):
    rgb = mnist.train_x[:8].expand(-1, 3, -1, -1)
    with pytest.raises(RuntimeError, match="FIX THIS by deleting the file or using another key"):
        load_or_train_classifier(trained.cache_dir, trained.key, rgb, mnist.train_y[:8])


def test_training_is_seeded_and_leaves_global_rng_alone(mnist):
    x, y = mnist.train_x[:256], mnist.train_y[:256]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_classifier(x, y, epochs=1, seed=5)
    after = torch.rand(1)
    b = train_classifier(x, y, epochs=1, seed=5)
    assert torch.equal(before, after)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_bad_inputs_say_how_to_fix(mnist):
    with pytest.raises(ValueError, match="x / 127.5 - 1"):
        train_classifier(mnist.train_x[:8] * 255, mnist.train_y[:8])
    with pytest.raises(ValueError, match="one int label per image"):
        train_classifier(mnist.train_x[:8], mnist.train_y[:7])
    with pytest.raises(ValueError, match="channel-first"):
        train_classifier(mnist.train_x[:8].permute(0, 2, 3, 1), mnist.train_y[:8])
