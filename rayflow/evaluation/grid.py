"""PNG grids of samples: used by workers (in-training evaluation), sample scripts and MLflow logging."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SAMPLES_FILE = "samples.png"  # the sample grid a training worker writes into a checkpoint at an evaluation


def save_image_grid(
    images: np.ndarray | torch.Tensor, path: str, nrow: int | None = None, *, pad_value: int = 128
) -> None:
    """Write images (N, C, H, W) or (N, H, W) in [-1, 1] (C = 1 or 3) as one PNG grid.

    `nrow` images per row (default: ceil(sqrt(N)), a square-ish grid); 2-px borders of `pad_value`
    (mid-grey by default, so both black-background digits and photos show their edges).
    """
    from PIL import Image

    x = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]  # (N, 1, H, W)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(
            f"image grid needs a non-empty (N, C, H, W) batch with C in (1, 3), got shape "
            f"{x.shape}; FIX THIS by passing channel-first images (x.permute(0, 3, 1, 2))"
        )
    n, ch, h, w = x.shape
    pixels = np.clip(np.round((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 2
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, ch), pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top : top + h, left : left + w] = pixels[i].transpose(1, 2, 0)  # (H, W, C)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = Image.fromarray(canvas[..., 0], mode="L") if ch == 1 else Image.fromarray(canvas, mode="RGB")
    img.save(path, format="PNG")
