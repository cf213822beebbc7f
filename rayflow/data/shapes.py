"""`shapes`: a synthetic, offline, captioned text-to-image dataset whose captions can be checked.

Each image is a black `res x res` RGB scene with two objects, one in the top half and one in the bottom
half; each object has a colour (COLORS) and a shape (SHAPES). The attribute tuple (top colour, top shape,
bottom colour, bottom shape) is one of NUM_CLASSES = 144 classes, and each sample carries a caption that
states all four attributes in one of NUM_TEMPLATES paraphrases ("a red circle above a blue square",
"a blue square below a red circle", ...).

What it is for: text-to-image demos and tests that need no download, and an evaluation that asks whether
a generated image follows its prompt. A classifier trained on these images predicts a class for a
generated image; `attribute_agreement` then scores it against the class `parse_caption` reads from the
prompt (per attribute and for the whole caption). The classes are separable by design: objects are
0.38-0.44 of `res` in size, drawn without anti-aliasing in saturated colours, with small jitter of
position, size and brightness so that images of one class still vary.

Pure numpy, no Ray: the Ray Dataset of these scenes is the built-in source `rayflow.data.sources.shapes`.
"""

from __future__ import annotations

import re

import numpy as np

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
NUM_CLASSES = (len(COLORS) * len(SHAPES)) ** 2  # 144
ATTRIBUTE_KEYS = ("top_color", "top_shape", "bottom_color", "bottom_shape")

# Saturated, well separated in RGB so that a colour survives a 16 px render and a blurry generated image.
PALETTE = np.array(
    [
        (230, 40, 40),  # red
        (40, 200, 60),  # green
        (50, 80, 230),  # blue
        (230, 210, 40),  # yellow
    ],
    dtype=np.float64,
)

# Every template states all four attributes; {tc} {ts} = top colour/shape, {bc} {bs} = bottom colour/shape.
TEMPLATES = (
    "a {tc} {ts} above a {bc} {bs}",
    "a {bc} {bs} below a {tc} {ts}",
    "a {tc} {ts} on top of a {bc} {bs}",
    "{tc} {ts} over {bc} {bs}",
    "a {bc} {bs} under a {tc} {ts}",
    "a {tc} {ts} at the top and a {bc} {bs} at the bottom",
)
NUM_TEMPLATES = len(TEMPLATES)

MIN_RES = 8  # below this an object is 2-3 px and shapes are meaningless; 16 is the smallest tested size

# Object geometry as fractions of res (so one seed gives the same scene at every res). Size 0.38-0.44
# keeps shapes apart at 16 px (6-7 px objects) and leaves each object inside its 0.5-res half.
_SIZE_RANGE = (0.38, 0.44)
_X_JITTER = 0.12  # centre x in 0.5 +- this
_BRIGHTNESS_RANGE = (0.85, 1.0)
# Images rendered per vectorised chunk: bounds the (chunk, res, res) temporaries to a few MB at res 64.
_RENDER_CHUNK = 512


# ---------------------------------------------------------------------------------------------------
# Classes and attributes
# ---------------------------------------------------------------------------------------------------


def _index_of(value: str, names: tuple[str, ...], what: str) -> int:
    try:
        return names.index(value)
    except ValueError:
        raise ValueError(f"{what}={value!r} is unknown; FIX THIS by using one of {', '.join(names)}") from None


def class_index(top_color: str, top_shape: str, bottom_color: str, bottom_shape: str) -> int:
    """The class index (0..NUM_CLASSES-1) of a scene's four attributes."""
    tc = _index_of(top_color, COLORS, "top_color")
    ts = _index_of(top_shape, SHAPES, "top_shape")
    bc = _index_of(bottom_color, COLORS, "bottom_color")
    bs = _index_of(bottom_shape, SHAPES, "bottom_shape")
    return ((tc * len(SHAPES) + ts) * len(COLORS) + bc) * len(SHAPES) + bs


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels have dtype {labels.dtype}; FIX THIS by passing integer class indices "
            f"(0..{NUM_CLASSES - 1}), e.g. from class_index() or parse_caption()"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"labels span {labels.min()}..{labels.max()}, outside 0..{NUM_CLASSES - 1}; FIX THIS by passing "
            "shapes class indices (label -1, 'no class', has no attributes)"
        )
    return labels.astype(np.int64)


def attribute_table(labels: np.ndarray) -> np.ndarray:
    """(N,) class indices -> (N, 4) int64 [top colour, top shape, bottom colour, bottom shape] indices
    into COLORS / SHAPES."""
    labels = _check_labels(labels).reshape(-1)
    rest, bs = np.divmod(labels, len(SHAPES))
    rest, bc = np.divmod(rest, len(COLORS))
    tc, ts = np.divmod(rest, len(SHAPES))
    return np.stack([tc, ts, bc, bs], axis=1)


