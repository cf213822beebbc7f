"""Sources on data the tests write: image folder, parquet (bytes / arrays), webdataset, built-ins."""

from __future__ import annotations

import io
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from rayflow.data.sources import (
    SkipLog,
    digits,
    find_classes,
    image_folder,
    make_source,
    mnist,
    parquet_shards,
    webdataset_shards,
)
from rayflow.data.transforms import center_crop_resize, decode_image

from .make_images import ImageFolderSpec

pytestmark = pytest.mark.usefixtures("ray_cluster")
RES = 16


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rows(ds: ray.data.Dataset) -> list[dict]:
    return list(ds.iter_rows())


def _read_fused_with_decode(ds: ray.data.Dataset, capsys: pytest.CaptureFixture) -> bool:
    """Whether Ray runs the source's read and decode as one task (an unfused decode gets the encoded bytes through
    the object store: benchmarks/README.md, "Ingest")."""
    capsys.readouterr()
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[-1]
    return re.search(r"\[Read\w*->MapBatches\(decode_in_chunks\)", optimized) is not None


def _images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------- image folder


def test_find_classes_sorted(image_folder_spec: ImageFolderSpec) -> None:
    assert find_classes(str(image_folder_spec.root)) == image_folder_spec.classes


def test_image_folder_decodes_every_good_file_and_skips_the_truncated_one(
    image_folder_spec: ImageFolderSpec, capsys: pytest.CaptureFixture
) -> None:
    log = SkipLog()
    ds = image_folder(str(image_folder_spec.root), RES, skip_log=log, include_paths=True)
    assert _read_fused_with_decode(ds, capsys)
    rows = _rows(ds)
    got = {r["path"]: r for r in rows}
    assert got.keys() == image_folder_spec.labels.keys()
    for path, row in got.items():
        assert row["label"] == image_folder_spec.labels[path]
        assert row["image"].shape == (RES, RES, 3) and row["image"].dtype == np.uint8
    # lossless files: exactly the crop of the original pixels (PNG named .JPEG included)
    for path, pixels in image_folder_spec.pixels.items():
        np.testing.assert_array_equal(got[path]["image"], center_crop_resize(pixels, RES))
    gray = next(r["image"] for p, r in got.items() if p.endswith("e_gray.JPEG"))
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    skipped = log.skipped()
    assert [s.path for s in skipped] == image_folder_spec.bad
    assert "truncated" in skipped[0].reason


def test_image_folder_one_channel(image_folder_spec: ImageFolderSpec) -> None:
    rows = _rows(image_folder(str(image_folder_spec.root), 8, channels=1))
    assert len(rows) == image_folder_spec.num_good
    assert all(r["image"].shape == (8, 8, 1) for r in rows)


def test_image_folder_raise_policy_names_the_bad_file(image_folder_spec: ImageFolderSpec) -> None:
    # Ray 2.60 surfaces a UDF's ValueError as RayTaskError(UserCodeException) with the text kept.
    with pytest.raises(ray.exceptions.RayTaskError, match="h_truncated.JPEG") as info:
        _rows(image_folder(str(image_folder_spec.root), RES, on_error="raise"))
    assert "FIX THIS" in str(info.value)


def test_image_folder_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(_png(_images(1, 4, 4, 0)[0]))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"\['b'\].*FIX THIS"):
        image_folder(str(tmp_path), RES)
    with pytest.raises(ValueError, match="does not exist"):
        image_folder(str(tmp_path / "missing"), RES)


# ---------------------------------------------------------------------------------------- parquet


