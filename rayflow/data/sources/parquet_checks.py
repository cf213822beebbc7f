"""Driver-side checks of parquet shards, before any task starts: each file's footer (schema and column
statistics) must hold a usable image column, integer labels without nulls or negatives, string captions and
numeric pass-through columns; a failure is one line naming the file, the column and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.extensions import ArrowTensorType, ArrowTensorTypeV2


def _leaf_type(t: pa.DataType) -> pa.DataType:
    """The element type under (nested) lists and tensor extension types (Ray's fixed and variable-shaped
    tensors, Arrow's fixed_shape_tensor)."""
    while True:
        if isinstance(t, pa.BaseExtensionType):
            t = t.storage_type
            if pa.types.is_struct(t) and t.get_field_index("data") >= 0:  # Ray variable-shaped tensors
                t = t.field("data").type
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            t = t.value_type
        else:
            return t


def _image_column_kind(schema: pa.Schema, file: str, column: str, res: int, channels: int) -> str:
    """'bytes' (encoded images) or 'array' (pixel arrays), after checking the column's type."""
    fix = f"FIX THIS by writing column {column!r} as encoded image bytes or uint8 (res, res, C) arrays"
    if column not in schema.names:
        raise ValueError(f"{file}: no column {column!r} (columns: {schema.names}); {fix}")
    t = schema.field(column).type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "bytes"
    if isinstance(t, ArrowTensorType | ArrowTensorTypeV2 | pa.FixedShapeTensorType):
        shape = tuple(t.shape)
        hwc = (len(shape) == 3 and shape[2] == channels) or (len(shape) == 2 and channels == 1)
        if not (hwc and pa.types.is_integer(t.value_type)):
            raise ValueError(
                f"{file}: column {column!r} holds {t.value_type} tensors of shape {shape}, "
                f"expected integer (H, W, {channels}); {fix}"
            )
        return "array"
    if pa.types.is_fixed_size_list(t) and not pa.types.is_nested(t.value_type):
        # A flat fixed-size list carries no shape: it must be exactly one res x res x channels image.
        if not pa.types.is_integer(t.value_type) or t.list_size != res * res * channels:
            raise ValueError(
                f"{file}: column {column!r} is {t}, but res={res}, channels={channels} needs "
                f"{res * res * channels} integer values per row; FIX THIS by passing the res/channels the "
                "shards were written with"
            )
        return "array"
    if pa.types.is_nested(t) and pa.types.is_integer(_leaf_type(t)):
        return "array"
    raise ValueError(f"{file}: column {column!r} has type {t}; {fix}")


def _column_type(schema: pa.Schema, file: str, column: str, fix: str) -> pa.DataType:
    """The type of a column a shard must have, or a one-line error naming file, column and `fix`."""
    if column not in schema.names:
        raise ValueError(f"{file}: no column {column!r} (columns: {schema.names}); FIX THIS by {fix}")
    return schema.field(column).type


def _check_label_column(schema: pa.Schema, file: str, column: str) -> None:
    t = _column_type(schema, file, column, f"writing int64 class indices in a {column!r} column or passing "
                     "label_column=")
    if not pa.types.is_integer(t):
        raise ValueError(f"{file}: column {column!r} has type {t}; FIX THIS by writing integer class indices")


def _check_caption_column(schema: pa.Schema, file: str, column: str) -> None:
    t = _column_type(schema, file, column, f"writing the captions as a string column {column!r} or passing "
                     "caption_column= the column that holds them")
    value_type = t.value_type if pa.types.is_dictionary(t) else t
    if not (
        pa.types.is_string(value_type) or pa.types.is_large_string(value_type) or pa.types.is_string_view(value_type)
    ):
        raise ValueError(f"{file}: column {column!r} has type {t}; FIX THIS by writing the captions as utf-8 strings")


def _check_embedding_columns(schema: pa.Schema, file: str, columns: Sequence[str]) -> None:
    for column in columns:
        t = _column_type(schema, file, column, "writing it with the step that precomputes text embeddings "
                         "(python -m rayflow.prepare --text-encoder), or leaving it out of embedding_columns")
        leaf = _leaf_type(t)
        if not (pa.types.is_floating(leaf) or pa.types.is_integer(leaf) or pa.types.is_boolean(leaf)):
            raise ValueError(
                f"{file}: column {column!r} has type {t}, not numeric arrays; FIX THIS by writing float "
                "embeddings (and integer or boolean masks) per row"
            )


def _column_stats(metadata: pq.FileMetaData, column: str) -> tuple[int | None, Any]:
    """(null count, minimum) of a column over all row groups from the footer; None where a row group
    has no statistics. A nested column counts the nulls of all its leaves."""
    nulls: int | None = 0
    lo: Any = None
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for j in range(group.num_columns):
            chunk = group.column(j)
            if chunk.path_in_schema != column and not chunk.path_in_schema.startswith(column + "."):
                continue
            stats = chunk.statistics
            if stats is None or not stats.has_null_count:
                nulls = None
            elif nulls is not None:
                nulls += stats.null_count
            if stats is not None and stats.has_min_max and stats.min is not None:
                lo = stats.min if lo is None else min(lo, stats.min)
    return nulls, lo


def check_parquet_file(
    fs: pafs.FileSystem,
    file: str,
    image_column: str,
    label_column: str | None,
    res: int,
    channels: int,
    *,
    caption_column: str | None = None,
    embedding_columns: Sequence[str] = (),
) -> tuple[str, bool]:
    """Check one shard's footer (schema and column statistics); returns (its image column kind, whether it
    has the label column). With a caption column the label column is optional."""
    try:
        with fs.open_input_file(file) as f:
            parquet = pq.ParquetFile(f)
            metadata, schema = parquet.metadata, parquet.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise ValueError(
            f"{file}: not a readable parquet file ({type(e).__name__}: {e}); FIX THIS by rewriting the shard or "
            "deleting it (a write that was cut off leaves such files)"
        ) from None
    kind = _image_column_kind(schema, file, image_column, res, channels)
    has_label = label_column is not None and (caption_column is None or label_column in schema.names)
    if has_label:
        _check_label_column(schema, file, label_column)
        nulls, lo = _column_stats(metadata, label_column)
        if nulls:
            raise ValueError(
                f"{file}: column {label_column!r} has {nulls} missing (null) labels; FIX THIS by filling or "
                "dropping those rows"
            )
        if lo is not None and lo < 0:
            raise ValueError(
                f"{file}: column {label_column!r} holds negative labels (min {lo}); FIX THIS by writing class "
                "indices 0..num_classes-1"
            )
    if caption_column is not None:
        _check_caption_column(schema, file, caption_column)
    _check_embedding_columns(schema, file, embedding_columns)
    if kind == "array":
        for column, what in [(image_column, "pixel values"), (caption_column, "captions")]:
            nulls, _ = _column_stats(metadata, column) if column is not None else (0, None)
            if nulls:
                raise ValueError(
                    f"{file}: column {column!r} has {nulls} missing (null) {what}; FIX THIS by dropping those rows "
                    "or rewriting the shard with rayflow.prepare"
                )
    # Encoded-bytes rows may hold null images or captions: those rows are bad files, skipped or raised per
    # on_error.
    return kind, has_label


def check_embedding_names(
    columns: Sequence[str], *, image_column: str, label_column: str | None, caption_column: str | None
) -> tuple[str, ...]:
    """embedding_columns as a tuple, after checking that the names are distinct and clash with no input
    or output column."""
    if isinstance(columns, str):
        raise ValueError(
            f"embedding_columns={columns!r} is one string; FIX THIS by passing a list of column names, "
            f"e.g. [{columns!r}]"
        )
    columns = tuple(columns)
    taken = {image_column, label_column, caption_column, "image", "label", "caption", "path"} - {None}
    clash = sorted({c for c in columns if c in taken or columns.count(c) > 1})
    if clash:
        raise ValueError(
            f"embedding_columns {clash} repeat a name or clash with the image/label/caption/path columns; FIX THIS "
            "by passing each pass-through column once, under a name of its own"
        )
    return columns

