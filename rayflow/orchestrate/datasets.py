"""The training dataset of a job, built lazily on the driver (Ray Data streams it to the workers)."""

from __future__ import annotations

import ray.data

from rayflow.config import DataConfig
from rayflow.data.pipeline import build_train_dataset
from rayflow.data.sources import make_source


def source_dataset(data: DataConfig) -> ray.data.Dataset:
    """The configured source: uint8 `image` (H, W, C) at data.resolution and int64 `label`."""
    if data.source in ("mnist", "digits"):
        return make_source(data.source, res=data.resolution)
    where = {"root": data.path} if data.source == "image_folder" else {"path": data.path}
    return make_source(data.source, **where, res=data.resolution, channels=data.channels,
                       on_error=data.on_bad_image, file_shuffle_seed=data.seed)


def train_dataset(data: DataConfig) -> ray.data.Dataset:
    """Source -> seeded flips and scaling to [-1, 1], in deterministic order so a resumed epoch can skip
    exactly the batches consumed before the interruption."""
    return build_train_dataset(source_dataset(data), seed=data.seed, flip=data.random_flip, preserve_order=True)
