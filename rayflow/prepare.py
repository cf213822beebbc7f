"""Turn an ImageNet-layout folder into training shards at a fixed resolution, in parallel on Ray; or cache the text
embeddings of a captioned set (webdataset/parquet caption shards, or the built-in shapes) into parquet shards.

    python -m rayflow.prepare --src DIR --out DIR --res 64 [--format parquet|webdataset] [--shard-size N]
    python -m rayflow.prepare --src DIR|shapes --src-format webdataset|parquet|shapes --text-encoder minilm|hf \
        [--text-encoder-path DIR] [--text-max-tokens 16] --out DIR --res 64

Text shards hold `image`, `label` (-1 without a class), `text_emb` (L, D) float32 and `text_mask` (L,) int8: train
on them with `data.source=parquet data.text_encoder=precomputed data.text_dim=D` and no encoder runs again.

Decoding, centre-crop/resize (the same `center_crop_resize` the teacher's data must have used) and
encoding run in Ray Data `map_batches` tasks; shards are written by Ray Data's parquet / webdataset
sinks. Parquet shards hold `image` as uint8 (res, res, C) Ray tensors plus int64 `label`; webdataset
shards hold `<class>/<stem>.png` (lossless) + `.cls`. A `manifest.json` next to the shards records
counts, classes and every skipped file with its reason. Read shards back with
`rayflow.data.sources.parquet_shards` / `webdataset_shards`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider
from ray.data.extensions import ArrowTensorArray

from rayflow.cli import fail, run_or_exit
from rayflow.data.blocks import image_table
from rayflow.data.sources import (
    SkipLog,
    image_folder,
    list_class_files,
    list_files,
    make_source,
    resolve_filesystem,
)
from rayflow.data.text import encode_text, encoder_dim, unpack_text
from rayflow.data.transforms import CropMethod, stack_images

ShardFormat = Literal["parquet", "webdataset"]
MANIFEST = "manifest.json"


class _ShardNames(FilenameProvider):
    """shard-<task>.<ext> instead of Ray's uuid-prefixed names: readable, and stable across reruns."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"shard-{task_index:06d}.{self.file_format}"


def _webdataset_samples(batch: dict[str, np.ndarray], *, base: str) -> dict[str, np.ndarray]:
    keys, pngs = [], []
    for path, img in zip(batch["path"], batch["image"], strict=True):
        # Key = path under src without extension; WebDataset cuts keys at the first dot, so dots go.
        rel = os.path.splitext(str(path)[len(base) :].lstrip("/"))[0]
        keys.append(rel.replace(".", "_"))
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return {
        "__key__": np.array(keys, dtype=object),
        "png": np.array(pngs, dtype=object),
        "cls": np.array([str(int(label)).encode() for label in batch["label"]], dtype=object),
    }


