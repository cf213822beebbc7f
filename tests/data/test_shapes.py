"""The built-in captioned `shapes` dataset: classes, captions, rendering, determinism, separability and the
Ray Dataset. Only the last test starts Ray."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from rayflow.data.shapes import (
    COLORS,
    NUM_CLASSES,
    NUM_TEMPLATES,
    PALETTE,
    SHAPES,
    attribute_agreement,
    attribute_table,
    attributes,
    caption,
    class_index,
    eval_prompts,
    parse_caption,
    render,
    shapes_arrays,
)
from rayflow.data.sources import shapes

# A pixel is part of an object when its brightest channel is well above black (the dimmest palette
# colour at the lowest brightness jitter still has a channel >= 0.85 * 230).
LIT = 100


def _nearest_color(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...,) index of the nearest PALETTE colour."""
    return np.argmin(((pixels[..., None, :].astype(np.float64) - PALETTE) ** 2).sum(-1), axis=-1)


# ----------------------------------------------------------------------------------- classes


def test_class_index_and_attributes_round_trip_over_all_classes() -> None:
    assert NUM_CLASSES == 144
    seen = set()
    table = attribute_table(np.arange(NUM_CLASSES))
    assert table.shape == (NUM_CLASSES, 4) and table.dtype == np.int64
    for label in range(NUM_CLASSES):
        a = attributes(label)
        assert set(a) == {"top_color", "top_shape", "bottom_color", "bottom_shape"}
        assert class_index(**a) == label
        assert tuple(table[label]) == (
            COLORS.index(a["top_color"]),
            SHAPES.index(a["top_shape"]),
            COLORS.index(a["bottom_color"]),
            SHAPES.index(a["bottom_shape"]),
        )
        seen.add(tuple(a.values()))
    assert len(seen) == NUM_CLASSES


def test_bad_attributes_and_labels_say_how_to_fix_them() -> None:
    with pytest.raises(ValueError, match=r"top_color='purple' is unknown; FIX THIS by using one of red, green"):
        class_index("purple", "circle", "red", "square")
    with pytest.raises(ValueError, match="bottom_shape='star'.*FIX THIS"):
        class_index("red", "circle", "red", "star")
    with pytest.raises(ValueError, match="outside 0..143; FIX THIS"):
        attributes(NUM_CLASSES)
    with pytest.raises(ValueError, match="outside 0..143; FIX THIS"):
        attribute_table(np.array([3, -1]))
    with pytest.raises(ValueError, match="dtype float64; FIX THIS"):
        attribute_table(np.array([1.0]))


# ----------------------------------------------------------------------------------- captions


def test_every_template_round_trips_through_parse_caption() -> None:
    for label in range(NUM_CLASSES):
        texts = {caption(label, t) for t in range(NUM_TEMPLATES)}
        assert len(texts) == NUM_TEMPLATES  # the templates are real paraphrases, not copies
        for text in texts:
            assert parse_caption(text) == label, text
            # case, spacing and a final full stop do not matter
            assert parse_caption(f"  {text.upper().replace(' ', '   ')}. ") == label


def test_parse_caption_reads_close_user_variants() -> None:
    expected = class_index("red", "circle", "blue", "square")
    for text in (
        "A red circle is above a blue square.",
        "the blue square is beneath the red circle",
        "red circle on top of blue square",
        "a blue square at the bottom, and a red circle at the top",
    ):
        assert parse_caption(text) == expected, text


@pytest.mark.parametrize(
    "text", ["a purple blob", "a red circle", "a red circle above a blue", "a red circle next to a blue square", ""]
)
def test_parse_caption_error_names_the_format_and_the_fix(text: str) -> None:
    with pytest.raises(ValueError, match=r"cannot parse caption .*colours: red, green, blue, yellow.*FIX THIS") as e:
        parse_caption(text)
    assert repr(text) in str(e.value)


def test_caption_rejects_an_unknown_template() -> None:
    with pytest.raises(ValueError, match=f"template={NUM_TEMPLATES} is out of range; FIX THIS"):
        caption(0, NUM_TEMPLATES)


