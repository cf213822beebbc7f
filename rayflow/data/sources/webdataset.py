"""WebDataset `.tar` shards: `<key>.jpg|png` + `<key>.cls` samples, or text-image samples with a `.txt` /
`.json` caption (LAION, CC3M)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from rayflow.data.sources.decode import Row, check_options, decode_rows, map_decode
from rayflow.data.sources.listing import file_shuffle, list_files, resolve_filesystem
from rayflow.data.sources.skips import OnError, SkipLog
from rayflow.data.transforms import CropMethod

WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _webdataset_caption(raw: Any, key: str) -> tuple[str | None, str | None]:
    """(caption, None) from a sample's caption entry, or (None, why it is unusable). A key ending in
    "json" holds a JSON object with a "caption" or "text" string; any other key holds utf-8 text."""
    if not isinstance(raw, bytes | bytearray):
        return None, f"no .{key} entry (the caption)"
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f".{key} caption is not valid utf-8 ({e})"
    if not key.endswith("json"):
        return text.strip(), None
    try:
        meta = json.loads(text)
    except ValueError as e:
        return None, f".{key} is not valid JSON ({e})"
    if not isinstance(meta, dict):
        return None, f".{key} holds a JSON {type(meta).__name__}, not an object with a 'caption' or 'text' field"
    caption = next((meta[f] for f in ("caption", "text") if isinstance(meta.get(f), str)), None)
    if caption is None:
        return None, f".{key} has no string 'caption' or 'text' field (keys: {sorted(meta)[:10]})"
    return caption.strip(), None


def _decode_webdataset_batch(
    batch: dict[str, np.ndarray],
    *,
    image_keys: Sequence[str],
    label_key: str,
    caption_key: str | None = None,
    **decode_kwargs: Any,
) -> pa.Table:
    # Sample entries become columns named after their suffix; a suffix missing from a sample shows
    # up as None or NaN in its row (e.g. shards that mix .jpg and .png samples).
    columns = {k.lower(): v for k, v in batch.items()}
    image_columns = [columns[k] for k in image_keys if k in columns]
    label_col = columns.get(label_key)
    caption_col = columns.get(caption_key) if caption_key is not None else None
    urls = batch.get("__url__")

    def label_of(raw: Any) -> int:
        try:
            return int(bytes(raw).decode("utf-8").strip())
        except ValueError:
            return -1

    def rows() -> Iterator[Row]:
        for i, key in enumerate(batch["__key__"]):
            name = f"{urls[i]}:{key}" if urls is not None else str(key)
            data = next((c[i] for c in image_columns if isinstance(c[i], bytes | bytearray)), None)
            raw = label_col[i] if label_col is not None else None
            has_label = isinstance(raw, bytes | bytearray)
            label = label_of(raw) if has_label else -1
            if data is None:
                yield Row(name, None, None, f"no image entry ({', '.join('.' + k for k in image_keys)})")
            elif caption_key is not None:
                # Text-image samples: the caption is required, the class is optional (-1 if absent or invalid).
                caption, problem = _webdataset_caption(caption_col[i] if caption_col is not None else None, caption_key)
                yield Row(name, data, max(label, -1), problem, caption)
            elif not has_label:
                yield Row(name, None, None, f"no .{label_key} entry")
            elif label < 0:
                yield Row(name, None, None, f".{label_key} is not a class index >= 0: {bytes(raw[:20])!r}")
            else:
                yield Row(name, data, label, None)

    return decode_rows(rows(), with_captions=caption_key is not None, **decode_kwargs)


def webdataset_shards(
    path: str,
    res: int,
    *,
    channels: int = 3,
    crop: CropMethod = "adm",
    on_error: OnError = "skip",
    skip_log: SkipLog | None = None,
    image_keys: Sequence[str] = WEBDATASET_IMAGE_KEYS,
    label_key: str = "cls",
    file_shuffle_seed: int | None = None,
    caption_key: str | None = None,
) -> ray.data.Dataset:
    """Read WebDataset `.tar` shards (a file or a folder) of `<key>.jpg|png` + `<key>.cls` samples, or,
    with caption_key, text-image samples `<key>.jpg|png` + `<key>.txt` / `<key>.json` (LAION, CC3M).

    Uses `ray.data.read_webdataset` with its decoder off, so images decode exactly like the other
    sources. `.cls` holds the integer label as text. Samples without an image or a valid label are
    skipped (and recorded) or raise, per on_error. A shard whose size is not a whole tar archive (cut
    off mid-write) raises on the driver, naming the file. Files and folders starting with "." or "_"
    are ignored.

    caption_key (e.g. "txt" or "json") adds a `caption` column: a key ending in "json" holds a JSON
    object whose "caption" (else "text") string field is the caption, any other key holds utf-8 text;
    captions are stripped. In caption mode `.cls` is optional: a valid class index is used, otherwise
    the label is -1. A sample whose caption entry is missing, not utf-8, not valid JSON or without a
    caption/text string is bad (skipped and recorded, or raised, per on_error).
    """
    check_options(res, channels, on_error)
    fs, base = resolve_filesystem(path)
    files = list_files(fs, base, ["tar"])
    if not files:
        raise ValueError(f"no .tar shards under {path!r}; FIX THIS by pointing to the shard folder")
    for info in fs.get_file_info(files):
        # tar writers pad archives to 512-byte blocks: any other size means the shard was cut off, and
        # Ray's tar reader would then fail mid-epoch with a bare tarfile error.
        if info.size == 0 or info.size % 512:
            raise ValueError(
                f"{info.path}: {info.size} bytes is not a whole tar archive (sizes are multiples of 512); "
                "FIX THIS by rewriting the shard or deleting it (a write that was cut off leaves such files)"
            )
    ds = ray.data.read_webdataset(
        files, filesystem=fs, decoder=None, include_paths=False, shuffle=file_shuffle(file_shuffle_seed),
        # one block per shard: a read whose output Ray splits does not fuse with the decode (map_decode)
        override_num_blocks=len(files),
    )
    return map_decode(
        ds,
        _decode_webdataset_batch,
        image_keys=tuple(k.lower() for k in image_keys),
        label_key=label_key.lower(),
        caption_key=None if caption_key is None else caption_key.lower(),
        res=res,
        channels=channels,
        crop=crop,
        on_error=on_error,
        skip_log=skip_log,
    )