def prepare(
    src: str,
    out: str,
    res: int,
    fmt: ShardFormat = "parquet",
    shard_size: int = 10_000,
    *,
    channels: int = 3,
    crop: CropMethod = "adm",
) -> dict[str, Any]:
    """Write src (root/<class>/<images>) as shards of about shard_size images at res into out.

    Undecodable files are skipped and listed in the manifest. out must be empty or absent (stale
    shards would silently join the dataset). Returns the manifest, which is also written to
    out/manifest.json.
    """
    if fmt not in ("parquet", "webdataset"):
        raise ValueError(f"format={fmt!r} is unknown; FIX THIS by using 'parquet' or 'webdataset'")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    _ensure_empty(out)
    out_fs, out_base = resolve_filesystem(out)

    class_files = list_class_files(src)
    classes = list(class_files)
    _, src_base = resolve_filesystem(src)
    skip_log = SkipLog()
    ds = image_folder(src, res, channels=channels, crop=crop, skip_log=skip_log, include_paths=fmt == "webdataset")
    if fmt == "parquet":
        ds.write_parquet(
            out_base,
            filesystem=out_fs,
            min_rows_per_file=shard_size,
            max_rows_per_file=shard_size,
            filename_provider=_ShardNames(file_format="parquet"),
            # APPEND (the default) insists on uuid file names; out was checked to be empty above.
            mode=SaveMode.OVERWRITE,
        )
    else:
        samples = ds.map_batches(_webdataset_samples, fn_kwargs=dict(base=src_base), batch_format="numpy")
        # The webdataset sink writes one tar per block and has no max_rows_per_file: cut blocks to
        # shard_size rows (a streaming repartition). encoder=None: samples are bytes already, and
        # Ray's default encoder would insist on PIL images.
        samples = samples.repartition(target_num_rows_per_block=shard_size)
        samples.write_webdataset(
            out_base,
            filesystem=out_fs,
            min_rows_per_file=shard_size,
            encoder=None,
            filename_provider=_ShardNames(file_format="tar"),
            mode=SaveMode.OVERWRITE,
        )

    skipped = skip_log.skipped()
    skipped_per_class = Counter(s.path[len(src_base) :].lstrip("/").split("/")[0] for s in skipped)
    class_counts = {c: len(class_files[c]) - skipped_per_class[c] for c in classes}
    shards = list_files(out_fs, out_base, ["parquet" if fmt == "parquet" else "tar"])
    num_images = sum(class_counts.values())
    if fmt == "parquet":
        written = sum(pq.read_metadata(s, filesystem=out_fs).num_rows for s in shards)
        if written != num_images:
            raise RuntimeError(f"wrote {written} rows but expected {num_images}; the shards in {out!r} are incomplete")
    manifest = {
        "format": fmt,
        "res": res,
        "channels": channels,
        "crop": crop,
        "src": src,
        "num_images": num_images,
        "num_classes": len(classes),
        "classes": classes,  # label i is classes[i]
        "class_counts": class_counts,
        "num_skipped": len(skipped),
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        "shard_size": shard_size,
        "shards": [s[len(out_base) :].lstrip("/") for s in shards],
    }
    with out_fs.open_output_stream(f"{out_base}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=2).encode())
    return manifest


def _unpack_cond(batch: dict[str, np.ndarray]) -> pa.Table:
    emb, mask = unpack_text(stack_images(batch["cond"]))  # (N, L, D), (N, L)
    table = image_table(stack_images(batch["image"]), batch["label"])
    table = table.append_column("text_emb", ArrowTensorArray.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)))
    return table.append_column("text_mask", ArrowTensorArray.from_numpy(mask.astype(np.int8)))


