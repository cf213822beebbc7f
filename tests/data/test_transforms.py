"""Pure numpy/PIL transforms: no Ray needed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rayflow.data.transforms import (
    center_crop_resize,
    decode_image,
    horizontal_flip,
    random_flip,
    scale_to_unit_range,
    scale_to_unit_range_torch,
    stack_images,
    to_chw,
    to_model_input,
)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _smooth(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], axis=-1).astype(np.uint8)


def _adm_reference(arr: np.ndarray, image_size: int) -> np.ndarray:
    """guided-diffusion image_datasets.center_crop_arr, copied verbatim in spirit: the recipe EDM/EDM2
    ImageNet teachers were trained on. If center_crop_resize's default drifts from it, this fails."""
    pil_image = Image.fromarray(arr)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


# ----------------------------------------------------------------------------------------- decode


def test_decode_png_is_exact_and_sniffed_by_content() -> None:
    img = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    out = decode_image(_png(img))
    assert out.dtype == np.uint8 and out.shape == (13, 17, 3)
    np.testing.assert_array_equal(out, img)


def test_decode_grayscale_to_rgb_and_to_one_channel() -> None:
    gray = np.random.default_rng(1).integers(0, 256, (9, 11), dtype=np.uint8)
    rgb = decode_image(_png(gray), channels=3)
    assert rgb.shape == (9, 11, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], gray)
    one = decode_image(_png(gray), channels=1)
    assert one.shape == (9, 11, 1)
    np.testing.assert_array_equal(one[:, :, 0], gray)


def test_decode_cmyk_jpeg_gives_rgb_close_to_the_original() -> None:
    img = _smooth(40, 56)
    out = decode_image(_jpeg(Image.fromarray(img).convert("CMYK")))
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 6


def test_decode_rgba_png_drops_alpha() -> None:
    rgba = np.random.default_rng(2).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    np.testing.assert_array_equal(decode_image(_png(rgba)), rgba[..., :3])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"definitely not an image", "cannot decode"),
        (_jpeg(Image.fromarray(_smooth(64, 64)))[:700], "truncated|Truncated"),
    ],
)
def test_decode_bad_data_raises_value_error(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_image(data)


def test_decode_rejects_unsupported_channels() -> None:
    with pytest.raises(ValueError, match="channels=2"):
        decode_image(_png(_smooth(4, 4)), channels=2)


# -------------------------------------------------------------------------------- crop and resize


@pytest.mark.parametrize("method", ["adm", "crop_resize"])
def test_crop_resize_keeps_an_image_already_at_res(method: str) -> None:
    img = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_resize(img, 32, method=method), img)


@pytest.mark.parametrize("method", ["adm", "crop_resize"])
def test_crop_takes_the_centre_of_the_long_side(method: str) -> None:
    img = np.random.default_rng(4).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_resize(img, 32, method=method), img[:, 16:48])
    tall = np.random.default_rng(5).integers(0, 256, (35, 32, 3), dtype=np.uint8)
    # offsets are floor((35 - 32) / 2) = 1, as in ADM
    np.testing.assert_array_equal(center_crop_resize(tall, 32, method=method), tall[1:33])


def test_adm_box_halving_is_exact_on_2x2_blocks() -> None:
    small = np.random.default_rng(6).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    big = np.kron(small, np.ones((2, 2, 1), dtype=np.uint8))  # (64, 128, 3): each pixel a 2x2 block
    np.testing.assert_array_equal(center_crop_resize(big, 32), small[:, 16:48])


@pytest.mark.parametrize(("h", "w", "res"), [(75, 100, 16), (130, 100, 32), (33, 47, 32), (20, 70, 64)])
def test_adm_matches_guided_diffusion_center_crop_arr(h: int, w: int, res: int) -> None:
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = center_crop_resize(img, res)
    assert out.shape == (res, res, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _adm_reference(img, res))


