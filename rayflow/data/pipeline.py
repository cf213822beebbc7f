"""Training pipeline on top of a source: seeded shuffle, flip and the CHW layout in Ray Data (images stay uint8
through the object store), and the iterator Ray Train workers use to pull (x, label) torch batches from their
shard, which scales the images to float32 [-1, 1] on the worker's device.

Pass the result of `build_train_dataset` to `TorchTrainer(datasets={"train": ds})`; each worker then
calls `iter_torch_batches(ray.train.get_dataset_shard("train"), ...)` once per epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray
from ray.data import RandomSeedConfig
from ray.data.dataset import MaterializedDataset
from ray.data.extensions import ArrowTensorArray

from rayflow.data.blocks import image_table
from rayflow.data.executor import prompt_cluster_limits
from rayflow.data.sources.listing import EPOCH_ATTR, execution_index
from rayflow.data.transforms import horizontal_flip, scale_to_unit_range_torch, stack_images, to_chw

if TYPE_CHECKING:
    import torch


# Any process that unpickles this module's transforms may run a Ray Data executor over them (the driver, Ray
# Train's SplitCoordinator): none of them should spend an epoch's first second on one task (rayflow.data.executor).
prompt_cluster_limits()

# The column a text pipeline's encoder stage adds (rayflow.data.text): workers condition on it instead of `label`.
COND_COLUMN = "cond"


def row_uniforms(images: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One uniform [0, 1) number per image, a hash of (seed, epoch, pixels).

    Depends on nothing else, so an image gets the same draw whatever batch, block, task or worker
    it lands in: flips stay reproducible even though Ray Data re-batches rows nondeterministically.
    """
    key = f"{seed}:{epoch}".encode()[:64]
    images = np.ascontiguousarray(images)
    digests = [hashlib.blake2b(im, digest_size=8, key=key).digest() for im in images]
    return np.array([int.from_bytes(d, "little") for d in digests], dtype=np.float64) / 2.0**64


