"""A tiny ImageNet-layout folder of real JPEG/PNG files made with PIL, for tests and demos.

It covers what real crawls contain: varied sizes and aspect ratios, a CMYK JPEG, a grayscale JPEG, an
RGBA PNG, a PNG named .JPEG, a truncated JPEG and a stray non-image file.

    python -m tests.data.make_images OUT_DIR     (from the repository root)
"""

from __future__ import annotations

import io
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class ImageFolderSpec:
    """What `make_image_folder` wrote: root, class names in label order, good files and their labels,
    bad files, and the exact pixels of the losslessly stored (PNG) images."""

    root: Path
    classes: list[str]
    labels: dict[str, int] = field(default_factory=dict)  # good file path -> label
    bad: list[str] = field(default_factory=list)  # files that must be skipped
    pixels: dict[str, np.ndarray] = field(default_factory=dict)  # PNG file path -> uint8 HWC RGB

    @property
    def num_good(self) -> int:
        return len(self.labels)


def _picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth, left-right asymmetric colour image (JPEG-friendly; flips are visible)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    chans = [127.5 + 100 * np.sin(xx / w * 3.0 + yy / h * 1.5 + phase[c]) + 20 * (xx / w) for c in range(3)]
    return np.clip(np.stack(chans, axis=-1), 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_image_folder(root: Path, seed: int = 0) -> ImageFolderSpec:
    """Write 3 classes (11 good images, 1 truncated JPEG, 1 .txt) under root; return what was written."""
    rng = np.random.default_rng(seed)
    classes = ["n01000001", "n01000002", "n01000003"]
    spec = ImageFolderSpec(root=root, classes=classes)

    def write(cls: str, name: str, data: bytes, *, good: bool = True, pixels: np.ndarray | None = None) -> None:
        path = root / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if good:
            spec.labels[str(path)] = classes.index(cls)
        else:
            spec.bad.append(str(path))
        if pixels is not None:
            spec.pixels[str(path)] = pixels

    rgb = Image.fromarray
    # class 0: plain JPEGs of several aspect ratios, and a CMYK JPEG
    write("n01000001", "a_wide.JPEG", _encode(rgb(_picture(rng, 48, 80)), "JPEG"))
    write("n01000001", "b_tall.JPEG", _encode(rgb(_picture(rng, 90, 40)), "JPEG"))
    write("n01000001", "c_big.JPEG", _encode(rgb(_picture(rng, 130, 100)), "JPEG"))
    write("n01000001", "d_cmyk.JPEG", _encode(rgb(_picture(rng, 40, 52)).convert("CMYK"), "JPEG"))
    # class 1: grayscale JPEG, PNG named .JPEG, RGBA PNG, truncated JPEG
    write("n01000002", "e_gray.JPEG", _encode(rgb(_picture(rng, 36, 36)).convert("L"), "JPEG"))
    png_pixels = _picture(rng, 33, 47)
    write("n01000002", "f_png_named.JPEG", _encode(rgb(png_pixels), "PNG"), pixels=png_pixels)
    rgba = np.concatenate([_picture(rng, 40, 40), np.full((40, 40, 1), 255, np.uint8)], axis=-1)
    write("n01000002", "g_rgba.png", _encode(Image.fromarray(rgba, "RGBA"), "PNG"), pixels=rgba[:, :, :3])
    full = _encode(rgb(_picture(rng, 64, 64)), "JPEG")
    write("n01000002", "h_truncated.JPEG", full[: len(full) // 2], good=False)
    # class 2: small and odd sizes, PNG and JPEG, plus a stray non-image file
    small_pixels = _picture(rng, 16, 16)
    write("n01000003", "i_small.png", _encode(rgb(small_pixels), "PNG"), pixels=small_pixels)
    write("n01000003", "j_odd.jpg", _encode(rgb(_picture(rng, 31, 45)), "JPEG"))
    write("n01000003", "k_square.JPEG", _encode(rgb(_picture(rng, 64, 64)), "JPEG"))
    write("n01000003", "l_flat.png", _encode(rgb(_picture(rng, 20, 70)), "PNG"))
    (root / "n01000003" / "README.txt").write_text("not an image: the extension filter skips it\n")
    return spec


if __name__ == "__main__":
    spec = make_image_folder(Path(sys.argv[1]))
    print(f"wrote {spec.num_good} good and {len(spec.bad)} bad images in {len(spec.classes)} classes to {spec.root}")


# ---------------------------------------------------------------------------------------------------
# Odd encodings and modes (bad-input tests)
# ---------------------------------------------------------------------------------------------------


def encode_png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 (H, W) gray or (H, W, 3) RGB pixels, written by hand (PIL cannot save
    16-bit RGB): signature, IHDR, one zlib IDAT of unfiltered rows, IEND."""
    import struct
    import zlib

    h, w = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2  # gray | RGB
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@dataclass
class OddImage:
    """Encoded bytes and the uint8 pixels decode_image must return for them (gray: (H, W); RGB:
    (H, W, 3)); expected is None where only the shape and a tolerance can be checked (lossy JPEG)."""

    data: bytes
    expected: np.ndarray | None
    gray: bool


def odd_images(seed: int = 0) -> dict[str, OddImage]:
    """One image per mode real crawls and scientific sets contain, with the pixels they must decode to."""
    rng = np.random.default_rng(seed)
    out: dict[str, OddImage] = {}
    rgb = _picture(rng, 21, 34)
    gray16 = rng.integers(0, 65536, (19, 23), dtype=np.uint16)
    rgb48 = rng.integers(0, 65536, (12, 15, 3), dtype=np.uint16)
    out["gray16.png"] = OddImage(encode_png16(gray16), (gray16 >> 8).astype(np.uint8), gray=True)
    out["rgb48.png"] = OddImage(encode_png16(rgb48), (rgb48 >> 8).astype(np.uint8), gray=False)
    # 16-bit PGM: PIL opens it in mode "I" (32-bit integers)
    out["gray16.pgm"] = OddImage(_encode(Image.fromarray(gray16), "PPM"), (gray16 >> 8).astype(np.uint8), gray=True)
    unit = rng.random((9, 14)).astype(np.float32)
    out["float01.tif"] = OddImage(_encode(Image.fromarray(unit), "TIFF"), np.rint(unit * 255).astype(np.uint8), True)
    palette = Image.fromarray(rgb).quantize(colors=16)
    out["palette.png"] = OddImage(_encode(palette, "PNG"), np.asarray(palette.convert("RGB")), gray=False)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    out["palette_transparent.png"] = OddImage(
        _encode(transparent, "PNG"), np.asarray(palette.convert("RGB")), gray=False
    )
    la = np.stack([rgb[..., 0], rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)], axis=-1)
    out["gray_alpha.png"] = OddImage(_encode(Image.fromarray(la, "LA"), "PNG"), rgb[..., 0], gray=True)
    bits = rng.random((10, 10)) < 0.5
    out["bilevel.png"] = OddImage(_encode(Image.fromarray(bits), "PNG"), bits.astype(np.uint8) * 255, gray=True)
    out["cmyk.jpg"] = OddImage(_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), None, gray=False)
    out["gray.jpg"] = OddImage(_encode(Image.fromarray(rgb[..., 1]), "JPEG"), None, gray=True)
    return out


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    """A WebDataset shard: samples {key: {suffix: bytes}} as `<key>.<suffix>` tar members."""
    with tarfile.open(path, "w") as tar:
        for key, entries in samples.items():
            for suffix, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
