"""Pure numpy/PIL image transforms: bytes -> uint8 HWC -> float32 NCHW in [-1, 1], and the torch twin of the
last step (`scale_to_unit_range_torch`) that the training worker runs on its device.

No Ray here, so every function can be tested and reused (sampling, evaluation) without a cluster.
Layout conventions: a single image is (H, W, C) uint8, a batch is (N, H, W, C) uint8 until
`to_model_input` turns it into (N, C, H, W) float32. C is 1 (grayscale) or 3 (RGB). The training
pipeline stops one step earlier, at uint8 (N, C, H, W) (`to_chw`): a quarter of float32's bytes
through the object store; the worker scales on its device.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

CropMethod = Literal["adm", "crop_resize"]
CHANNELS = (1, 3)
# The model's pixel range: x / HALF_RANGE - 1 in float32, so 0 -> -1 and 255 -> 1 exactly. Both scaling functions
# below do exactly these two float32 IEEE operations, so numpy on a CPU and torch on any device agree bit for bit.
HALF_RANGE = 127.5


def _check_channels(channels: int) -> None:
    if channels not in CHANNELS:
        raise ValueError(f"channels={channels} is not supported; FIX THIS by using 1 (grayscale) or 3 (RGB)")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float single-channel images -> mode "L"; other modes unchanged."""
    if img.mode.startswith("I"):  # "I;16", "I;16B", ... (16-bit PNG/TIFF) and "I" (16-bit PGM, 32-bit TIFF)
        arr = np.asarray(img).astype(np.int64)  # (H, W)
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{img.mode} image with values {lo}..{hi} outside 0..65535 has no 8-bit meaning "
                "(convert the file to 8- or 16-bit grayscale)"
            )
        # Top 8 bits: the same mapping PIL applies to 16-bit RGB(A), so a gray 16-bit image and its
        # RGB copy decode alike. PIL's own convert("L") would clip every value above 255 to white.
        return Image.fromarray((arr >> 8).astype(np.uint8))  # mode "L"
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        if not np.isfinite(arr).all() or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
            raise ValueError(
                "float image with values outside [0, 1] (or NaN/inf) has no 8-bit meaning "
                "(convert the file to 8-bit, or scale it to [0, 1])"
            )
        return Image.fromarray(np.rint(arr * 255.0).astype(np.uint8))  # mode "L"
    return img


