"""Bad input on the data side: every case either decodes to clean pixels, is a counted and logged skip,
or stops with a one-line error that names the file (or key) and the fix. Never silent, never garbage.

Covered elsewhere (tests/data/test_sources.py, test_transforms.py): truncated JPEG skipped and counted
(and raised, naming the file, under on_error='raise'); CMYK and grayscale JPEG, RGBA PNG and a PNG named
.JPEG decoded by content; an empty class folder; a missing or string-typed parquet column; webdataset
samples without a label.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from rayflow.data.pipeline import build_train_dataset
from rayflow.data.sources import SkipLog, find_classes, image_folder, parquet_shards, webdataset_shards
from rayflow.data.sources.decode import decode_rows
from rayflow.data.transforms import center_crop_resize, decode_image, to_model_input

from .make_images import _encode, _picture, odd_images, write_tar

RES = 16
ODD = odd_images()


def _png(arr: np.ndarray) -> bytes:
    return _encode(Image.fromarray(arr), "PNG")


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "FIX THIS" in text, text
    return text


# ------------------------------------------------------------------------------ modes (no Ray)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", [n for n, img in ODD.items() if img.expected is not None])
def test_odd_modes_decode_to_exact_8bit_pixels(name: str, channels: int) -> None:
    """16-bit gray/RGB PNG, 16-bit PGM, float TIFF, palette (with transparency), gray+alpha, 1-bit."""
    img = ODD[name]
    out = decode_image(img.data, channels)
    assert out.dtype == np.uint8 and out.shape == img.expected.shape[:2] + (channels,)
    if img.gray:
        np.testing.assert_array_equal(out, np.repeat(img.expected[..., None], channels, axis=-1))
    elif channels == 3:
        np.testing.assert_array_equal(out, img.expected)
    else:  # colour to one channel: PIL's ITU-R 601-2 luma of the exact RGB pixels
        np.testing.assert_array_equal(out[..., 0], np.asarray(Image.fromarray(img.expected).convert("L")))


def test_16bit_gray_is_not_clipped_to_white() -> None:
    # PIL's own convert("L") clips 16-bit values above 255: a mid-gray ramp would come out all white.
    ramp = np.linspace(0, 65535, 64 * 4).astype(np.uint16).reshape(4, 64)
    out = decode_image(_encode(Image.fromarray(ramp), "PNG"), channels=1)  # PIL writes uint16 as 16-bit PNG
    assert 120 < out.mean() < 135 and out.min() == 0 and out.max() == 255


def test_cmyk_and_grayscale_jpeg_to_one_and_three_channels() -> None:
    rgb = _picture(np.random.default_rng(0), 21, 34)  # the picture odd_images encodes, same seed
    cmyk3, cmyk1 = decode_image(ODD["cmyk.jpg"].data, 3), decode_image(ODD["cmyk.jpg"].data, 1)
    assert np.abs(cmyk3.astype(int) - rgb).mean() < 6
    luma = np.asarray(Image.fromarray(rgb).convert("L"), dtype=int)
    assert cmyk1.shape == (21, 34, 1) and np.abs(cmyk1[..., 0].astype(int) - luma).mean() < 6
    gray3 = decode_image(ODD["gray.jpg"].data, 3)
    assert np.array_equal(gray3[..., 0], gray3[..., 1]) and np.array_equal(gray3[..., 0], gray3[..., 2])
    assert np.abs(gray3[..., 0].astype(int) - rgb[..., 1]).mean() < 6


@pytest.mark.parametrize(
    ("pixels", "fmt"),
    [
        (np.full((4, 4), 200.0, np.float32), "TIFF"),  # float image on a 0..255 scale
        (np.full((4, 4), np.nan, np.float32), "TIFF"),
        (np.full((4, 4), -5, np.int32), "TIFF"),  # signed 32-bit
    ],
    ids=["float_0_255", "float_nan", "int32_negative"],
)
def test_pixels_without_an_8bit_meaning_are_rejected_not_clipped(pixels: np.ndarray, fmt: str) -> None:
    with pytest.raises(ValueError, match="no 8-bit meaning"):
        decode_image(_encode(Image.fromarray(pixels), fmt))


SIZES = [(1, 1), (1, 40), (40, 1), (3, 200), (200, 3), (15, 17), (16, 16), (31, 16), (480, 640)]


@pytest.mark.parametrize("method", ["adm", "crop_resize"])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_image_size_becomes_c_res_res_in_unit_range(channels: int, method: str) -> None:
    rng = np.random.default_rng(1)
    for h, w in SIZES:
        for fill in ("random", "black", "white"):  # extremes: bicubic overshoot must not leave [-1, 1]
            pixels = {
                "random": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                "black": np.zeros((h, w, 3), np.uint8),
                "white": np.full((h, w, 3), 255, np.uint8),
            }[fill]
            img = center_crop_resize(decode_image(_png(pixels), channels), RES, method=method)
            x = to_model_input(img[None])  # (1, C, RES, RES)
            assert x.shape == (1, channels, RES, RES) and x.dtype == np.float32, (h, w)
            assert -1.0 <= x.min() and x.max() <= 1.0, (h, w, fill)
            if fill != "random":
                assert np.all(x == (-1.0 if fill == "black" else 1.0)), (h, w, fill)


def test_each_skipped_file_is_logged_by_name(caplog: pytest.LogCaptureFixture) -> None:
    good = _png(np.zeros((4, 4, 3), np.uint8))
    rows = [("/d/a/ok.png", good, 0, None), ("/d/a/cut.JPEG", good[:20], 0, None), ("/d/b/empty.jpg", b"", 1, None)]
    with caplog.at_level(logging.WARNING, logger="rayflow.data.sources.skips"):
        table = decode_rows(rows, res=4, channels=3, crop="adm", on_error="skip", skip_log=None)
    assert table.num_rows == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "/d/a/cut.JPEG" in lines[0] and "/d/b/empty.jpg: empty file" in lines[1]
    with pytest.raises(ValueError, match=r"^/d/a/cut\.JPEG: cannot decode.*FIX THIS") as info:
        decode_rows(rows, res=4, channels=3, crop="adm", on_error="raise", skip_log=None)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------- image folder (Ray)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """a/: every odd mode; b/: odd sizes; c/: only undecodable files; d/: one plain PNG; plus hidden
    folders and files that must not count as classes or images. Returns (root, bad files)."""
    root = tmp_path_factory.mktemp("odd_folder")
    rng = np.random.default_rng(2)
    bad = []

    def write(rel: str, data: bytes, *, is_bad: bool = False) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if is_bad:
            bad.append(str(path))

    for name, img in ODD.items():
        write(f"a/{name}", img.data)
    write("a/float_0_255.tif", _encode(Image.fromarray(np.full((4, 4), 200.0, np.float32)), "TIFF"), is_bad=True)
    for h, w in SIZES:
        write(f"b/{h}x{w}.png", _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    jpeg = _encode(Image.fromarray(_picture(rng, 64, 64)), "JPEG")
    write("c/truncated.JPEG", jpeg[: len(jpeg) // 2], is_bad=True)
    write("c/zero_bytes.jpg", b"", is_bad=True)
    write("c/text_named.jpg", b"<html>403 Forbidden</html>", is_bad=True)
    write("d/plain.png", _png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)))
    # Not data: notebook checkpoints (a would-be class 0 that shifts every label), macOS forks.
    write(".ipynb_checkpoints/x-checkpoint.png", _png(np.zeros((4, 4, 3), np.uint8)))
    write("d/.ipynb_checkpoints/plain-checkpoint.png", _png(np.zeros((4, 4, 3), np.uint8)))
    write("d/._plain.png", b"\x00\x05\x16\x07 AppleDouble")
    return root, sorted(bad)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_of_odd_modes_and_sizes_yields_clean_tensors(
    odd_folder: tuple[Path, list[str]], channels: int
) -> None:
    root, bad = odd_folder
    assert find_classes(str(root)) == ["a", "b", "c", "d"]  # hidden folders are not classes
    log = SkipLog()
    source = image_folder(str(root), RES, channels=channels, skip_log=log)
    batch = build_train_dataset(source, seed=0, flip=False).take_batch(1000, batch_format="numpy")
    x, labels = batch["image"], batch["label"]
    assert x.shape == (len(labels), channels, RES, RES) and x.dtype == np.uint8  # scaled on the training worker
    # c/ holds only bad files: it yields nothing yet keeps index 2, so d/ is still label 3.
    assert Counter(labels.tolist()) == {0: len(ODD), 1: len(SIZES), 3: 1}
    skipped = log.skipped()
    assert [s.path for s in skipped] == bad
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert "no 8-bit meaning" in reasons["float_0_255.tif"] and "truncated" in reasons["truncated.JPEG"]
    assert "empty file" in reasons["zero_bytes.jpg"] and "cannot identify" in reasons["text_named.jpg"]


# ----------------------------------------------------------------------------- parquet shards


def _bytes_table(labels: list[int | None], images: list[bytes | None] | None = None) -> pa.Table:
    images = images if images is not None else [_png(np.full((8, 8, 3), i, np.uint8)) for i in range(len(labels))]
    return pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})


def _array_table(labels: list[int | None], images: list | None = None) -> pa.Table:
    images = (
        images if images is not None else [np.full((RES, RES, 3), i, np.uint8).tolist() for i in range(len(labels))]
    )
    return pa.table(
        {"image": pa.array(images, pa.list_(pa.list_(pa.list_(pa.uint8())))), "label": pa.array(labels, pa.int64())}
    )


@pytest.mark.usefixtures("ray_cluster")
def test_parquet_int_image_column_is_a_one_line_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image": pa.array([1, 2]), "label": pa.array([0, 1])}), tmp_path / "ids.parquet")
    with pytest.raises(ValueError, match=r"ids\.parquet: column 'image' has type int64; FIX THIS by writing") as e:
        parquet_shards(str(tmp_path), RES)
    _one_line(e)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("kind", ["bytes", "array"])
@pytest.mark.parametrize(("labels", "match"), [([0, None], "1 missing \\(null\\) labels"), ([0, -1], "negative")])
def test_parquet_null_or_negative_labels_fail_before_reading_naming_the_file(
    tmp_path: Path, kind: str, labels: list, match: str
) -> None:
    pq.write_table((_bytes_table if kind == "bytes" else _array_table)([0, 1]), tmp_path / "good.parquet")
    pq.write_table((_bytes_table if kind == "bytes" else _array_table)(labels), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=rf"bad\.parquet: column 'label' .*{match}") as e:
        parquet_shards(str(tmp_path), RES)
    _one_line(e)


@pytest.mark.usefixtures("ray_cluster")
def test_parquet_null_labels_without_footer_statistics_fail_in_the_task_naming_the_file(tmp_path: Path) -> None:
    pq.write_table(_bytes_table([0, None, 2]), tmp_path / "nostats.parquet", write_statistics=False)
    ds = parquet_shards(str(tmp_path), RES)  # nothing to see in the footer
    with pytest.raises(ray.exceptions.RayTaskError, match=r"nostats\.parquet: column 'label' has missing \(null\)"):
        ds.take_all()


@pytest.mark.usefixtures("ray_cluster")
def test_parquet_null_image_bytes_are_counted_skips(tmp_path: Path) -> None:
    table = _bytes_table([0, 1, 2])
    table = table.set_column(0, "image", pa.array([table["image"][0].as_py(), None, b"\xff\xd8junk"], pa.binary()))
    pq.write_table(table, tmp_path / "holes.parquet")
    log = SkipLog()
    rows = parquet_shards(str(tmp_path), RES, skip_log=log).take_all()
    assert [r["label"] for r in rows] == [0]
    reasons = sorted(s.reason for s in log.skipped())
    assert len(reasons) == 2 and reasons[1] == "missing (null) image value" and "cannot decode" in reasons[0]
    assert all("holes.parquet" in s.path for s in log.skipped())


@pytest.mark.usefixtures("ray_cluster")
def test_parquet_null_pixel_arrays_fail_before_reading_naming_the_file(tmp_path: Path) -> None:
    pq.write_table(_array_table([0, 1], [np.zeros((RES, RES, 3), np.uint8).tolist(), None]), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n\.parquet: column 'image' has 1 missing \(null\) pixel values") as e:
        parquet_shards(str(tmp_path), RES)
    _one_line(e)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("damage", ["truncated", "empty", "not_parquet"])
def test_unreadable_parquet_file_is_named(tmp_path: Path, damage: str) -> None:
    pq.write_table(_bytes_table([0, 1]), tmp_path / "good.parquet")
    full = (tmp_path / "good.parquet").read_bytes()
    data = {"truncated": full[: len(full) // 2], "empty": b"", "not_parquet": b"PAR1 but not really"}[damage]
    (tmp_path / "broken.parquet").write_bytes(data)
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable parquet file") as e:
        parquet_shards(str(tmp_path), RES)
    _one_line(e)


@pytest.mark.usefixtures("ray_cluster")
def test_parquet_ignores_hidden_and_underscore_paths(tmp_path: Path) -> None:
    pq.write_table(_array_table([0, 1]), tmp_path / "part-0.parquet")
    # Spark leaves half-written shards in _temporary/; editors and checksummers leave dot files.
    (tmp_path / "_temporary" / "0").mkdir(parents=True)
    (tmp_path / "_temporary" / "0" / "part-1.parquet").write_bytes(b"half a shard")
    (tmp_path / ".part-0.parquet").write_bytes(b"hidden copy")
    assert sorted(r["label"] for r in parquet_shards(str(tmp_path), RES).take_all()) == [0, 1]


@pytest.mark.usefixtures("ray_cluster")
def test_parquet_rows_of_different_sizes_fail_with_a_fix(tmp_path: Path) -> None:
    images = [np.zeros((RES, RES, 3), np.uint8).tolist(), np.zeros((RES + 2, RES, 3), np.uint8).tolist()]
    pq.write_table(_array_table([0, 1], images), tmp_path / "ragged.parquet")
    with pytest.raises(ray.exceptions.RayTaskError, match="images of different sizes.*FIX THIS"):
        parquet_shards(str(tmp_path), RES).take_all()


# -------------------------------------------------------------------------------- webdataset




@pytest.mark.usefixtures("ray_cluster")
def test_webdataset_cut_off_shard_is_named_and_negative_class_is_a_counted_skip(tmp_path: Path) -> None:
    png = _png(np.zeros((8, 8, 3), np.uint8))
    write_tar(tmp_path / "shard-0.tar", {"s0": {"png": png, "cls": b"1"}, "s1": {"png": png, "cls": b"-1"}})
    full = (tmp_path / "shard-0.tar").read_bytes()
    (tmp_path / "shard-1.tar").write_bytes(full[:700])
    with pytest.raises(ValueError, match=r"shard-1\.tar: 700 bytes is not a whole tar archive") as e:
        webdataset_shards(str(tmp_path), RES)
    _one_line(e)
    (tmp_path / "shard-1.tar").unlink()
    log = SkipLog()
    rows = webdataset_shards(str(tmp_path), RES, skip_log=log).take_all()
    assert [r["label"] for r in rows] == [1]
    (skipped,) = log.skipped()
    assert skipped.path.endswith("shard-0.tar:s1") and "class index >= 0" in skipped.reason
