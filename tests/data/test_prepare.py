"""prepare(): ImageNet-layout folder -> shards + manifest -> sources read back the same images."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayflow.data.sources import image_folder, parquet_shards, webdataset_shards
from rayflow.prepare import main, prepare

from .make_images import ImageFolderSpec

pytestmark = pytest.mark.usefixtures("ray_cluster")
RES = 16


def _pixels_and_labels(ds) -> Counter:
    batch = ds.take_batch(10_000, batch_format="numpy")
    return Counter(zip((im.tobytes() for im in batch["image"]), batch["label"].tolist(), strict=True))


def _shard_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.read_metadata(path).num_rows
    with tarfile.open(path) as tar:
        return sum(name.endswith(".cls") for name in tar.getnames())


@pytest.fixture(scope="module")
def folder_rows(image_folder_spec: ImageFolderSpec) -> Counter:
    return _pixels_and_labels(image_folder(str(image_folder_spec.root), RES))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_prepare_round_trip(fmt: str, image_folder_spec: ImageFolderSpec, folder_rows: Counter, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = prepare(str(image_folder_spec.root), str(out), RES, fmt, shard_size=4)

    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == image_folder_spec.num_good == 11
    assert manifest["classes"] == image_folder_spec.classes
    expected_counts = Counter(image_folder_spec.labels.values())
    assert manifest["class_counts"] == {c: expected_counts[i] for i, c in enumerate(image_folder_spec.classes)}
    assert manifest["num_skipped"] == 1
    assert manifest["skipped"][0]["path"] == image_folder_spec.bad[0]
    assert "truncated" in manifest["skipped"][0]["reason"]
    assert manifest["res"] == RES and manifest["format"] == fmt
    assert all(s.startswith("shard-") for s in manifest["shards"])
    sizes = [_shard_rows(out / s) for s in manifest["shards"]]
    assert sum(sizes) == 11 and len(sizes) >= 3  # about 4 per shard
    assert max(sizes) <= (4 if fmt == "parquet" else 8)

    read = parquet_shards if fmt == "parquet" else webdataset_shards
    # Shards are stored losslessly (uint8 tensors / PNG): every image comes back bit-identical.
    assert _pixels_and_labels(read(str(out), RES)) == folder_rows


def test_prepare_refuses_a_non_empty_output(image_folder_spec: ImageFolderSpec, tmp_path: Path) -> None:
    (tmp_path / "old.parquet").write_bytes(b"stale")
    with pytest.raises(ValueError, match="not empty"):
        prepare(str(image_folder_spec.root), str(tmp_path), RES)
    with pytest.raises(ValueError, match="format="):
        prepare(str(image_folder_spec.root), str(tmp_path / "new"), RES, "tfrecord")  # type: ignore[arg-type]


def test_cli_prints_a_json_summary(
    image_folder_spec: ImageFolderSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    out.mkdir()  # an existing but empty folder is fine
    argv = ["--src", str(image_folder_spec.root), "--out", str(out), "--res", "8", "--shard-size", "100"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_images"] == 11 and summary["num_skipped"] == 1 and summary["shards"] >= 1
    shard = parquet_shards(str(out), 8).take_batch(100, batch_format="numpy")
    assert shard["image"].shape == (11, 8, 8, 3) and shard["image"].dtype == np.uint8