def test_crop_resize_method_is_centre_square_then_one_bicubic_resize() -> None:
    img = np.random.default_rng(7).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(img[:, 10:50]).resize((20, 20), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(center_crop_resize(img, 20, method="crop_resize"), expected)


def test_crop_resize_one_channel() -> None:
    img = np.random.default_rng(8).integers(0, 256, (30, 40, 1), dtype=np.uint8)
    out = center_crop_resize(img, 16)
    assert out.shape == (16, 16, 1)
    np.testing.assert_array_equal(out[:, :, 0], _adm_reference(img[:, :, 0], 16))


def test_crop_resize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="method"):
        center_crop_resize(np.zeros((8, 8, 3), np.uint8), 4, method="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        center_crop_resize(np.zeros((8, 8, 3), np.float32), 4)


# --------------------------------------------------------------------------------- scale and flip


def test_to_model_input_layout_and_range() -> None:
    batch = np.random.default_rng(9).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    batch[0, 0, 0] = [0, 255, 128]
    x = to_model_input(batch)
    assert x.dtype == np.float32 and x.shape == (4, 3, 5, 6)
    assert x[0, 0, 0, 0] == -1.0 and x[0, 1, 0, 0] == 1.0
    assert abs(x[0, 2, 0, 0] - (128 / 127.5 - 1)) < 1e-7
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_allclose(x, batch.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)


def test_to_model_input_one_channel() -> None:
    x = to_model_input(np.full((2, 4, 4, 1), 255, np.uint8))
    assert x.shape == (2, 1, 4, 4) and np.all(x == 1.0)


def test_to_chw_then_scaling_is_to_model_input_bit_for_bit() -> None:
    # the training pipeline ships uint8 CHW (to_chw) and the worker scales on its device (torch): together they
    # must give exactly the float32 values the old in-pipeline to_model_input gave, for every pixel value
    import torch

    batch = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1).repeat(3, axis=3)  # every value, 3 channels
    batch = np.concatenate([batch, np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)])
    chw = to_chw(batch)
    assert chw.dtype == np.uint8 and chw.shape == (8, 3, 8, 8) and chw.flags.c_contiguous
    np.testing.assert_array_equal(chw, batch.transpose(0, 3, 1, 2))
    expected = to_model_input(batch)
    on_worker = scale_to_unit_range_torch(torch.from_numpy(chw))
    assert on_worker.dtype == torch.float32 and on_worker.is_contiguous()
    assert np.array_equal(on_worker.numpy(), expected)  # exact, not allclose
    assert np.array_equal(scale_to_unit_range(chw), expected)
    # any layout: the scaling is per value (HWC batches scale, then transpose, to the same numbers)
    assert np.array_equal(scale_to_unit_range_torch(torch.from_numpy(batch)).permute(0, 3, 1, 2).numpy(), expected)


def test_scaling_rejects_pixels_that_are_not_uint8() -> None:
    import torch

    with pytest.raises(ValueError, match="uint8"):
        scale_to_unit_range(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        scale_to_unit_range_torch(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="uint8"):
        to_chw(np.zeros((2, 4, 4, 3), np.float32))


def test_random_flip_mirrors_exactly_the_drawn_images() -> None:
    batch = np.random.default_rng(10).integers(0, 256, (64, 5, 7, 3), dtype=np.uint8)
    before = batch.copy()
    out = random_flip(batch, np.random.default_rng(42))
    drawn = np.random.default_rng(42).random(64) < 0.5
    np.testing.assert_array_equal(batch, before)  # input untouched
    np.testing.assert_array_equal(out[drawn], batch[drawn][:, :, ::-1])
    np.testing.assert_array_equal(out[~drawn], batch[~drawn])
    assert 0 < drawn.sum() < 64


def test_random_flip_probability() -> None:
    batch = np.arange(4000 * 2, dtype=np.uint8).reshape(4000, 1, 2, 1)  # distinct left/right pixels
    out = random_flip(batch, np.random.default_rng(0))
    flipped = (out[:, 0, 0, 0] != batch[:, 0, 0, 0]).mean()
    assert 0.45 < flipped < 0.55
    np.testing.assert_array_equal(random_flip(batch, np.random.default_rng(0), p=0.0), batch)
    np.testing.assert_array_equal(random_flip(batch, np.random.default_rng(0), p=1.0), batch[:, :, ::-1])


def test_horizontal_flip_works_on_read_only_arrays() -> None:
    batch = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
    batch.setflags(write=False)  # like a zero-copy view of an Arrow buffer
    out = horizontal_flip(batch, np.array([True, False]))
    np.testing.assert_array_equal(out[0], batch[0, :, ::-1])
    np.testing.assert_array_equal(out[1], batch[1])


def test_stack_images_joins_object_arrays() -> None:
    flat = np.empty(3, dtype=object)
    for i in range(3):
        flat[i] = np.full(12, i, np.uint8)
    assert stack_images(flat).shape == (3, 12)
    nested = np.empty(2, dtype=object)
    for i in range(2):
        rows = np.empty(4, dtype=object)
        for r in range(4):
            rows[r] = np.full((5, 3), i, np.uint8)
        nested[i] = rows
    out = stack_images(nested)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8 and out[1].min() == 1
    plain = np.zeros((2, 4, 4, 3), np.uint8)
    assert stack_images(plain) is plain