# ----------------------------------------------------------------------------------- arrays


def test_shapes_arrays_is_deterministic_per_seed() -> None:
    images, labels, captions = shapes_arrays(200, 16, seed=3)
    assert images.shape == (200, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (200,) and labels.dtype == np.int64
    assert len(captions) == 200 and all(isinstance(c, str) for c in captions)
    again = shapes_arrays(200, 16, seed=3)
    assert images.tobytes() == again[0].tobytes()
    assert np.array_equal(labels, again[1]) and captions == again[2]
    other = shapes_arrays(200, 16, seed=4)
    assert images.tobytes() != other[0].tobytes() and not np.array_equal(labels, other[1])


def test_shapes_arrays_is_balanced_and_captions_match_labels() -> None:
    n = 3 * NUM_CLASSES + 10
    _, labels, captions = shapes_arrays(n, 16, seed=0)
    counts = Counter(labels.tolist())
    assert set(counts) == set(range(NUM_CLASSES))
    assert set(counts.values()) == {3, 4} and sum(v == 4 for v in counts.values()) == 10
    for start in range(0, 3 * NUM_CLASSES, NUM_CLASSES):  # every 144 consecutive rows cover all classes
        assert sorted(labels[start : start + NUM_CLASSES]) == list(range(NUM_CLASSES))
    assert [parse_caption(c) for c in captions] == labels.tolist()
    used = {t for lab, c in zip(labels, captions, strict=True) for t in range(NUM_TEMPLATES) if caption(lab, t) == c}
    assert used == set(range(NUM_TEMPLATES))


@pytest.mark.parametrize("res", [16, 32, 64])
def test_each_half_shows_its_objects_colour(res: int) -> None:
    images, labels, _ = shapes_arrays(300 * 16 // res, res, seed=1)  # ~ the same pixel count at every res
    table = attribute_table(labels)
    half = res // 2
    for part, rows, color_col in (("top", slice(0, half), 0), ("bottom", slice(half, res), 2)):
        region = images[:, rows]  # (N, half, res, 3)
        lit = region.max(axis=-1) >= LIT  # (N, half, res)
        area = lit.mean(axis=(1, 2))
        # an object 0.38-0.44 res wide in a 0.5 x 1 res half covers roughly 7-40 % of it (triangle..square)
        assert area.min() > 0.05 and area.max() < 0.45, (part, area.min(), area.max())
        # the mean colour of the lit pixels is the object's colour ...
        mean = (region * lit[..., None]).sum(axis=(1, 2)) / lit.sum(axis=(1, 2))[:, None]
        assert np.array_equal(_nearest_color(mean), table[:, color_col]), part
        # ... and so is every lit pixel: nothing of the other object leaks across the middle
        per_pixel = _nearest_color(region)
        assert np.all(~lit | (per_pixel == table[:, color_col, None, None])), part
    background = images.max(axis=-1) < LIT
    assert np.all(images[background] == 0)  # black background, no anti-aliasing halo


def test_render_varies_within_a_class_and_rejects_tiny_images() -> None:
    images = render(np.full(20, 7), 16, np.random.default_rng(0))
    assert len({im.tobytes() for im in images}) > 15  # jitter: one class, many different images
    with pytest.raises(ValueError, match="res=4 < 8 leaves objects of 2-3 px; FIX THIS"):
        render(np.array([0]), 4, np.random.default_rng(0))


def test_shapes_are_separable_by_linear_models_at_16px() -> None:
    """One linear classifier per attribute (ridge regression on one-hot targets, closed form in numpy: no
    sklearn import, which alone takes ~10 s on a loaded test box) on all raw pixels of 3000 16 px images:
    each attribute >= 0.95 on 1000 held-out images, and the class assembled from the four predictions
    >= 0.9 on the 144 classes. (One linear model over the 144 classes directly is not the right test: a
    class is a conjunction of attributes, which a linear model over pixels cannot express; sklearn's
    LogisticRegression reaches only ~0.75 that way.)"""
    (x_train, y_train, _), (x_test, y_test, _) = shapes_arrays(3000, 16, seed=0), shapes_arrays(1000, 16, seed=1)
    # Flattened pixels in [0, 1] plus a constant column for the bias: (N, 16 * 16 * 3 + 1).
    f_train, f_test = (np.c_[x.reshape(len(x), -1) / 255.0, np.ones(len(x))] for x in (x_train, x_test))
    gram = f_train.T @ f_train + np.eye(f_train.shape[1])  # ridge penalty 1.0: the Gram matrix is singular
    a_train, a_test = attribute_table(y_train), attribute_table(y_test)
    predicted = np.zeros_like(a_test)
    for col, names in enumerate((COLORS, SHAPES, COLORS, SHAPES)):
        weights = np.linalg.solve(gram, f_train.T @ np.eye(len(names))[a_train[:, col]])
        predicted[:, col] = (f_test @ weights).argmax(axis=1)
    pred_labels = np.array([class_index(COLORS[a], SHAPES[b], COLORS[c], SHAPES[d]) for a, b, c, d in predicted])
    scores = attribute_agreement(pred_labels, y_test)
    print("held-out agreement:", scores)
    assert min(scores[k] for k in ("top_color", "top_shape", "bottom_color", "bottom_shape")) >= 0.95, scores
    assert scores["all"] >= 0.9, scores


# ----------------------------------------------------------------------------------- evaluation


def test_eval_prompts_cycle_classes_and_templates() -> None:
    n = NUM_CLASSES * NUM_TEMPLATES
    labels, captions = eval_prompts(n, seed=0)
    assert labels.dtype == np.int64 and len(captions) == n
    assert sorted(labels[:NUM_CLASSES]) == list(range(NUM_CLASSES))
    assert [parse_caption(c) for c in captions] == labels.tolist()
    pairs = {
        (int(lab), t)
        for lab, c in zip(labels, captions, strict=True)
        for t in range(NUM_TEMPLATES)
        if caption(lab, t) == c
    }
    assert len(pairs) == n  # every class with every template exactly once
    again, other = eval_prompts(10, seed=0), eval_prompts(10, seed=1)
    assert np.array_equal(again[0], labels[:10]) and again[1] == captions[:10]
    assert not np.array_equal(other[0], labels[:10])


def test_attribute_agreement_on_a_hand_made_example() -> None:
    target = [class_index("red", "circle", "blue", "square")] * 4
    predicted = [
        class_index("red", "circle", "blue", "square"),  # exact
        class_index("green", "circle", "blue", "square"),  # top colour wrong
        class_index("red", "circle", "blue", "triangle"),  # bottom shape wrong
        class_index("yellow", "square", "red", "circle"),  # everything wrong
    ]
    assert attribute_agreement(np.array(predicted), np.array(target)) == {
        "top_color": 0.5,
        "top_shape": 0.75,
        "bottom_color": 0.75,
        "bottom_shape": 0.5,
        "all": 0.25,
    }
    with pytest.raises(ValueError, match="predicted has 2 labels and target 1; FIX THIS"):
        attribute_agreement(np.array([0, 1]), np.array([0]))


def test_importing_shapes_pulls_in_neither_torch_nor_ray() -> None:
    code = "import sys, rayflow.data.shapes; print(sorted({'torch', 'ray', 'rayflow.data.sources'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------- Ray


def test_shapes_ray_dataset_schema_and_rows(ray_cluster: dict) -> None:
    ds = shapes(res=16, n=256, num_blocks=4)
    assert ds.count() == 256
    schema = ds.schema()
    assert list(schema.names) == ["image", "label", "caption"]
    batch = ds.take_batch(256, batch_format="numpy")
    assert batch["image"].shape == (256, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int64
    types = dict(zip(schema.names, schema.types, strict=True))
    assert str(types["label"]) == "int64" and str(types["caption"]) == "string"
    assert "(16, 16, 3)" in str(types["image"]) and "uint8" in str(types["image"])
    images, labels, captions = shapes_arrays(256, 16, seed=0)
    assert np.array_equal(batch["image"], images) and np.array_equal(batch["label"], labels)
    assert list(batch["caption"]) == captions