def check_labels(labels: np.ndarray, num_classes: int) -> None:
    """Class labels outside 0..num_classes-1 would index past the class embedding (or hit the null class that
    guidance uses): stop with the config key to fix instead of training on garbage."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise ValueError(
            f"the training data holds class label {bad}, outside 0..{num_classes - 1} "
            f"(data.num_classes={num_classes}). FIX THIS by setting data.num_classes to your data's number of "
            "classes (labels index 0..N-1)"
        )


def _flip_to_chw(batch: dict[str, np.ndarray], *, seed: int, flip: bool, num_classes: int | None) -> pa.Table:
    images = stack_images(batch["image"])  # (N, H, W, C) uint8
    labels = np.asarray(batch["label"], dtype=np.int64)
    if num_classes is not None:
        check_labels(labels, num_classes)
    if flip and len(labels):
        images = horizontal_flip(images, row_uniforms(images, seed, execution_index()) < 0.5)
    # uint8, not float32: a quarter of the bytes through the object store; iter_torch_batches scales on the device
    table = image_table(to_chw(images), labels)  # image: (N, C, H, W) uint8
    if COND_COLUMN in batch:  # text: the packed condition (N, L, D + 1) from the encoder stage rides along
        cond = stack_images(batch[COND_COLUMN]).astype(np.float32, copy=False)  # (N, L, D + 1)
        table = table.append_column(COND_COLUMN, ArrowTensorArray.from_numpy(cond))
    return table


def build_train_dataset(
    source_ds: ray.data.Dataset,
    *,
    seed: int,
    flip: bool = True,
    block_shuffle: bool | None = None,
    batch_size: int | None = None,
    preserve_order: bool = False,
    epoch: int = 0,
    num_classes: int | None = None,
) -> ray.data.Dataset:
    """Source (uint8 `image` HWC, int64 `label`) -> training dataset (uint8 `image` CHW, flipped).

    Scaling to float32 [-1, 1] happens in `iter_torch_batches`, on the worker's device; outside training, scale
    the `image` column with `rayflow.data.transforms.scale_to_unit_range` (numpy) or `..._torch`.

    - flip: left-right mirror with probability 0.5, drawn per image from (seed, epoch, pixels), so it
      is reproducible for a given seed yet differs between epochs.
    - block_shuffle: `randomize_block_order`, reseeded every epoch from seed. In Ray 2.60 it is a
      barrier that holds every source block in the object store before the first batch, so None (the
      default) turns it on only for in-memory sources (the built-ins, where it costs nothing). Shuffle
      file sources at read time instead (`file_shuffle_seed=` on the source) and with a local shuffle
      buffer in `iter_torch_batches`.
    - batch_size: rows per map call; None = one call per block, which lets Ray fuse read, decode
      and flip into one task (~1.6x the throughput of batch_size=256 in benchmarks/ingest.py).
    - preserve_order: make Ray Data emit rows in a deterministic order (slower; for tests and resume).
    - num_classes: when set, a label outside 0..num_classes-1 stops the run (checked here, in the CPU tasks,
      rather than on the training device). None for text data, whose labels may be -1.
    - epoch: the epoch number the first pass of this dataset counts as. Order (block and file shuffle)
      and flips derive from (seed, epoch), so a run resumed in epoch e that passes epoch=e replays the
      interrupted run's epochs exactly.
    Transforms run in `map_batches(batch_format="numpy")`: pandas batches are Arrow-backed in Ray 2.60
    and some pandas-3 ops fail on them.
    """
    ds = source_ds
    if block_shuffle is None:
        block_shuffle = isinstance(source_ds, MaterializedDataset)
    if block_shuffle:
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    ds = ds.map_batches(
        _flip_to_chw, fn_kwargs=dict(seed=seed, flip=flip, num_classes=num_classes), batch_format="numpy",
        batch_size=batch_size,
    )
    # Each Dataset carries its own DataContext copy, so these settings do not leak into other datasets.
    if not hasattr(ds.context, EPOCH_ATTR):
        raise RuntimeError(
            f"this Ray version has no DataContext.{EPOCH_ATTR}, which seeds per-epoch order and flips; "
            "FIX THIS by installing the pinned ray==2.60.0 or porting rayflow.data.pipeline"
        )
    setattr(ds.context, EPOCH_ATTR, epoch)
    if preserve_order:
        ds.context.execution_options.preserve_order = True
    return ds


def iter_torch_batches(
    shard: ray.data.DataIterator | ray.data.Dataset,
    batch_size: int,
    device: str | torch.device,
    *,
    prefetch_batches: int = 2,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x float32 (B, C, H, W) in [-1, 1], cond) on device from one worker's shard: cond is the int64 class
    label (B,), or for text data the packed text condition float32 (B, L, D + 1) of the `cond` column.

    Images arrive as uint8, move to the device as uint8, and are scaled there (`scale_to_unit_range_torch`: the
    same float32 values as `rayflow.data.transforms.to_model_input`).

    Call once per epoch on `ray.train.get_dataset_shard("train")`. prefetch_batches keeps that many
    batches in flight while the step runs. A local shuffle buffer mixes rows across blocks; derive
    local_shuffle_seed from (seed, rank, epoch) for a different but reproducible order every epoch.
    drop_last keeps every step's batch the same size (the default, for stable compiled shapes).
    """
    # Imported here, not at module level: Ray Data's map tasks unpickle `_flip_to_chw` from this
    # module in every worker process, and a module-level torch import costs each of them seconds.
    import torch

    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        # `image`: None keeps the column's own dtype (torch.as_tensor infers it); a cast would hide a shard that
        # does not carry the pipeline's uint8 images
        dtypes={"image": None, "label": torch.int64, COND_COLUMN: torch.float32},
        device=device,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )
    checked = False
    for batch in batches:
        x, label = batch["image"], batch.get(COND_COLUMN, batch["label"])
        if not checked:
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
                raise ValueError(
                    f"shard yields {x.dtype} images of shape {tuple(x.shape)}, expected uint8 (B, C, H, W) with C in "
                    "(1, 3); "
                    "FIX THIS by passing the source through build_train_dataset before TorchTrainer"
                )
            checked = True
        yield scale_to_unit_range_torch(x), label