def attributes(label: int) -> dict[str, str]:
    """The attribute names of one class: keys top_color, top_shape, bottom_color, bottom_shape."""
    tc, ts, bc, bs = _attribute_ids(label)
    return {"top_color": COLORS[tc], "top_shape": SHAPES[ts], "bottom_color": COLORS[bc], "bottom_shape": SHAPES[bs]}


def _attribute_ids(label: int) -> tuple[int, int, int, int]:
    # Scalar twin of attribute_table in plain ints: captions for 20k rows call it 20k times.
    if isinstance(label, bool) or not isinstance(label, int | np.integer):
        raise ValueError(f"label={label!r} is not an integer; FIX THIS by passing a class index")
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label={label} is outside 0..{NUM_CLASSES - 1}; FIX THIS by passing a shapes class index")
    rest, bs = divmod(int(label), len(SHAPES))
    rest, bc = divmod(rest, len(COLORS))
    tc, ts = divmod(rest, len(SHAPES))
    return tc, ts, bc, bs


# ---------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------


def caption(label: int, template: int = 0) -> str:
    """The caption of class `label` written with TEMPLATES[template]."""
    if not 0 <= template < NUM_TEMPLATES:
        raise ValueError(f"template={template} is out of range; FIX THIS by using 0..{NUM_TEMPLATES - 1}")
    tc, ts, bc, bs = _attribute_ids(label)
    return TEMPLATES[template].format(tc=COLORS[tc], ts=SHAPES[ts], bc=COLORS[bc], bs=SHAPES[bs])


def _phrase(slot: str) -> str:
    # An optional article, then "<colour> <shape>"; named groups tell the top object from the bottom one.
    return rf"(?:(?:a|an|the|one)\s+)?(?P<{slot}c>{'|'.join(COLORS)})\s+(?P<{slot}s>{'|'.join(SHAPES)})"


_TOP, _BOTTOM = _phrase("t"), _phrase("b")
_IS = r"(?:(?:is|sits)\s+)?"  # "a red circle is above a blue square"
# Each pattern inverts one or more TEMPLATES and accepts a few close variants a user might write.
_CAPTION_PATTERNS = tuple(
    re.compile(rf"^{p}$")
    for p in (
        rf"{_TOP}\s+{_IS}(?:above|over|on\s+top\s+of|atop)\s+{_BOTTOM}",
        rf"{_BOTTOM}\s+{_IS}(?:below|under|underneath|beneath)\s+{_TOP}",
        rf"{_TOP}\s+(?:at|on)\s+the\s+top\s*,?\s+and\s+{_BOTTOM}\s+(?:at|on)\s+the\s+bottom",
        rf"{_BOTTOM}\s+(?:at|on)\s+the\s+bottom\s*,?\s+and\s+{_TOP}\s+(?:at|on)\s+the\s+top",
    )
)


def parse_caption(text: str) -> int:
    """The class index a caption states; inverts every template (case, spacing and a final '.' ignored).

    Raises ValueError on text that does not name two "<colour> <shape>" objects joined by a relation.
    """
    norm = " ".join(str(text).lower().split()).rstrip(".!").strip()
    for pattern in _CAPTION_PATTERNS:
        m = pattern.match(norm)
        if m:
            return class_index(m["tc"], m["ts"], m["bc"], m["bs"])
    raise ValueError(
        f"cannot parse caption {text!r}: a shapes caption names two '<colour> <shape>' objects joined by "
        f"above/over/on top of/below/under (colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}); "
        f"FIX THIS by writing it like one of rayflow.data.shapes.TEMPLATES, e.g. {caption(0)!r}"
    )


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def _object_masks(shape_ids: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: np.ndarray, res: int) -> np.ndarray:
    """(M,) shape ids and geometry in pixels -> (M, res, res) bool masks, sampled at pixel centres
    (no anti-aliasing: edges stay crisp and colours pure at 16 px)."""
    grid = np.arange(res, dtype=np.float32) + 0.5
    masks = np.zeros((len(shape_ids), res, res), dtype=bool)
    for shape_id in range(len(SHAPES)):
        idx = np.flatnonzero(shape_ids == shape_id)
        if idx.size == 0:
            continue
        x = grid[None, None, :] - cx[idx, None, None].astype(np.float32)  # (m, 1, res) offsets from the centre
        y = grid[None, :, None] - cy[idx, None, None].astype(np.float32)  # (m, res, 1)
        half = (size[idx] / 2).astype(np.float32)[:, None, None]
        if SHAPES[shape_id] == "circle":
            masks[idx] = x**2 + y**2 <= half**2
        elif SHAPES[shape_id] == "square":
            masks[idx] = (np.abs(x) <= half) & (np.abs(y) <= half)
        else:
            # Upward isosceles triangle in the size x size box: apex at the top centre, base along the
            # bottom; its half-width grows linearly from 0 (apex, y=-half) to half (base, y=+half).
            masks[idx] = (np.abs(y) <= half) & (np.abs(x) <= (y + half) / 2)
    return masks


