"""CLIP score on a tiny random CLIP checkpoint built and saved offline (no download, a few seconds of CPU)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from rayflow.evaluation.clip import CLIP_MEAN, CLIP_STD, ClipScorer, _mean_std, preprocess

from .tiny_clip import IMAGE_SIZE, MAX_POSITIONS, MEAN, STD, save_tiny_clip

CAPTIONS = ["a red square", "two cats on a mat", "the digit seven", "zebra", "blue sky over hills", "x"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny-clip"))
    save_tiny_clip(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(clip_dir: str) -> ClipScorer:
    return ClipScorer(clip_dir)


def _images(n: int, channels: int = 3, size: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def test_score_is_in_range_and_deterministic(scorer: ClipScorer):
    images = _images(len(CAPTIONS))
    first = scorer.score(images, CAPTIONS)
    assert set(first) == {"clip_score", "clip_score_std"}
    assert all(isinstance(v, float) for v in first.values())
    assert 0.0 <= first["clip_score"] <= 100.0 and first["clip_score_std"] >= 0.0
    assert scorer.score(images, CAPTIONS) == first
    # captions longer than the 16 text positions are truncated, not an error
    long = scorer.score(images[:2], ["a very long caption " * 5, "z" * 100])
    assert 0.0 <= long["clip_score"] <= 100.0


def test_score_matches_hand_computed_reference(scorer: ClipScorer, clip_dir: str):
    import transformers

    model = transformers.CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
    images, captions = _images(len(CAPTIONS), seed=3), CAPTIONS
    with torch.no_grad():
        x = F.interpolate((images + 1) / 2, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", antialias=True)
        x = (x.clamp(0, 1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        img = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
        tok = tokenizer(captions, padding=True, truncation=True, max_length=MAX_POSITIONS, return_tensors="pt")
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    cos = F.cosine_similarity(img, txt, dim=-1).double()
    expected = 100 * cos.clamp(min=0)
    assert (cos > 0).any() and (cos < 0).any(), "seeded model should exercise both sides of the clamp"
    torch.testing.assert_close(scorer.per_sample(images, captions), expected, atol=1e-4, rtol=0)
    for pair in ([0, 1], [i for i in range(len(CAPTIONS)) if cos[i] > 0][:2]):  # the brief's two-image case
        got = scorer.score(images[pair], [captions[i] for i in pair])
        assert got["clip_score"] == pytest.approx(float(expected[pair].mean()), abs=1e-4)
        assert got["clip_score_std"] == pytest.approx(float(expected[pair].std(correction=0)), abs=1e-4)


def test_score_is_invariant_to_batch_size(scorer: ClipScorer):
    images = _images(len(CAPTIONS), seed=5)
    one, all_ = scorer.score(images, CAPTIONS, batch=1), scorer.score(images, CAPTIONS, batch=64)
    assert one["clip_score"] == pytest.approx(all_["clip_score"], abs=1e-4)
    assert one["clip_score_std"] == pytest.approx(all_["clip_score_std"], abs=1e-4)
    torch.testing.assert_close(scorer.per_sample(images, CAPTIONS, batch=4),
                               scorer.per_sample(images, CAPTIONS, batch=1), atol=1e-4, rtol=0)


def test_gray_images_score_like_their_rgb_copies(scorer: ClipScorer):
    gray = _images(3, channels=1, size=32, seed=7)  # already at the model's size: no resize
    got = scorer.per_sample(gray, CAPTIONS[:3])
    torch.testing.assert_close(got, scorer.per_sample(gray.repeat(1, 3, 1, 1), CAPTIONS[:3]), atol=1e-6, rtol=0)
    assert ((got >= 0) & (got <= 100)).all()


def test_preprocess_shapes_and_stats_files(tmp_path):
    x = preprocess(_images(2, size=40)[:, :, :, :30], 32)  # non-square: short side -> 32, center crop
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert _mean_std(str(tmp_path)) == (CLIP_MEAN, CLIP_STD)
    # transformers 5 saves a processor's image settings nested in processor_config.json
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"image_mean": [0.1] * 3,
                                                                                     "image_std": [0.2] * 3}}))
    assert _mean_std(str(tmp_path)) == ((0.1,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match="FIX THIS"):
        preprocess(torch.zeros(1, 2, 8, 8), 32)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "no-tokenizer"])
def test_bad_folder_is_a_one_line_error(tmp_path, kind: str, request: pytest.FixtureRequest):
    folder = tmp_path / "clip"
    if kind != "missing":
        folder.mkdir()
    if kind == "garbage":
        (folder / "config.json").write_text("{not json")
    if kind == "no-tokenizer":  # transformers 5 would otherwise load an empty tokenizer without complaint
        source = request.getfixturevalue("clip_dir")
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(source, name), folder / name)
    with pytest.raises(ValueError) as err:
        ClipScorer(str(folder))
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg
    assert "FIX THIS by pointing eval.clip_model at a local CLIP folder (save_pretrained of a CLIP model)" in msg


def test_length_mismatch_is_a_clear_error(scorer: ClipScorer):
    with pytest.raises(ValueError, match=r"3 images but 2 captions; FIX THIS by"):
        scorer.score(_images(3), CAPTIONS[:2])
    with pytest.raises(ValueError, match="FIX THIS"):
        scorer.score(_images(1), "a single string")