def test_parquet_with_encoded_bytes_decodes_and_skips_corrupt_values(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    imgs = _images(6, 20, 30, seed=1)
    encoded = [_png(im) for im in imgs]
    encoded[4] = b"\x89PNG broken"
    for i, part in enumerate([slice(0, 3), slice(3, 6)]):
        table = pa.table(
            {"image": pa.array(encoded[part], pa.binary()), "label": pa.array(range(part.start, part.stop))}
        )
        pq.write_table(table, tmp_path / f"part-{i}.parquet")
    log = SkipLog()
    ds = parquet_shards(str(tmp_path), RES, skip_log=log)
    assert _read_fused_with_decode(ds, capsys)
    rows = sorted(_rows(ds), key=lambda r: r["label"])
    assert [r["label"] for r in rows] == [0, 1, 2, 3, 5]
    for r in rows:
        np.testing.assert_array_equal(r["image"], center_crop_resize(imgs[r["label"]], RES))
    skipped = log.skipped()
    assert len(skipped) == 1 and "part-1.parquet" in skipped[0].path and "label 4" in skipped[0].path


@pytest.mark.parametrize("layout", ["fixed_size_list", "nested_list"])
def test_parquet_with_pixel_arrays(tmp_path: Path, layout: str) -> None:
    imgs = _images(5, RES, RES, seed=2)
    if layout == "fixed_size_list":
        column = pa.FixedSizeListArray.from_arrays(pa.array(imgs.reshape(-1)), RES * RES * 3)
    else:
        column = pa.array([im.astype(np.int64).tolist() for im in imgs])  # list<list<list<int64>>>
    pq.write_table(pa.table({"image": column, "label": pa.array(np.arange(5) % 2)}), tmp_path / "s.parquet")
    rows = _rows(parquet_shards(str(tmp_path / "s.parquet"), RES))
    assert len(rows) == 5
    by_pixels = {r["image"].tobytes(): r["label"] for r in rows}
    assert by_pixels == {im.tobytes(): i % 2 for i, im in enumerate(imgs)}
    assert all(r["image"].dtype == np.uint8 and r["image"].shape == (RES, RES, 3) for r in rows)


def test_parquet_arrays_of_another_size_are_cropped_and_resized(tmp_path: Path) -> None:
    imgs = _images(3, 20, 24, seed=3)
    table = pa.table(
        {
            "image": pa.array([im.tolist() for im in imgs], pa.list_(pa.list_(pa.list_(pa.uint8())))),
            "label": pa.array([0, 1, 2]),
        }
    )
    pq.write_table(table, tmp_path / "s.parquet")
    rows = sorted(_rows(parquet_shards(str(tmp_path), RES)), key=lambda r: r["label"])
    for r in rows:
        np.testing.assert_array_equal(r["image"], center_crop_resize(imgs[r["label"]], RES))


def test_parquet_missing_or_wrong_typed_columns_name_file_and_column(tmp_path: Path) -> None:
    good = pa.array([_png(_images(1, 8, 8, 0)[0])], pa.binary())
    pq.write_table(pa.table({"image": good}), tmp_path / "nolabel.parquet")
    with pytest.raises(ValueError, match=r"nolabel\.parquet.*no column 'label'"):
        parquet_shards(str(tmp_path / "nolabel.parquet"), RES)
    pq.write_table(pa.table({"img": good, "label": pa.array([0])}), tmp_path / "renamed.parquet")
    with pytest.raises(ValueError, match=r"renamed\.parquet.*no column 'image'.*\['img', 'label'\]"):
        parquet_shards(str(tmp_path / "renamed.parquet"), RES)
    pq.write_table(pa.table({"image": pa.array(["a.jpg"]), "label": pa.array([0])}), tmp_path / "strings.parquet")
    with pytest.raises(ValueError, match=r"strings\.parquet.*column 'image' has type string"):
        parquet_shards(str(tmp_path / "strings.parquet"), RES)
    pq.write_table(pa.table({"image": good, "label": pa.array(["cat"])}), tmp_path / "strlabel.parquet")
    with pytest.raises(ValueError, match=r"strlabel\.parquet.*column 'label' has type string"):
        parquet_shards(str(tmp_path / "strlabel.parquet"), RES)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8 * 8 * 3, np.uint8)), 8 * 8 * 3)
    pq.write_table(pa.table({"image": flat, "label": pa.array([0])}), tmp_path / "flat8.parquet")
    with pytest.raises(ValueError, match=r"flat8\.parquet.*'image'.*res=16"):
        parquet_shards(str(tmp_path / "flat8.parquet"), RES)
    with pytest.raises(ValueError, match="no .parquet files"):
        parquet_shards(str(tmp_path / "nowhere"), RES)


