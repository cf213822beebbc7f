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

One module per seam: `decode` (rows -> cropped image blocks), `skips` (the bad-file policy and `SkipLog`),
`listing` (finding files), `builtin` (mnist, digits, shapes), `folder` (ImageNet layout), `parquet` (+
`parquet_checks`, the footer checks) and `webdataset`; this package re-exports their public names and picks one
by name (`make_source`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import ray

from rayflow.data.sources.builtin import digits, mnist, shapes
from rayflow.data.sources.decode import DECODE_BATCH_SIZE
from rayflow.data.sources.folder import IMAGE_EXTENSIONS, find_classes, image_folder, list_class_files
from rayflow.data.sources.listing import list_files, resolve_filesystem
from rayflow.data.sources.parquet import parquet_shards
from rayflow.data.sources.skips import OnError, SkipLog, SkippedFile
from rayflow.data.sources.webdataset import WEBDATASET_IMAGE_KEYS, webdataset_shards

__all__ = [
    "DECODE_BATCH_SIZE",
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "WEBDATASET_IMAGE_KEYS",
    "OnError",
    "SkipLog",
    "SkippedFile",
    "digits",
    "find_classes",
    "image_folder",
    "list_class_files",
    "list_files",
    "make_source",
    "mnist",
    "parquet_shards",
    "resolve_filesystem",
    "shapes",
    "webdataset_shards",
]

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
