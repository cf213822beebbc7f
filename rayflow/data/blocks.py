"""The block format of every source and pipeline stage: an Arrow table with an `image` Ray tensor column and an
int64 `label` column (+ `caption` for text-image sources). Sources (`rayflow.data.sources`), the training pipeline
(`rayflow.data.pipeline`) and `rayflow.prepare` build their blocks with `image_table`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray


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