def test_parquet_file_shuffle_is_seeded_and_redrawn_every_epoch(tmp_path: Path) -> None:
    imgs = _images(8, RES, RES, seed=5)
    for i, im in enumerate(imgs):
        column = pa.FixedSizeListArray.from_arrays(pa.array(im.reshape(-1)), RES * RES * 3)
        pq.write_table(pa.table({"image": column, "label": pa.array([i])}), tmp_path / f"s{i}.parquet")

    def two_epochs(seed: int) -> list[list[int]]:
        ds = parquet_shards(str(tmp_path), RES, file_shuffle_seed=seed)
        ds.context.execution_options.preserve_order = True
        return [ds.take_batch(100, batch_format="numpy")["label"].tolist() for _ in range(2)]

    first, again = two_epochs(3), two_epochs(3)
    assert first == again
    assert first[0] != first[1] and sorted(first[0]) == list(range(8))


# ------------------------------------------------------------------------------------- webdataset


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, entries in samples:
            for suffix, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_mixed_jpg_png_and_a_sample_without_label(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    imgs = _images(7, 24, 20, seed=4)
    samples = []
    for i, im in enumerate(imgs):
        entries = {"png": _png(im)} if i % 2 else {"jpg": _jpeg_bytes(im)}
        if i != 6:
            entries["cls"] = str(i % 3).encode()
        samples.append((f"sample{i:03d}", entries))
    _write_tar(tmp_path / "shard-000.tar", samples[:4])
    _write_tar(tmp_path / "shard-001.tar", samples[4:])
    log = SkipLog()
    ds = webdataset_shards(str(tmp_path), RES, skip_log=log)
    assert _read_fused_with_decode(ds, capsys)
    rows = _rows(ds)
    assert Counter(r["label"] for r in rows) == Counter(i % 3 for i in range(6))
    png_rows = {r["image"].tobytes() for r in rows}
    for i in (1, 3, 5):  # PNG samples are lossless: exact pixels
        assert center_crop_resize(imgs[i], RES).tobytes() in png_rows
    skipped = log.skipped()
    assert len(skipped) == 1 and skipped[0].path.endswith("shard-001.tar:sample006") and ".cls" in skipped[0].reason


def _jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue()


# -------------------------------------------------------------------------------------- built-ins


def test_mnist_offline_shapes_labels_and_padding() -> None:
    ds = mnist(res=32)
    labels = np.zeros(10, int)
    n = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=1000):
        img = batch["image"]
        assert img.shape[1:] == (32, 32, 1) and img.dtype == np.uint8
        assert img[:, :2].max() == 0 and img[:, -2:].max() == 0 and img[:, :, :2].max() == 0  # zero border
        assert img.max() == 255
        labels += np.bincount(batch["label"], minlength=10)
        n += len(img)
    assert n == 5000 and labels.tolist() == [500] * 10
    first = ds.take(20)
    assert len({r["label"] for r in first}) > 3  # shuffled once, not sorted by class
    small = mnist(res=16).take_batch(5000, batch_format="numpy")
    assert small["image"].shape == (5000, 16, 16, 1) and small["image"].max() > 200
    # downsampling keeps the digit in the centre: the border stays (nearly) black
    assert small["image"][:, 0].mean() < 5 and small["image"][:, 6:10, 6:10].mean() > 40
    with pytest.raises(ValueError, match="res >= 4"):
        mnist(res=2)


def test_digits_offline_matches_sklearn() -> None:
    from sklearn.datasets import load_digits

    batch = digits(res=16).take_batch(2000, batch_format="numpy")
    assert batch["image"].shape == (1797, 16, 16, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int64
    assert Counter(batch["label"].tolist()) == Counter(load_digits().target.tolist())
    assert batch["image"].max() >= 250


# ------------------------------------------------------------------------------------- dispatcher


def test_make_source_dispatches_and_explains_mistakes(image_folder_spec: ImageFolderSpec) -> None:
    ds = make_source("image_folder", root=str(image_folder_spec.root), res=8)
    assert ds.count() == image_folder_spec.num_good
    with pytest.raises(ValueError, match="kind='cifar'.*'digits'.*'webdataset'"):
        make_source("cifar")
    with pytest.raises(TypeError, match="make_source\\('mnist'\\).*root"):
        make_source("mnist", root="/data")


def test_decode_image_is_used_by_sources_for_png_named_jpeg(image_folder_spec: ImageFolderSpec) -> None:
    # Guard for the fixture itself: the .JPEG-named PNG really is a PNG.
    path = next(p for p in image_folder_spec.pixels if p.endswith("f_png_named.JPEG"))
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_image(data), image_folder_spec.pixels[path])
