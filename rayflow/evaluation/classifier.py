"""A small CNN digit classifier whose penultimate layer is the feature space of the image metrics.

No Inception weights ship offline, so FID-style metrics on the built-in data (MNIST, digits) use a
classifier trained on the real set itself: its 128-d features separate classes and notice blur and noise,
which is what a Frechet distance or a k-NN precision/recall needs of a feature space.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from rayflow.files import sha256_file

FEATURE_DIM = 128


class FeatureClassifier(nn.Module):
    """Conv layers halving the resolution down to 4x4, a 128-d feature layer, a linear class head."""

    def __init__(self, in_channels: int, num_classes: int, res: int) -> None:
        super().__init__()
        if res < 4:
            raise ValueError(f"classifier res={res} < 4; FIX THIS by evaluating images of at least 4x4 pixels")
        self.in_channels, self.num_classes, self.res = in_channels, num_classes, res
        # BatchNorm: ~97% instead of ~93% held-out MNIST accuracy within the 3-epoch budget. In eval mode
        # it is a fixed affine map, so a sample's features do not depend on the batch it comes in.
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
        ch, size = 16, res
        while size > 4:  # 32 -> 16 -> 8 -> 4; 28 -> 14 -> 7 -> 4
            out = min(2 * ch, 64)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            ch, size = out, (size + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # exactly 4x4 whatever rounding the strides did
        self.feature = nn.Linear(ch * 16, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, res, res) in [-1, 1] -> (B, 128) penultimate activations."""
        h = self.pool(self.conv(x)).flatten(1)  # (B, ch * 16)
        return F.relu(self.feature(h))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, res, res) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self.features(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 3,
    batch: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    num_classes: int | None = None,
    num_threads: int | None = 1,
) -> FeatureClassifier:
    """Train a `FeatureClassifier` on images (N, C, H, W) float32 in [-1, 1] and int labels (N,), on CPU.

    Deterministic for a seed (initialisation and batch order), without touching torch's global RNG.
    `num_threads` torch threads while training (None: leave torch's setting). Returns the model in eval mode.
    """
    images, labels = _check_data(images, labels)
    # One thread by default: these convs are too small to split well. On a busy 2-core machine 4,000
    # MNIST images x 3 epochs took 14 s of CPU with one thread and 80 s with two (threads spin-waiting).
    saved_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _train(images, labels, epochs=epochs, batch=batch, lr=lr, seed=seed, num_classes=num_classes)
    finally:
        torch.set_num_threads(saved_threads)


def _train(
    images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch: int, lr: float, seed: int,
    num_classes: int | None,
) -> FeatureClassifier:
    n, ch, h, _ = images.shape
    with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's RNG
        torch.manual_seed(seed)
        model = FeatureClassifier(ch, num_classes or int(labels.max()) + 1, h)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def _check_data(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(
            f"classifier images must be square (N, C, H, W), got {tuple(images.shape)}; FIX THIS "
            "by passing channel-first images (x.permute(0, 3, 1, 2))"
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"{labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images; "
            "FIX THIS by passing one int label per image"
        )
    if images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3:
        raise ValueError(
            f"classifier images range [{images.min():.3g}, {images.max():.3g}] is not [-1, 1]; "
            "FIX THIS by scaling uint8 pixels with x / 127.5 - 1"
        )
    return images, labels


def load_or_train_classifier(
    cache_dir: str, key: str, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0
) -> tuple[FeatureClassifier, str]:
    """The classifier cached as `<cache_dir>/classifier-<key>.pt`, trained on (images, labels) when missing.

    `key` must change whenever the real set does (e.g. "mnist-32"). Returns the model (eval mode) and the
    SHA-256 of the state_dict file, to log next to the metrics it produced.
    """
    images, labels = _check_data(images, labels)
    path = os.path.join(cache_dir, f"classifier-{key}.pt")
    num_classes = int(labels.max()) + 1
    if os.path.exists(path):
        model = FeatureClassifier(images.shape[1], num_classes, images.shape[2])
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except RuntimeError as err:
            raise RuntimeError(
                f"cached classifier {path} does not fit {images.shape[1]}-channel "
                f"{images.shape[2]}px images with {num_classes} classes; FIX THIS by "
                f"deleting the file or using another key"
            ) from err
        return model.eval(), sha256_file(path)
    model = train_classifier(images, labels, seed=seed, num_classes=num_classes)
    os.makedirs(cache_dir, exist_ok=True)
    # A unique temp name + os.replace: parallel evaluations may train the same key; readers never see
    # a half-written file and the last writer wins with an equally valid model.
    fd, tmp = tempfile.mkstemp(prefix=f".classifier-{key}-", suffix=".tmp", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(model.state_dict(), f)
        digest = sha256_file(tmp)  # of our own bytes, even if a parallel writer replaces the file after us
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return model, digest
