"""The packed text condition: token embeddings and their attention mask in one float32 tensor per row.

A row's condition has shape (L, D + 1):

- `cond[..., :D]`: token embeddings, exactly zero at padded positions;
- `cond[..., D]`: the attention mask, 1.0 for a real token and 0.0 for padding.

Why one tensor and not (emb, mask): the distillation core treats the condition as an opaque tensor. It
slices it per batch, concatenates it for guidance ([cond, null]) and builds the classifier-free-guidance
null condition as `zeros_like(cond)`, which here is "no tokens at all" (an all-zero mask). All of that
works unchanged on one tensor; only the UNet's cross-attention unpacks it (`unpack_text`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