def decode_image(data: bytes, channels: int = 3) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) to uint8 (H, W, channels).

    The format is sniffed from the content, never from a file name, so a PNG named .JPEG decodes.
    CMYK, palette, grayscale and alpha images are converted with PIL's `convert("RGB")` (or "L"),
    as ADM/EDM's dataset tools do (alpha is dropped, not composited); EXIF orientation and ICC
    profiles are ignored for the same reason. High-bit-depth images keep their top 8 bits, as PIL
    already does for 16-bit RGB(A): 16-bit grayscale (and 32-bit integer images with values in
    0..65535) is shifted right by 8 instead of PIL's clipping to 255, and float images must hold
    values in [0, 1] (scaled by 255).
    Raises ValueError on empty, corrupt or truncated data and on pixel values it cannot map to 8 bits.
    """
    _check_channels(channels)
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            # load() decodes all pixels now; Image.open only reads the header, so a truncated
            # file would otherwise pass here and fail later inside a worker.
            img.load()
            img = _to_8bit(img).convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises OSError ("image file is truncated"), UnidentifiedImageError (an OSError) or
        # SyntaxError (broken PNG chunks) on bad data.
        raise ValueError(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from e
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def _to_pil(img: np.ndarray) -> Image.Image:
    if img.ndim != 3 or img.shape[2] not in CHANNELS or img.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 (H, W, C) image with C in {CHANNELS}, got {img.dtype} {img.shape}; "
            "FIX THIS by decoding with decode_image first"
        )
    return Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def center_crop_resize(img: np.ndarray, res: int, *, method: CropMethod = "adm") -> np.ndarray:
    """Crop the centre square and resize a uint8 (H, W, C) image to (res, res, C).

    method="adm" (default) is ADM's `center_crop_arr`, which EDM and EDM2 reuse for ImageNet
    (`center_crop_imagenet` in their dataset_tool.py), so it matches the teachers those repos ship:
      1. while the short side >= 2*res: halve both sides with PIL BOX (area averaging, anti-aliased);
      2. one PIL BICUBIC resize so the short side is exactly res (long side round()-ed);
      3. crop the centre res x res, offsets floor((size - res) / 2).
    method="crop_resize" crops the centre short-side square first (same floor offsets), then does one
    PIL BICUBIC resize to res x res; use it only if the teacher was trained that way.
    An image already res x res is returned unchanged by both methods.
    """
    if res < 1:
        raise ValueError(f"res={res} must be a positive number of pixels")
    channels = img.shape[2] if img.ndim == 3 else 0
    pil = _to_pil(img)
    if method == "adm":
        while min(pil.size) >= 2 * res:
            pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.Resampling.BOX)
        scale = res / min(pil.size)
        pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.Resampling.BICUBIC)
        arr = _from_pil(pil, channels)
        top, left = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
        return np.ascontiguousarray(arr[top : top + res, left : left + res])
    if method == "crop_resize":
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = img[top : top + side, left : left + side]
        if side == res:
            return np.ascontiguousarray(square)
        pil = _to_pil(np.ascontiguousarray(square)).resize((res, res), resample=Image.Resampling.BICUBIC)
        return _from_pil(pil, channels)
    raise ValueError(f"method={method!r} is unknown; FIX THIS by using 'adm' or 'crop_resize'")


def stack_images(column: np.ndarray) -> np.ndarray:
    """Turn an image column of a numpy batch into one (N, ...) array.

    Ray Data hands tensor-typed columns over as one ndarray, but a parquet fixed-size-list (or nested
    list) column as an object array of per-row arrays, which np.stack joins.
    """
    if column.dtype != object:
        return column
    if len(column) == 0:
        return np.empty((0,), dtype=np.uint8)
    # Nested list columns (list<list<list<int>>>) nest object arrays one level per axis.
    return np.stack([stack_images(row) if isinstance(row, np.ndarray) else np.asarray(row) for row in column])


def _check_nhwc(batch: np.ndarray) -> None:
    if batch.ndim != 4 or batch.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (N, H, W, C) batch, got {batch.dtype} {batch.shape}")


def to_chw(batch: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> uint8 (N, C, H, W), contiguous."""
    _check_nhwc(batch)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))  # (N, C, H, W)


def scale_to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) -> float32 in [-1, 1]: x / 127.5 - 1 (0 -> -1, 255 -> 1 exactly)."""
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {images.dtype}")
    x = images.astype(np.float32)
    x /= np.float32(HALF_RANGE)
    x -= np.float32(1.0)
    return x


def scale_to_unit_range_torch(images: torch.Tensor) -> torch.Tensor:
    """`scale_to_unit_range` in torch, on the tensor's device: uint8 (any shape) -> float32 in [-1, 1], the same
    float32 values bit for bit. Move the uint8 tensor to the device first (a quarter of the bytes), then scale."""
    import torch  # here, not at module level: Ray Data's map tasks import this module and need no torch

    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {images.dtype}")
    x = images.to(torch.float32)
    # A divisor tensor on the same device, not a Python number: CUDA turns division by a CPU scalar into a
    # multiplication by its reciprocal, which can differ from numpy's division in the last bit.
    x.div_(torch.tensor(HALF_RANGE, dtype=torch.float32, device=x.device))
    x.sub_(1.0)
    return x


def to_model_input(batch: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]: x / 127.5 - 1 (0 -> -1, 255 -> 1 exactly)."""
    _check_nhwc(batch)
    return scale_to_unit_range(batch.transpose(0, 3, 1, 2))  # (N, C, H, W)


def horizontal_flip(batch: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mirror the images of an (N, H, W, C) batch where mask[i] is True; returns a new array."""
    mask = np.asarray(mask, dtype=bool)
    if batch.ndim != 4 or mask.shape != (batch.shape[0],):
        raise ValueError(f"expected an (N, H, W, C) batch and an (N,) mask, got {batch.shape} and {mask.shape}")
    out = batch.copy()  # Ray may hand over read-only views of Arrow buffers
    out[mask] = batch[mask, :, ::-1]
    return out


def random_flip(batch: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror each image of an (N, H, W, C) batch left-right with probability p, drawing from rng."""
    return horizontal_flip(batch, rng.random(batch.shape[0]) < p)
