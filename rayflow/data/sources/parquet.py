"""Parquet shards of encoded image bytes or pixel arrays, with labels and/or captions and precomputed
pass-through columns; footers are checked on the driver first (`rayflow.data.sources.parquet_checks`)."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.extensions import ArrowTensorType, ArrowTensorTypeV2

from rayflow.data.blocks import image_table
from rayflow.data.sources.decode import Row, check_options, decode_rows, map_decode
from rayflow.data.sources.listing import file_shuffle, list_files, resolve_filesystem
from rayflow.data.sources.parquet_checks import check_embedding_names, check_parquet_file
from rayflow.data.sources.skips import OnError, SkipLog
from rayflow.data.transforms import CropMethod, center_crop_resize


def _checked_labels(labels: np.ndarray, column: str, where: str) -> np.ndarray:
    # Runtime fallback for shards whose footers carry no statistics.
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where}: column {column!r} has missing (null) labels; FIX THIS by filling or dropping those rows"
        )
    if len(labels) and labels.min() < 0:
        raise ValueError(
            f"{where}: column {column!r} holds negative labels (min {labels.min()}); FIX THIS by writing class "
            "indices 0..num_classes-1"
        )
    return labels.astype(np.int64)


def _chunk_pixels(chunk: pa.Array) -> np.ndarray:
    """(N, ...) pixels of one Arrow chunk, without per-row Python work."""
    if isinstance(chunk.type, ArrowTensorType | ArrowTensorTypeV2):
        return chunk.to_numpy()
    if isinstance(chunk.type, pa.FixedShapeTensorType):
        return chunk.to_numpy_ndarray()
    # (nested) lists: peel one level at a time; every row must have the same size at each level
    shape, values = [], chunk
    while (
        pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type)
    ):
        lengths = pc.list_value_length(values)
        lo, hi = pc.min_max(lengths).values()
        if lo != hi:
            raise ValueError(
                f"rows hold images of different sizes ({lo}..{hi} values at one level); FIX THIS by writing "
                "one size per shard (rayflow.prepare crops and resizes every image to res)"
            )
        shape.append(lo.as_py())
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(len(chunk), *shape)


def _parquet_array_batch(
    batch: pa.Table,
    *,
    image_column: str,
    label_column: str | None,
    res: int,
    channels: int,
    crop: CropMethod,
    caption_column: str | None = None,
    embedding_columns: Sequence[str] = (),
) -> pa.Table:
    # pyarrow batches: numpy batches would turn a list column into an object array of per-row
    # arrays, and stacking those row by row costs more than the rest of the pipeline.
    # Array batches carry paths only with embedding columns (their values are checked later, per row, and the
    # error must name the shard); otherwise the footer check has named files up front.
    paths = batch.column("path").unique().to_pylist() if "path" in batch.column_names else []
    where = ", ".join(sorted(paths)) or "a parquet shard"
    if label_column is None:  # caption shards without classes
        labels = np.full(batch.num_rows, -1, dtype=np.int64)
    else:
        # A null makes to_numpy() return floats, which _checked_labels reports as missing labels.
        labels = _checked_labels(batch.column(label_column).to_numpy(), label_column, where)
    for column in [c for c in (caption_column, *embedding_columns) if c is not None]:
        if batch.column(column).null_count:
            raise ValueError(
                f"{where}: column {column!r} has {batch.column(column).null_count} missing (null) values; FIX THIS "
                "by dropping those rows or rewriting the shards"
            )
    captions = None if caption_column is None else batch.column(caption_column).to_pylist()
    table = image_table(_array_images(batch, image_column, res, channels, crop), labels, captions)
    for column in embedding_columns:  # passed through as they are
        table = table.append_column(column, batch.column(column))
    if embedding_columns and "path" in batch.column_names:
        table = table.append_column("path", batch.column("path"))
    return table


def _array_images(batch: pa.Table, image_column: str, res: int, channels: int, crop: CropMethod) -> np.ndarray:
    """(N, res, res, channels) uint8 pixels of a pixel-array column."""
    where = "a parquet shard"
    if batch.num_rows == 0:
        return np.empty((0, res, res, channels), dtype=np.uint8)
    image_col = batch.column(image_column)
    if image_col.null_count:
        raise ValueError(
            f"{where}: column {image_column!r} has {image_col.null_count} missing (null) pixel values; FIX THIS by "
            "dropping those rows or rewriting the shards with rayflow.prepare"
        )
    images = np.concatenate([_chunk_pixels(c) for c in image_col.chunks if len(c)])
    if images.ndim == 2:  # flat fixed-size lists, length checked against res/channels up front
        images = images.reshape(len(images), res, res, channels)
    elif images.ndim == 3 and channels == 1:  # (N, H, W) grayscale
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] != channels:
        raise ValueError(
            f"column {image_column!r} holds arrays of shape {images.shape[1:]}, expected (H, W, {channels})"
        )
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 255:
            raise ValueError(f"column {image_column!r} holds values outside 0..255; FIX THIS by storing uint8 pixels")
        images = images.astype(np.uint8)
    if images.shape[1:3] != (res, res):
        images = np.stack([center_crop_resize(im, res, method=crop) for im in images])
    return images


def _parquet_bytes_batch(
    batch: dict[str, np.ndarray],
    *,
    image_column: str,
    label_column: str | None,
    caption_column: str | None = None,
    embedding_columns: Sequence[str] = (),
    **decode_kwargs: Any,
) -> pa.Table:
    n = len(batch["path"])
    if label_column is None:  # caption shards without classes
        labels = np.full(n, -1, dtype=np.int64)
    else:
        labels = _checked_labels(batch[label_column], label_column, ", ".join(sorted({str(p) for p in batch["path"]})))
    captions = batch[caption_column] if caption_column is not None else [None] * n
    # Pass-through columns arrive as (N, ...) arrays (tensor columns) or object arrays of per-row arrays.
    extras = [batch[c] for c in embedding_columns]

    def rows() -> Iterator[Row]:
        for i, (path, data, label, caption) in enumerate(
            zip(batch["path"], batch[image_column], labels, captions, strict=True)
        ):
            row_extras = tuple(e[i] for e in extras)
            if caption_column is None:
                name = f"{path} (an {image_column!r} value with label {label})"
            else:
                # Caption rows often have no label: name them by caption (or image checksum), so that
                # distinct bad rows stay distinct entries in the SkipLog.
                if isinstance(caption, str):
                    which = f"caption {caption[:40]!r}"
                elif isinstance(data, bytes | bytearray):
                    which = f"null caption, image crc32 {zlib.crc32(data):08x}"
                else:
                    which = "null caption and image"
                with_label = "" if label_column is None else f" with label {label}"
                name = f"{path} (an {image_column!r} value{with_label}, {which})"
            if data is None:
                problem = "missing (null) image value"
            elif caption_column is not None and not isinstance(caption, str):
                problem = f"missing (null) {caption_column!r} caption"
            else:
                missing = [c for c, v in zip(embedding_columns, row_extras, strict=True) if v is None]
                problem = f"missing (null) {missing[0]!r} value" if missing else None
            yield Row(name, data, int(label), problem, caption, row_extras)

    return decode_rows(
        rows(), with_captions=caption_column is not None, extra_columns=tuple(embedding_columns), **decode_kwargs
    )


@contextlib.contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    # Ray 2.60's default parquet reader (DataSourceV2) starts 32 footer-reader actors on every
    # execution, i.e. every epoch: 6-12 s before the first row on a 2-core node. V1 reads footers once
    # on the driver. The flag is only consulted when the read is planned, so restore it right after.
    ctx = ray.data.DataContext.get_current()
    old = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = old


def parquet_shards(
    path: str,
    res: int,
    *,
    channels: int = 3,
    crop: CropMethod = "adm",
    on_error: OnError = "skip",
    skip_log: SkipLog | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    file_shuffle_seed: int | None = None,
    caption_column: str | None = None,
    embedding_columns: Sequence[str] = (),
) -> ray.data.Dataset:
    """Read parquet shards (a file or a folder of *.parquet) with an image and a label column, or, for
    text-image shards (caption_column set), an image and a caption column.

    `image` may hold encoded image bytes (decoded and cropped to res like `image_folder`) or pixel
    arrays: Ray tensors, (nested) lists, or flat fixed-size lists of res*res*channels values
    (`rayflow.prepare` writes uint8 Ray tensors). Arrays of another size are centre-cropped/resized.
    Each file is read as one block (one task), so write at least as many shards as CPUs.
    Every file's footer is checked on the driver first (schema and column statistics), so an unreadable
    file, a missing or wrong-typed column, null or negative labels and null pixel arrays fail fast with
    the file and column named. A null encoded-bytes value counts as a bad file (skipped or raised per
    on_error). Files and folders starting with "." or "_" are ignored (Spark/pyarrow convention).

    caption_column names a string column, output as `caption`. In caption mode the label column is
    optional: shards without it (in every file, or in none) get label -1, shards with it are checked as
    above. A null caption is a bad row like a null image (skipped or raised per on_error) for encoded
    bytes; with pixel arrays it raises, as null pixels do.

    embedding_columns (e.g. ("text_emb", "text_mask")) are precomputed per-row numeric arrays that are
    passed through to the output under their own names, aligned with the rows that survive decoding
    (their validation belongs to the module that consumes them). Each must exist with a numeric (float,
    integer or boolean) leaf type in every footer. With pixel arrays they pass through unchanged; with
    encoded bytes they come out as Ray tensor columns (variable-shaped if rows differ in shape), and a
    null value makes its row bad.
    """
    check_options(res, channels, on_error)
    embedding_columns = check_embedding_names(
        embedding_columns, image_column=image_column, label_column=label_column, caption_column=caption_column
    )
    if label_column is None and caption_column is None:
        raise ValueError("label_column=None needs caption_column; FIX THIS by naming the label or the caption column")
    fs, base = resolve_filesystem(path)
    files = list_files(fs, base, ["parquet"])
    if not files:
        raise ValueError(f"no .parquet files under {path!r}; FIX THIS by pointing to the shard folder")
    checks = {
        f: check_parquet_file(
            fs,
            f,
            image_column,
            label_column,
            res,
            channels,
            caption_column=caption_column,
            embedding_columns=embedding_columns,
        )
        for f in files
    }
    kinds = {f: kind for f, (kind, _) in checks.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"column {image_column!r} holds encoded bytes in some files and arrays in others "
            f"(e.g. {files[0]} has {kinds[files[0]]}); FIX THIS by keeping one kind per dataset"
        )
    kind = kinds[files[0]]
    labelled = [f for f, (_, has_label) in checks.items() if has_label]
    if labelled and len(labelled) < len(files):
        unlabelled = next(f for f in files if f not in labelled)
        raise ValueError(
            f"column {label_column!r} is in some shards but not in others (e.g. {labelled[0]} has it, {unlabelled} "
            "does not); FIX THIS by writing it in every shard (-1 where a sample has no class) or in none"
        )
    if not labelled:
        label_column = None  # caption mode without classes: label -1
    read_columns = [image_column, label_column, caption_column, *embedding_columns]
    with _parquet_reader_v1():
        ds = ray.data.read_parquet(
            files,
            filesystem=fs,
            columns=[c for c in read_columns if c is not None],
            # decode errors and bad embedding values must name the file; nothing else needs paths
            include_paths=kind == "bytes" or bool(embedding_columns),
            shuffle=file_shuffle(file_shuffle_seed),
            # One block per shard: Ray otherwise splits each file's output, and a split read cannot
            # fuse with the map_batches after it (~2x slower end to end on pixel-array shards).
            override_num_blocks=len(files),
        )
    common = dict(
        image_column=image_column,
        label_column=label_column,
        caption_column=caption_column,
        embedding_columns=embedding_columns,
        res=res,
        channels=channels,
        crop=crop,
    )
    if kind == "array":
        return ds.map_batches(_parquet_array_batch, fn_kwargs=common, batch_format="pyarrow")
    return map_decode(ds, _parquet_bytes_batch, **common, on_error=on_error, skip_log=skip_log)
