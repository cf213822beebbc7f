"""Text-image shards (LAION / CC3M / COCO captions) through the webdataset and parquet sources: captions,
optional classes, precomputed text-embedding pass-through, and the usual bad-input policy."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from rayflow.data.sources import SkipLog, parquet_shards, webdataset_shards
from rayflow.data.sources.decode import decode_rows
from rayflow.data.transforms import center_crop_resize

from .make_images import write_tar

RES = 16


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _images(n: int, seed: int, h: int = 20, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)




def _by_caption(ds: ray.data.Dataset) -> dict[str, dict[str, Any]]:
    rows = ds.take_all()
    assert len({r["caption"] for r in rows}) == len(rows), "test captions are distinct"
    return {r["caption"]: r for r in rows}


# -------------------------------------------------------------------------------------- webdataset


def test_webdataset_txt_captions_with_optional_cls_and_counted_skips(tmp_path: Path, ray_cluster: dict) -> None:
    imgs = _images(6, seed=0)
    png = [_encode(im, "PNG") for im in imgs]
    samples = {
        "s0": {"png": png[0], "txt": b"  a red square\n", "cls": b"2"},  # class used
        "s1": {"jpg": _encode(imgs[1], "JPEG"), "txt": "caf\u00e9 au lait".encode()},  # no .cls: -1
        "s2": {"png": png[2], "txt": b"bad class", "cls": b"cat"},  # invalid .cls: -1, still a sample
        "s3": {"png": png[3], "cls": b"1"},  # no caption: bad sample
        "s4": {"png": png[4], "txt": b"\xff\xfe not utf-8"},  # undecodable caption: bad sample
        "s5": {"png": png[5], "txt": b"", "cls": b"0"},  # an empty caption is a caption
    }
    write_tar(tmp_path / "shard-000.tar", samples)
    log = SkipLog()
    ds = webdataset_shards(str(tmp_path), RES, caption_key="txt", skip_log=log)
    rows = _by_caption(ds)
    assert {c: r["label"] for c, r in rows.items()} == {
        "a red square": 2,
        "caf\u00e9 au lait": -1,
        "bad class": -1,
        "": 0,
    }
    np.testing.assert_array_equal(rows["a red square"]["image"], center_crop_resize(imgs[0], RES))
    np.testing.assert_array_equal(rows[""]["image"], center_crop_resize(imgs[5], RES))
    assert rows["caf\u00e9 au lait"]["image"].shape == (RES, RES, 3)
    assert set(ds.schema().names) == {"image", "label", "caption"}
    skipped = {s.path.rsplit(":", 1)[1]: s.reason for s in log.skipped()}
    assert set(skipped) == {"s3", "s4"}
    assert "no .txt entry" in skipped["s3"] and "utf-8" in skipped["s4"]
    assert all(s.path.endswith((":s3", ":s4")) and "shard-000.tar" in s.path for s in log.skipped())


def test_webdataset_json_captions(tmp_path: Path, ray_cluster: dict) -> None:
    imgs = _images(6, seed=1)
    png = [_encode(im, "PNG") for im in imgs]
    meta = [
        {"caption": " a dog on a beach ", "url": "http://x/0.jpg"},
        {"text": "a cat", "width": 24},  # LAION-style metadata names it "text"
        {"url": "http://x/2.jpg"},  # no caption/text field
        None,  # invalid JSON
        ["a list"],  # JSON, but not an object
        {"caption": None, "text": "falls back to text"},
    ]
    samples = {}
    for i, m in enumerate(meta):
        samples[f"s{i}"] = {"png": png[i], "json": b"{not json" if m is None else json.dumps(m).encode()}
    samples["s1"]["cls"] = b"7"
    write_tar(tmp_path / "shard-000.tar", samples)
    log = SkipLog()
    rows = _by_caption(webdataset_shards(str(tmp_path), RES, caption_key="json", skip_log=log))
    assert {c: r["label"] for c, r in rows.items()} == {"a dog on a beach": -1, "a cat": 7, "falls back to text": -1}
    for caption, i in [("a dog on a beach", 0), ("a cat", 1), ("falls back to text", 5)]:
        np.testing.assert_array_equal(rows[caption]["image"], center_crop_resize(imgs[i], RES))
    skipped = {s.path.rsplit(":", 1)[1]: s.reason for s in log.skipped()}
    assert set(skipped) == {"s2", "s3", "s4"}
    assert "no string 'caption' or 'text' field" in skipped["s2"]
    assert "not valid JSON" in skipped["s3"]
    assert "not an object" in skipped["s4"]


def test_webdataset_caption_raise_names_the_sample(tmp_path: Path, ray_cluster: dict) -> None:
    png = _encode(_images(1, seed=2)[0], "PNG")
    write_tar(tmp_path / "shard-007.tar", {"good": {"png": png, "txt": b"fine"}, "nocap": {"png": png}})
    with pytest.raises(ray.exceptions.RayTaskError, match=r"shard-007\.tar:nocap: no \.txt entry") as info:
        webdataset_shards(str(tmp_path), RES, caption_key="txt", on_error="raise").take_all()
    assert "FIX THIS" in str(info.value)


# ----------------------------------------------------------------------------------------- parquet


def test_parquet_bytes_with_captions_and_no_label_column(tmp_path: Path, ray_cluster: dict) -> None:
    imgs = _images(5, seed=3)
    encoded = [_encode(im, "PNG") for im in imgs]
    encoded[2] = b"\x89PNG broken"
    captions = ["zero", "one", "two", None, "four"]  # row 3: null caption
    for i, part in enumerate([slice(0, 2), slice(2, 5)]):
        table = pa.table({"img": pa.array(encoded[part], pa.binary()), "txt": pa.array(captions[part], pa.string())})
        pq.write_table(table, tmp_path / f"part-{i}.parquet")
    log = SkipLog()
    ds = parquet_shards(str(tmp_path), RES, image_column="img", caption_column="txt", skip_log=log)
    rows = _by_caption(ds)
    assert set(rows) == {"zero", "one", "four"} and {r["label"] for r in rows.values()} == {-1}
    for caption, i in [("zero", 0), ("one", 1), ("four", 4)]:
        np.testing.assert_array_equal(rows[caption]["image"], center_crop_resize(imgs[i], RES))
    reasons = sorted(s.reason for s in log.skipped())
    assert len(reasons) == 2 and "cannot decode" in reasons[0] and "null" in reasons[1] and "'txt'" in reasons[1]
    assert all("part-1.parquet" in s.path for s in log.skipped())


def test_parquet_arrays_with_captions_labels_and_text_emb_pass_through(tmp_path: Path, ray_cluster: dict) -> None:
    imgs = _images(4, seed=4, h=RES, w=RES)
    emb = np.random.default_rng(5).standard_normal((4, 4, 8)).astype(np.float32)
    table = pa.table(
        {
            "image": pa.FixedSizeListArray.from_arrays(pa.array(imgs.reshape(-1)), RES * RES * 3),
            "label": pa.array([3, 1, 4, 1]),
            "caption": pa.array([f"c{i}" for i in range(4)]),
            "text_emb": pa.array([e.tolist() for e in emb], pa.list_(pa.list_(pa.float32()))),
        }
    )
    pq.write_table(table, tmp_path / "s.parquet")
    rows = _by_caption(parquet_shards(str(tmp_path), RES, caption_column="caption", embedding_columns=["text_emb"]))
    assert [rows[f"c{i}"]["label"] for i in range(4)] == [3, 1, 4, 1]
    for i in range(4):
        np.testing.assert_array_equal(rows[f"c{i}"]["image"], imgs[i])
        np.testing.assert_array_equal(np.stack(rows[f"c{i}"]["text_emb"]), emb[i])  # exact float32 values


def test_parquet_bytes_text_emb_stays_aligned_after_a_bad_image(tmp_path: Path, ray_cluster: dict) -> None:
    imgs = _images(5, seed=6)
    encoded = [_encode(im, "PNG") for im in imgs]
    encoded[1] = b"\xff\xd8 not a jpeg"
    emb = np.random.default_rng(7).standard_normal((5, 4, 8)).astype(np.float32)
    mask = np.tril(np.ones((5, 4), bool))[:, ::-1].copy()
    table = pa.table(
        {
            "image": pa.array(encoded, pa.binary()),
            "caption": pa.array([f"c{i}" for i in range(5)]),
            "text_emb": pa.array([e.tolist() for e in emb], pa.list_(pa.list_(pa.float32()))),
            "text_mask": pa.array([m.tolist() for m in mask], pa.list_(pa.bool_())),
        }
    )
    pq.write_table(table, tmp_path / "s.parquet")
    log = SkipLog()
    ds = parquet_shards(
        str(tmp_path), RES, caption_column="caption", embedding_columns=("text_emb", "text_mask"), skip_log=log
    )
    rows = _by_caption(ds)
    assert set(rows) == {"c0", "c2", "c3", "c4"} and len(log.skipped()) == 1
    for i in (0, 2, 3, 4):
        r = rows[f"c{i}"]
        np.testing.assert_array_equal(r["image"], center_crop_resize(imgs[i], RES))
        assert r["text_emb"].dtype == np.float32 and r["text_emb"].shape == (4, 8)
        np.testing.assert_array_equal(r["text_emb"], emb[i])
        np.testing.assert_array_equal(r["text_mask"], mask[i])


def test_parquet_caption_and_embedding_column_errors_name_file_and_column(tmp_path: Path, ray_cluster: dict) -> None:
    png = pa.array([_encode(_images(1, seed=8)[0], "PNG")], pa.binary())

    def shard(name: str, **columns: pa.Array) -> str:
        pq.write_table(pa.table({"image": png, **columns}), tmp_path / name)
        return str(tmp_path / name)

    path = shard("nocap.parquet", label=pa.array([0]))
    with pytest.raises(ValueError, match=r"nocap\.parquet: no column 'caption'.*FIX THIS") as info:
        parquet_shards(path, RES, caption_column="caption")
    assert "\n" not in str(info.value)
    path = shard("intcap.parquet", caption=pa.array([5]))
    with pytest.raises(ValueError, match=r"intcap\.parquet: column 'caption' has type int64; FIX THIS") as info:
        parquet_shards(path, RES, caption_column="caption")
    assert "\n" not in str(info.value)
    path = shard("noemb.parquet", caption=pa.array(["a"]))
    with pytest.raises(ValueError, match=r"noemb\.parquet: no column 'text_emb'.*FIX THIS"):
        parquet_shards(path, RES, caption_column="caption", embedding_columns=["text_emb"])
    path = shard("stremb.parquet", caption=pa.array(["a"]), text_emb=pa.array([["x", "y"]]))
    with pytest.raises(
        ValueError, match=r"stremb\.parquet: column 'text_emb' has type list<.*string>, not numeric.*FIX THIS"
    ):
        parquet_shards(path, RES, caption_column="caption", embedding_columns=["text_emb"])
    with pytest.raises(ValueError, match="one string"):
        parquet_shards(path, RES, caption_column="caption", embedding_columns="text_emb")
    with pytest.raises(ValueError, match=r"\['caption'\] repeat a name or clash"):
        parquet_shards(path, RES, caption_column="caption", embedding_columns=["caption"])
    # Without caption mode the label column is still required.
    with pytest.raises(ValueError, match=r"stremb\.parquet: no column 'label'"):
        parquet_shards(path, RES)


def test_parquet_label_column_in_some_caption_shards_only_is_an_error(tmp_path: Path, ray_cluster: dict) -> None:
    png = pa.array([_encode(_images(1, seed=9)[0], "PNG")], pa.binary())
    pq.write_table(pa.table({"image": png, "caption": pa.array(["a"]), "label": pa.array([1])}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": png, "caption": pa.array(["b"])}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"'label' is in some shards but not in others.*b\.parquet does not"):
        parquet_shards(str(tmp_path), RES, caption_column="caption")


def test_decode_rows_with_every_row_skipped_keeps_caption_and_pass_through_columns() -> None:
    emb = np.ones((4, 8), np.float32)
    rows = [("x", b"junk", -1, None, "a caption", (emb,))]
    table = decode_rows(
        rows,
        res=4,
        channels=3,
        crop="adm",
        on_error="skip",
        skip_log=None,
        with_captions=True,
        extra_columns=["text_emb"],
    )
    assert table.num_rows == 0 and table.column_names == ["image", "label", "caption", "text_emb"]
    assert table.schema.field("caption").type == pa.string()
    assert table.column("text_emb").type.shape == (4, 8)
