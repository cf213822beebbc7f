"""Ray Data stages that turn text-image rows into (image, label, cond) rows, cond being the packed text
condition of `rayflow.data.text.pack`: `CaptionEncoderStage` encodes captions in an actor pool (one encoder per
actor), `precomputed_stage` packs `text_emb` / `text_mask` columns in plain tasks, and `encode_text` picks one.

Text-image sources yield `image` (uint8 HWC), `label` (int64, -1 when unknown) and `caption` (string);
shards with precomputed embeddings carry `text_emb` ((L, D) float per row) and optionally `text_mask`
((L,) 0/1 per row) instead of `caption`.

Ray Data starts a fresh actor pool (model load, empty memo) for every execution of a dataset, i.e. every
epoch of a non-materialized dataset; materialize the encoded dataset, or write `text_emb` shards once and use
encoder="precomputed", when encoding cost matters.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.extensions import ArrowTensorArray

from rayflow.data.text.encoders import ENCODER_KINDS, encoder_dim, make_encoder
from rayflow.data.text.pack import pack_text

# Columns the text stages consume; everything they emit is image, label and cond.
TEXT_COLUMNS = ("caption", "text_emb", "text_mask")
# Rows per encoder call in the actor pool: large enough to fill a forward pass, small enough to stream.
ENCODE_BATCH_SIZE = 256


def _output_table(batch: pa.Table, cond: np.ndarray, where: str) -> pa.Table:
    missing = [c for c in ("image", "label") if c not in batch.column_names]
    if missing:
        raise ValueError(
            f"{where}: the batch has no {'/'.join(missing)} column (columns: {batch.column_names}); "
            "FIX THIS by feeding a text-image source (image, label, caption or text_emb)"
        )
    return pa.table(
        {"image": batch.column("image"), "label": batch.column("label"), "cond": ArrowTensorArray.from_numpy(cond)}
    )


class CaptionEncoderStage:
    """Ray Data callable class: (image, label, caption) -> (image, label, cond), one encoder per actor.

    `ds.map_batches(CaptionEncoderStage, fn_constructor_kwargs=dict(kind=..., path=..., max_tokens=...,
    device=...), concurrency=n, batch_format="pyarrow")`. With dim given, the loaded encoder must match it.
    """

    def __init__(
        self, kind: str, path: str | None, max_tokens: int, device: str = "cpu", dim: int | None = None
    ) -> None:
        self.encoder = make_encoder(kind, path=path, max_tokens=max_tokens, device=device)
        if dim is not None and self.encoder.dim != dim:
            raise ValueError(
                f"text encoder {kind!r} has dim {self.encoder.dim} but the config says {dim}; "
                f"FIX THIS by setting the text dim to {self.encoder.dim}"
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "caption" not in batch.column_names:
            hint = " (this data has text_emb: use encoder 'precomputed')" if "text_emb" in batch.column_names else ""
            raise ValueError(
                f"caption encoder: the batch has no caption column (columns: {batch.column_names}){hint}; "
                "FIX THIS by using a text-image source"
            )
        captions = batch.column("caption").to_pylist()
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise ValueError(
                    f"caption encoder: row {i} of a {len(captions)}-row batch has caption {c!r} ({type(c).__name__}), "
                    "not a string; FIX THIS by dropping or filling rows without a caption (an empty string is a "
                    "valid caption)"
                )
        emb, mask = self.encoder.encode(captions)
        return _output_table(batch, pack_text(emb, mask, where="caption encoder"), "caption encoder")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _column_rows(col: pa.ChunkedArray, ndim: int, name: str, where: str) -> list[np.ndarray]:
    """Per-row numpy arrays of a tensor column (Ray fixed or variable-shaped) or an ndim-deep nested list."""
    rows: list[np.ndarray] = []
    for chunk in col.chunks:
        base = len(rows)
        if chunk.null_count:
            raise ValueError(
                f"{where}: row {base + pc.index(chunk.is_null(), True).as_py()} has a null {name}; "
                f"FIX THIS by dropping that row or writing its {name}"
            )
        if isinstance(chunk.type, pa.ExtensionType):
            # Ray tensor columns: fixed shape -> (n, ...) array, variable shape -> object array of arrays.
            rows.extend(np.asarray(r) for r in chunk.to_numpy())
            continue
        if not _is_list(chunk.type):
            raise ValueError(
                f"{where}: {name} has type {chunk.type}; FIX THIS by storing it as a Ray tensor column "
                f"or {ndim}-deep nested float lists"
            )
        lengths, flat = [], chunk
        for _ in range(ndim):
            if not _is_list(flat.type) or flat.null_count:
                raise ValueError(
                    f"{where}: {name} is not {ndim}-deep nested lists without nulls (type {chunk.type}); "
                    f"FIX THIS by writing one {'(L, D)' if ndim == 2 else '(L,)'} array per row"
                )
            lengths.append(pc.list_value_length(flat).to_numpy(zero_copy_only=False).astype(np.int64))
            flat = pc.list_flatten(flat)
        if flat.null_count:
            raise ValueError(f"{where}: {name} holds null values; FIX THIS by writing complete arrays")
        values = flat.to_numpy(zero_copy_only=False)
        if ndim == 1:
            rows.extend(np.split(values, np.cumsum(lengths[0])[:-1]))
            continue
        inner_splits = np.split(lengths[1], np.cumsum(lengths[0])[:-1])
        starts = np.concatenate([[0], np.cumsum(lengths[1])])
        inner_start = 0
        for r, inner in enumerate(inner_splits):
            if len(inner) and (inner != inner[0]).any():
                raise ValueError(
                    f"{where}: row {base + r} has {name} rows of different lengths {sorted(set(inner.tolist()))}; "
                    "FIX THIS by writing one (L, D) array per row"
                )
            width = int(inner[0]) if len(inner) else 0
            lo, hi = starts[inner_start], starts[inner_start + len(inner)]
            rows.append(values[lo:hi].reshape(len(inner), width))
            inner_start += len(inner)
    return rows


def precomputed_stage(batch: pa.Table, *, max_tokens: int, dim: int, where: str = "text_emb column") -> pa.Table:
    """Ray Data map_batches(batch_format="pyarrow") function: (image, label, text_emb[, text_mask]) ->
    (image, label, cond).

    text_emb rows must be (l, dim) with l <= max_tokens; shorter ones are zero-padded to max_tokens.
    text_mask defaults to ones over a row's l tokens; when given it must have l entries of 0/1. A `path` column
    (the shard of each row) names the file in errors and is dropped.
    """
    if "path" in batch.column_names:
        where = f"{', '.join(sorted(batch.column('path').unique().to_pylist()))}: {where}"
    if "text_emb" not in batch.column_names:
        raise ValueError(
            f"{where}: the batch has no text_emb column (columns: {batch.column_names}); FIX THIS by using "
            "a caption encoder ('minilm' or 'hf') or writing text_emb into the shards"
        )
    embs = _column_rows(batch.column("text_emb"), 2, "text_emb", where)
    masks = (
        _column_rows(batch.column("text_mask"), 1, "text_mask", where) if "text_mask" in batch.column_names else None
    )
    n = len(embs)
    emb = np.zeros((n, max_tokens, dim), dtype=np.float32)
    mask = np.zeros((n, max_tokens), dtype=np.float32)
    for i, row in enumerate(embs):
        if row.ndim != 2 or row.shape[1] != dim or row.shape[0] > max_tokens:
            raise ValueError(
                f"{where}: row {i} has text_emb of shape {row.shape}, expected at most ({max_tokens}, {dim}) "
                f"(tokens, dim); FIX THIS by matching the configured text dim / max_tokens to the shards "
                "(shorter token sequences are zero-padded, longer ones are an error)"
            )
        tokens = row.shape[0]
        if not np.issubdtype(row.dtype, np.number):
            raise ValueError(f"{where}: row {i} has text_emb of dtype {row.dtype}; FIX THIS by storing floats")
        emb[i, :tokens] = row  # a float64 NaN stays NaN; pack_text reports it below
        if masks is None:
            mask[i, :tokens] = 1.0
        else:
            m = masks[i]
            if m.shape != (tokens,):
                raise ValueError(
                    f"{where}: row {i} has text_mask of shape {m.shape} for a text_emb of {tokens} tokens; "
                    "FIX THIS by writing one mask entry per token"
                )
            mask[i, :tokens] = m
    return _output_table(batch, pack_text(emb, mask, where=where), where)


def encode_text(
    ds: ray.data.Dataset,
    *,
    encoder: str,
    path: str | None,
    max_tokens: int,
    dim: int,
    workers: int = 1,
    device: str = "cpu",
    cpus_per_worker: float = 1.0,
) -> ray.data.Dataset:
    """Text-image dataset -> (image, label, cond float32 (max_tokens, dim + 1)) dataset.

    encoder "precomputed" reads text_emb/text_mask in plain tasks; "minilm" and "hf" run `workers`
    encoder actors (cpus_per_worker each, may be fractional; one GPU each when device is cuda*).
    The encoder's dim is checked against `dim` here, on the driver, from its config.json.
    """
    if max_tokens < 1 or dim < 1:
        raise ValueError(f"max_tokens={max_tokens} and dim={dim} must be >= 1; FIX THIS in the text config")
    if encoder == "precomputed":
        return ds.map_batches(precomputed_stage, fn_kwargs=dict(max_tokens=max_tokens, dim=dim), batch_format="pyarrow")
    if encoder not in ENCODER_KINDS:
        raise ValueError(f"text encoder {encoder!r} is unknown; FIX THIS by using one of {', '.join(ENCODER_KINDS)}")
    if workers < 1 or cpus_per_worker <= 0:
        raise ValueError(
            f"workers={workers} must be >= 1 and cpus_per_worker={cpus_per_worker} > 0; FIX THIS in the text config"
        )
    actual = encoder_dim(encoder, path)
    if actual != dim:
        raise ValueError(
            f"text encoder {encoder!r} produces {actual}-dim embeddings but the config says dim={dim}; "
            f"FIX THIS by setting the text dim to {actual}"
        )
    return ds.map_batches(
        CaptionEncoderStage,
        fn_constructor_kwargs=dict(kind=encoder, path=path, max_tokens=max_tokens, device=device, dim=dim),
        concurrency=workers,
        batch_size=ENCODE_BATCH_SIZE,
        batch_format="pyarrow",
        num_cpus=cpus_per_worker,
        num_gpus=1 if device.startswith("cuda") else 0,
    )