def render(labels: np.ndarray, res: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one scene per class index: uint8 (N, res, res, 3), black background.

    Jitter (position, size, brightness) comes from `rng` in a fixed order and in fractions of res, so
    the same rng state gives the same scenes at any res.
    """
    labels = _check_labels(labels).reshape(-1)
    if res < MIN_RES:
        raise ValueError(
            f"res={res} < {MIN_RES} leaves objects of 2-3 px; FIX THIS by using res >= {MIN_RES} (16 or more keeps "
            "shapes apart)"
        )
    n = len(labels)
    attrs = attribute_table(labels)  # (N, 4)
    # Draw every random number up front (per object: size, x, y, brightness) so that chunking below
    # cannot change the result.
    size = rng.uniform(*_SIZE_RANGE, size=(n, 2))
    cx = 0.5 + rng.uniform(-_X_JITTER, _X_JITTER, size=(n, 2))
    # The centre y moves within its half as far as the object still fits inside that half.
    slack = 0.5 - size
    cy = np.array([0.25, 0.75]) + rng.uniform(-0.5, 0.5, size=(n, 2)) * slack
    bright = rng.uniform(*_BRIGHTNESS_RANGE, size=(n, 2))

    out = np.zeros((n, res, res, 3), dtype=np.uint8)
    for lo in range(0, n, _RENDER_CHUNK):
        sl = slice(lo, min(lo + _RENDER_CHUNK, n))
        for k, (col, shp) in enumerate(((0, 1), (2, 3))):  # top object, bottom object
            s = size[sl, k] * res
            masks = _object_masks(attrs[sl, shp], cx[sl, k] * res, cy[sl, k] * res, s, res)
            color = np.round(PALETTE[attrs[sl, col]] * bright[sl, k, None]).astype(np.uint8)  # (m, 3)
            # The halves never overlap, so painting the bottom object after the top one loses nothing.
            # Boolean indexing walks pixels in image order: image i's pixels get color[i], repeated.
            out[sl][masks] = np.repeat(color, masks.sum(axis=(1, 2)), axis=0)
    return out


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------


def shapes_arrays(n: int, res: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n samples as (images uint8 (n, res, res, 3), labels int64 (n,), captions); deterministic in
    (n, res, seed). Labels cycle a seeded permutation of the classes (every class n // 144 or one more
    times, every 144 consecutive rows cover all classes); each caption uses a randomly drawn template."""
    if n < 1:
        raise ValueError(f"n={n} samples is empty; FIX THIS by asking for n >= 1")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(NUM_CLASSES)[np.arange(n) % NUM_CLASSES].astype(np.int64)
    templates = rng.integers(NUM_TEMPLATES, size=n)
    captions = [caption(int(lab), int(t)) for lab, t in zip(labels, templates, strict=True)]
    return render(labels, res, rng), labels, captions


def eval_prompts(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """n evaluation prompts as (labels int64 (n,), captions): classes cycle through all 144 in a seeded
    order; templates cycle too, shifted by one per round so that NUM_TEMPLATES rounds (144 *
    NUM_TEMPLATES prompts) give every class every template."""
    if n < 1:
        raise ValueError(f"n={n} prompts is empty; FIX THIS by asking for n >= 1")
    k = np.arange(n)
    labels = np.random.default_rng(seed).permutation(NUM_CLASSES)[k % NUM_CLASSES].astype(np.int64)
    # Without the shift, 144 being a multiple of NUM_TEMPLATES would pin each class to one template.
    templates = (k % NUM_CLASSES + k // NUM_CLASSES) % NUM_TEMPLATES
    return labels, [caption(int(lab), int(t)) for lab, t in zip(labels, templates, strict=True)]


def attribute_agreement(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Share of samples whose predicted class agrees with the target class, per attribute (top_color,
    top_shape, bottom_color, bottom_shape) and for the whole class ("all": caption consistency)."""
    predicted, target = np.asarray(predicted).reshape(-1), np.asarray(target).reshape(-1)
    if predicted.shape != target.shape or predicted.size == 0:
        raise ValueError(
            f"predicted has {predicted.size} labels and target {target.size}; FIX THIS by passing one "
            "predicted class index per target (and at least one)"
        )
    pa_, ta = attribute_table(predicted), attribute_table(target)
    scores = {key: float(np.mean(pa_[:, i] == ta[:, i])) for i, key in enumerate(ATTRIBUTE_KEYS)}
    scores["all"] = float(np.mean(_check_labels(predicted) == _check_labels(target)))
    return scores

