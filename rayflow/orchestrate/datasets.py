"""The training dataset of a job, built lazily on the driver (Ray Data streams it to the workers)."""

from __future__ import annotations

import ray.data

from rayflow.config import DataConfig
from rayflow.data.pipeline import build_train_dataset
from rayflow.data.sources import SkipLog, make_source
from rayflow.data.text import encode_text as encode_captions

# Precomputed text embeddings in parquet shards (written by `python -m rayflow.prepare`, or by you).
EMBEDDING_COLUMNS = ("text_emb", "text_mask")


def source_dataset(data: DataConfig, *, encode_text: bool = True, skip_log: SkipLog | None = None) -> ray.data.Dataset:
    """The configured source: uint8 `image` (H, W, C) at data.resolution and int64 `label`; with a text encoder
    also the packed text condition `cond` (L, D + 1) from the encoder stage (an actor pool, one encoder each),
    unless encode_text=False (images and labels only, e.g. the evaluation's real set). File sources record the
    files they skip (data.on_bad_image=skip) in skip_log."""
    if data.source in ("mnist", "digits", "shapes"):
        ds = make_source(data.source, res=data.resolution)
    else:
        where = {"root": data.path} if data.source == "image_folder" else {"path": data.path}
        text = {}
        if data.source == "webdataset" and data.text:
            text = {"caption_key": data.caption_key}
        elif data.source == "parquet" and data.text_encoder == "precomputed":
            text = {"embedding_columns": EMBEDDING_COLUMNS}
        elif data.source == "parquet" and data.text:
            text = {"caption_column": data.caption_column}
        ds = make_source(data.source, **where, res=data.resolution, channels=data.channels,
                         on_error=data.on_bad_image, file_shuffle_seed=data.seed, skip_log=skip_log, **text)
    if not (data.text and encode_text):
        return ds
    return encode_captions(ds, encoder=data.text_encoder, path=data.text_encoder_path, max_tokens=data.text_max_tokens,
                       dim=data.text_dim, workers=data.text_encoder_workers, device=data.text_encoder_device,
                       cpus_per_worker=data.text_encoder_cpus)


def train_dataset(
    data: DataConfig, *, source: ray.data.Dataset | None = None, epoch: int = 0, encode_text: bool = True
) -> ray.data.Dataset:
    """Source (the configured one unless given) -> seeded flips and scaling to [-1, 1] and checked labels, in
    deterministic order so a resumed epoch can skip exactly the batches consumed before the interruption; its
    first pass counts as `epoch` (see build_train_dataset)."""
    return build_train_dataset(source if source is not None else source_dataset(data, encode_text=encode_text),
                               seed=data.seed, flip=data.random_flip, preserve_order=True, epoch=epoch,
                               num_classes=None if data.text else data.num_classes)
