"""Training pipeline: flip + CHW layout in Ray Data (uint8 through the object store), seeded determinism,
worker-side scaling in the torch batches."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from ray.data.dataset import MaterializedDataset
from ray.data.extensions import ArrowTensorArray

from rayflow.data.pipeline import build_train_dataset, iter_torch_batches, row_uniforms
from rayflow.data.transforms import horizontal_flip, to_chw, to_model_input

pytestmark = pytest.mark.usefixtures("ray_cluster")
N, RES = 240, 8


@pytest.fixture(scope="module")
def originals() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N, RES, RES, 3), dtype=np.uint8)


def _source(images: np.ndarray, blocks: int = 6) -> ray.data.Dataset:
    """A source whose label is the row id, so every output row can be traced to its original."""
    tables = [
        pa.table({"image": ArrowTensorArray.from_numpy(im), "label": pa.array(ids, pa.int64())})
        for im, ids in zip(np.array_split(images, blocks), np.array_split(np.arange(len(images)), blocks), strict=True)
    ]
    return ray.data.from_arrow(tables)


def _epoch(ds: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    batch = ds.take_batch(N + 1, batch_format="numpy")
    return batch["image"], batch["label"]


def _flipped(x: np.ndarray, ids: np.ndarray, originals: np.ndarray) -> np.ndarray:
    """Which rows came out mirrored; fails if a row is neither the original nor its mirror."""
    plain = to_chw(originals[ids])
    mirror = to_chw(originals[ids][:, :, ::-1])
    is_plain = (x == plain).all(axis=(1, 2, 3))
    is_mirror = (x == mirror).all(axis=(1, 2, 3))
    assert np.all(is_plain | is_mirror), "a row is neither the original (CHW) nor its mirror"
    return is_mirror


def test_images_stay_uint8_chw_through_the_object_store_and_flip_about_half(originals: np.ndarray) -> None:
    train = build_train_dataset(_source(originals), seed=3)
    x, ids = _epoch(train)
    # uint8, a quarter of float32's bytes: the scaling to [-1, 1] is the worker's (iter_torch_batches)
    assert x.dtype == np.uint8 and x.shape == (N, 3, RES, RES) and ids.dtype == np.int64
    assert "uint8" in str(train.schema().types[0])
    assert sorted(ids.tolist()) == list(range(N))
    flipped = _flipped(x, ids, originals)
    assert 0.35 < flipped.mean() < 0.65
    # the documented rule: flip where the (seed, epoch, pixels) hash draws < 0.5; first epoch is 0
    np.testing.assert_array_equal(flipped, row_uniforms(originals[ids], 3, 0) < 0.5)


def test_a_source_block_with_zero_rows_passes_through(originals: np.ndarray) -> None:
    # e.g. a decode batch whose files were all skipped
    empty = pa.table({"image": ArrowTensorArray.from_numpy(originals[:0]), "label": pa.array([], pa.int64())})
    full = pa.table({"image": ArrowTensorArray.from_numpy(originals[:10]), "label": pa.array(range(10))})
    x, ids = _epoch(build_train_dataset(ray.data.from_arrow([empty, full, empty]), seed=0))
    assert x.shape == (10, 3, RES, RES) and sorted(ids.tolist()) == list(range(10))


def test_labels_outside_num_classes_stop_the_pipeline_with_the_config_key(originals: np.ndarray) -> None:
    # _source labels rows 0..N-1: with num_classes=N they pass; with fewer classes the first block to fail names
    # its largest label (which block fails first depends on which task finishes first)
    n = len(originals)
    x, _ = _epoch(build_train_dataset(_source(originals), seed=0, num_classes=n))
    assert len(x) == n
    with pytest.raises(Exception, match=r"class label (\d+), outside 0\.\.9 \(data\.num_classes=10\)\. FIX THIS") as e:
        _epoch(build_train_dataset(_source(originals), seed=0, num_classes=10))
    label = int(re.search(r"class label (\d+), outside", str(e.value)).group(1))
    assert 10 <= label < n


def test_no_flip_keeps_images(originals: np.ndarray) -> None:
    x, ids = _epoch(build_train_dataset(_source(originals), seed=3, flip=False))
    assert not _flipped(x, ids, originals).any()


def test_same_seed_same_stream_other_seed_other_stream(originals: np.ndarray) -> None:
    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        return _epoch(build_train_dataset(_source(originals), seed=seed, preserve_order=True, batch_size=16))

    x1, ids1 = run(7)
    x2, ids2 = run(7)
    np.testing.assert_array_equal(ids1, ids2)
    np.testing.assert_array_equal(x1, x2)
    x3, ids3 = run(8)
    assert not np.array_equal(ids1, ids3)  # block order differs
    order = np.argsort(ids1)
    assert not np.array_equal(x1[order], x3[np.argsort(ids3)])  # flips differ


def test_epochs_differ_but_replay_identically(originals: np.ndarray) -> None:
    first = build_train_dataset(_source(originals), seed=5, preserve_order=True)
    a0, a1 = _epoch(first), _epoch(first)
    assert not np.array_equal(a0[1], a1[1]), "block order should be reseeded every epoch"
    f0 = _flipped(*a0, originals)[np.argsort(a0[1])]
    f1 = _flipped(*a1, originals)[np.argsort(a1[1])]
    assert (f0 != f1).mean() > 0.3, "flips should be redrawn every epoch"
    again = build_train_dataset(_source(originals), seed=5, preserve_order=True)
    b0, b1 = _epoch(again), _epoch(again)
    resumed = _epoch(build_train_dataset(_source(originals), seed=5, preserve_order=True, epoch=1))
    for a, b in ((a0, b0), (a1, b1), (a1, resumed)):
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])


def test_block_shuffle_defaults_on_only_for_in_memory_sources(originals: np.ndarray) -> None:
    in_memory = _source(originals)
    lazy = in_memory.map_batches(lambda b: b, batch_format="pyarrow")  # stands in for a file source
    assert isinstance(in_memory, MaterializedDataset)
    assert not isinstance(lazy, MaterializedDataset)
    _, ids = _epoch(build_train_dataset(lazy, seed=2, preserve_order=True))
    np.testing.assert_array_equal(ids, np.arange(N))  # no barrier: source order
    _, ids = _epoch(build_train_dataset(in_memory, seed=2, preserve_order=True))
    assert not np.array_equal(ids, np.arange(N))


def test_flips_do_not_depend_on_batching(originals: np.ndarray) -> None:
    masks = []
    for batch_size, blocks in ((7, 3), (64, 12)):
        x, ids = _epoch(build_train_dataset(_source(originals, blocks), seed=11, batch_size=batch_size))
        masks.append(_flipped(x, ids, originals)[np.argsort(ids)])
    np.testing.assert_array_equal(masks[0], masks[1])


def test_iter_torch_batches_yields_model_ready_tensors(originals: np.ndarray) -> None:
    ds = build_train_dataset(_source(originals), seed=0)
    batches = list(iter_torch_batches(ds, 50, "cpu", prefetch_batches=2))
    assert len(batches) == N // 50  # drop_last
    for x, label in batches:
        assert x.dtype == torch.float32 and x.shape == (50, 3, RES, RES)
        assert label.dtype == torch.int64 and label.shape == (50,)
        assert x.min() >= -1 and x.max() <= 1
    everything = list(iter_torch_batches(ds, 50, "cpu", drop_last=False, local_shuffle_buffer_size=100))
    assert sorted(torch.cat([lab for _, lab in everything]).tolist()) == list(range(N))


def test_iter_torch_batches_scales_to_exactly_the_in_pipeline_values(originals: np.ndarray) -> None:
    # the values the pipeline used to ship (to_model_input of the flipped HWC image in a Ray task) must come out
    # of the worker-side scaling bit for bit, so resumed runs and data ledgers see the same numbers
    seed = 4
    ds = build_train_dataset(_source(originals), seed=seed, preserve_order=True)
    x, ids = zip(*iter_torch_batches(ds, 64, "cpu", drop_last=False), strict=True)
    x, ids = torch.cat(x).numpy(), torch.cat(ids).numpy()
    flip = row_uniforms(originals[ids], seed, 0) < 0.5  # the documented rule, first epoch
    expected = to_model_input(horizontal_flip(originals[ids], flip))
    assert x.dtype == np.float32 and np.array_equal(x, expected)


def test_iter_torch_batches_rejects_an_unscaled_source(originals: np.ndarray) -> None:
    with pytest.raises(ValueError, match="build_train_dataset"):
        next(iter_torch_batches(_source(originals), 16, "cpu"))


def test_iter_torch_batches_rejects_float_images(originals: np.ndarray) -> None:
    # a shard of already-scaled float32 CHW images (the pre-uint8 pipeline's output) would be scaled twice
    floats = ray.data.from_arrow(pa.table({"image": ArrowTensorArray.from_numpy(to_model_input(originals[:32])),
                                           "label": pa.array(range(32), pa.int64())}))
    with pytest.raises(ValueError, match="uint8"):
        next(iter_torch_batches(floats, 16, "cpu"))


@ray.remote(num_cpus=0.25)
def _consume(shard: ray.data.DataIterator, epochs: int) -> list[list[int]]:
    """Stands in for a Ray Train worker: the row ids its shard yields, per epoch."""
    seen = []
    for _ in range(epochs):
        ids = []
        for _, label in iter_torch_batches(shard, 20, "cpu", drop_last=False):
            ids.extend(label.tolist())
        seen.append(ids)
    return seen


def test_streaming_split_shards_cover_the_data_once_per_epoch(originals: np.ndarray) -> None:
    # TorchTrainer(datasets=...) does the same split; each worker iterates its own shard per epoch.
    shards = build_train_dataset(_source(originals), seed=1).streaming_split(2, equal=True)
    per_worker = ray.get([_consume.remote(s, 2) for s in shards])
    for epoch in range(2):
        a, b = per_worker[0][epoch], per_worker[1][epoch]
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(N))
        assert abs(len(a) - len(b)) <= 1
