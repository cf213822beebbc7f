"""Rows of encoded images -> image/label blocks: decode, centre-crop and resize each row (`decode_rows`), with
the bad-file policy of `rayflow.data.sources.skips` for rows that do not decode. Every file source's
`map_batches` function turns its batch into `Row`s and hands them here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.extensions import ArrowTensorArray

from rayflow.data.blocks import image_table
from rayflow.data.sources.skips import OnError, SkipLog, bad_file_error, report_skipped
from rayflow.data.transforms import CropMethod, center_crop_resize, decode_image

# Rows per decoded output block: enough to amortise per-batch overhead, few enough to keep blocks streaming.
DECODE_BATCH_SIZE = 64


def map_decode(ds: ray.data.Dataset, decode: Callable[..., pa.Table], **kwargs: Any) -> ray.data.Dataset:
    """Every file source's decode stage: `decode(chunk, **kwargs)` over the read's blocks, DECODE_BATCH_SIZE rows at
    a time (`decode_in_chunks`). Mapped over whole blocks (batch_size=None), it fuses with the read before it: one
    task reads and decodes (a batch_size makes them two tasks, the encoded bytes passing through the object store
    between them; benchmarks/README.md, "Ingest"), while its output blocks stay DECODE_BATCH_SIZE rows. A read
    whose output Ray splits into more blocks does not fuse either: read one block per file or shard."""
    return ds.map_batches(decode_in_chunks, fn_kwargs=dict(kwargs, decode=decode), batch_format="numpy",
                          batch_size=None)


def decode_in_chunks(batch: dict[str, np.ndarray], *, decode: Callable[..., pa.Table], **kwargs: Any
                     ) -> Iterator[pa.Table]:
    """`map_decode`'s batch function: `decode(chunk, **kwargs)` for each DECODE_BATCH_SIZE rows of a read block."""
    n = len(next(iter(batch.values()))) if batch else 0
    for start in range(0, n, DECODE_BATCH_SIZE):
        yield decode({k: v[start : start + DECODE_BATCH_SIZE] for k, v in batch.items()}, **kwargs)


class Row(NamedTuple):
    """One sample on its way to `decode_rows`; a plain 4-tuple (name, data, label, problem) also works."""

    name: str  # for messages and the SkipLog (one entry per distinct name)
    data: Any  # encoded image bytes, or None where problem says why not
    label: int | None  # class index, -1 for a caption-only sample
    problem: str | None  # found before decoding (missing entry, null value); the row is then bad
    caption: str | None = None  # text-image samples
    extras: tuple[Any, ...] = ()  # pass-through values, one per `extra_columns` of `decode_rows`


def check_options(res: int, channels: int, on_error: str) -> None:
    """Check the options every file source passes to `decode_rows`, on the driver before any file is read."""
    if res < 1:
        raise ValueError(f"res={res} must be a positive number of pixels")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported; FIX THIS by using 1 (grayscale) or 3 (RGB)")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r} is unknown; FIX THIS by using 'skip' or 'raise'")


def _row_array(value: Any, column: str) -> np.ndarray:
    """One row of a pass-through column as an ndarray: numpy batches hold nested lists as object arrays
    of per-level arrays, which are stacked back into one array."""
    if value is None:
        raise ValueError(f"column {column!r} has a missing (null) value")
    a = np.asarray(value)
    if a.dtype == object and a.ndim == 1 and len(a):
        try:
            a = np.stack([_row_array(x, column) for x in a])
        except ValueError:
            raise ValueError(
                f"column {column!r} holds a row of ragged nested lists; FIX THIS by writing one fixed shape "
                "per row (e.g. pad text embeddings to the tokenizer's max length and add a mask column)"
            ) from None
    return a


def _tensor_column(values: list[Any], template: Any, column: str) -> pa.Array:
    """A Ray tensor column of per-row values: fixed-shape when every row has the same shape, else
    variable-shaped. template (any input row, or None) gives an empty column its shape and dtype."""
    arrays = [_row_array(v, column) for v in values]
    if not arrays:
        t = np.empty((0,), np.float32) if template is None else _row_array(template, column)
        return ArrowTensorArray.from_numpy(np.empty((0, *t.shape), t.dtype))
    if all(a.shape == arrays[0].shape for a in arrays):
        return ArrowTensorArray.from_numpy(np.stack(arrays))
    ragged = np.empty(len(arrays), dtype=object)  # an object array: a list would be tried with np.stack
    for i, a in enumerate(arrays):
        ragged[i] = a
    return ArrowTensorArray.from_numpy(ragged)


def decode_rows(
    rows: Iterable[Row | tuple],
    *,
    res: int,
    channels: int,
    crop: CropMethod,
    on_error: OnError,
    skip_log: SkipLog | None,
    with_paths: bool = False,
    with_captions: bool = False,
    extra_columns: Sequence[str] = (),
) -> pa.Table:
    """Decode, crop and resize encoded rows into an image/label table, + `caption` if with_captions,
    + one Ray tensor column per extra_columns name (the rows' `extras`, kept only for rows that decode),
    + `path` if with_paths."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    captions: list[str] = []
    extras: list[tuple[Any, ...]] = []
    names: list[str] = []
    bad: list[tuple[str, str]] = []
    template: tuple[Any, ...] | None = None  # any row's extras: the shapes of an all-skipped batch
    for row in rows:
        name, data, label, problem, caption, row_extras = Row(*row)
        if template is None and extra_columns:
            template = row_extras
        if problem is None:
            try:
                images.append(center_crop_resize(decode_image(data, channels), res, method=crop))
                labels.append(int(label))
                captions.append(caption)
                extras.append(row_extras)
                names.append(name)
                continue
            except ValueError as e:
                problem = str(e)
        if on_error == "raise":
            raise bad_file_error(name, problem)
        bad.append((name, problem))
    if bad:
        report_skipped(bad, skip_log)
    stacked = np.stack(images) if images else np.empty((0, res, res, channels), dtype=np.uint8)
    table = image_table(stacked, labels, captions if with_captions else None)
    for j, column in enumerate(extra_columns):
        values = [e[j] for e in extras]
        table = table.append_column(column, _tensor_column(values, None if template is None else template[j], column))
    return table.append_column("path", pa.array(names, type=pa.string())) if with_paths else table