def prepare_text(
    src: str,
    src_format: str,
    out: str,
    res: int,
    *,
    encoder: str = "minilm",
    encoder_path: str | None = None,
    max_tokens: int = 16,
    shard_size: int = 10_000,
    channels: int = 3,
    num_images: int = 20_000,
    caption_key: str = "txt",
    caption_column: str = "caption",
    workers: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Encode the captions of src once and write image + label + text_emb + text_mask parquet shards into out.

    src_format: webdataset (caption_key entries) | parquet (caption_column) | shapes (the built-in set, num_images
    of it, src ignored). Returns the manifest (also written to out/manifest.json)."""
    if src_format not in ("webdataset", "parquet", "shapes"):
        raise ValueError(f"src_format={src_format!r} has no captions; FIX THIS by using webdataset, parquet or shapes")
    _ensure_empty(out)
    out_fs, out_base = resolve_filesystem(out)
    skip_log = SkipLog()
    if src_format == "shapes":
        ds = make_source("shapes", res=res, n=num_images)
    else:
        text = {"caption_key": caption_key} if src_format == "webdataset" else {"caption_column": caption_column}
        ds = make_source(src_format, path=src, res=res, channels=channels, skip_log=skip_log, **text)
    dim = encoder_dim(encoder, encoder_path)
    ds = encode_text(ds, encoder=encoder, path=encoder_path, max_tokens=max_tokens, dim=dim, workers=workers,
                     device=device, cpus_per_worker=0.5)
    ds = ds.map_batches(_unpack_cond, batch_format="numpy")
    ds.write_parquet(out_base, filesystem=out_fs, min_rows_per_file=shard_size, max_rows_per_file=shard_size,
                     filename_provider=_ShardNames(file_format="parquet"), mode=SaveMode.OVERWRITE)
    shards = list_files(out_fs, out_base, ["parquet"])
    skipped = skip_log.skipped()
    manifest = {
        "format": "parquet+text_emb", "res": res, "channels": channels, "src": src, "src_format": src_format,
        "text_encoder": encoder, "text_encoder_path": encoder_path, "text_dim": dim, "text_max_tokens": max_tokens,
        "num_images": sum(pq.read_metadata(f, filesystem=out_fs).num_rows for f in shards),
        "num_skipped": len(skipped), "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        "shard_size": shard_size, "shards": [f[len(out_base) :].lstrip("/") for f in shards],
        "train_with": f"data.source=parquet data.path={out} data.text_encoder=precomputed data.text_dim={dim} "
                      f"data.text_max_tokens={max_tokens} data.resolution={res} data.channels={channels}",
    }
    with out_fs.open_output_stream(f"{out_base}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=2).encode())
    return manifest


def _ensure_empty(out: str) -> None:
    out_fs, out_base = resolve_filesystem(out)
    if out_fs.get_file_info(pafs.FileSelector(out_base, allow_not_found=True)):
        raise ValueError(f"output folder {out!r} is not empty; FIX THIS by choosing a new folder or emptying it")


def check_inputs(args: argparse.Namespace) -> None:
    """The source and output folders, checked on the driver before Ray starts."""
    if args.res < 1 or args.shard_size < 1:
        raise ValueError(f"--res {args.res} and --shard-size {args.shard_size} must be >= 1; FIX THIS by passing "
                         "positive numbers")
    _ensure_empty(args.out)
    if args.src_format == "folder":
        list_class_files(args.src)  # missing folder, no class folders, an empty class: a clear error
    elif args.src_format != "shapes":
        fs, base = resolve_filesystem(args.src)
        if fs.get_file_info(base).type == pafs.FileType.NotFound:
            raise ValueError(f"--src {args.src!r} does not exist; FIX THIS by pointing --src at your "
                             f"{args.src_format} shards")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every rayflow command
        fail(f"{message}; FIX THIS by correcting the arguments (python -m rayflow.prepare --help)")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints a one-line JSON summary."""
    return run_or_exit(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = _Parser(prog="python -m rayflow.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="ImageNet-layout folder: SRC/<class>/<images>")
    parser.add_argument("--out", required=True, help="empty or new folder for the shards and manifest.json")
    parser.add_argument("--res", type=int, required=True, help="output resolution (square)")
    parser.add_argument("--format", dest="fmt", choices=["parquet", "webdataset"], default="parquet")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard (about)")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3)
    parser.add_argument("--crop", choices=["adm", "crop_resize"], default="adm")
    text = parser.add_argument_group("text embeddings (cache a captioned set's encodings into parquet shards)")
    text.add_argument("--src-format", choices=["folder", "webdataset", "parquet", "shapes"], default="folder")
    text.add_argument("--text-encoder", choices=["minilm", "hf"], help="encode captions with this encoder")
    text.add_argument("--text-encoder-path", help="hf: the local Hugging Face encoder folder")
    text.add_argument("--text-max-tokens", type=int, default=16)
    text.add_argument("--num-images", type=int, default=20_000, help="shapes: how many images to render")
    args = parser.parse_args(argv)
    if (args.src_format == "folder") != (args.text_encoder is None):
        parser.error("--text-encoder goes with --src-format webdataset|parquet|shapes (captioned data), and only then")
    check_inputs(args)  # before Ray starts: a wrong folder fails in a second
    started = not ray.is_initialized()
    if started:
        ray.init()  # joins RAY_ADDRESS's cluster if set, else starts a local one
    try:
        if args.text_encoder:
            manifest = prepare_text(args.src, args.src_format, args.out, args.res, encoder=args.text_encoder,
                                    encoder_path=args.text_encoder_path, max_tokens=args.text_max_tokens,
                                    shard_size=args.shard_size, channels=args.channels, num_images=args.num_images)
        else:
            manifest = prepare(
                args.src, args.out, args.res, args.fmt, args.shard_size, channels=args.channels, crop=args.crop
            )
    finally:
        if started:  # leave a caller's cluster (tests, notebooks) running
            ray.shutdown()
    summary = {k: manifest[k] for k in ("format", "res", "num_images", "num_skipped") if k in manifest}
    print(json.dumps(dict(summary, out=args.out, shards=len(manifest["shards"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
