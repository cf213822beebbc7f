"""Ingest throughput: Ray Data pipeline vs a plain torch DataLoader over the same parquet shards.

    python benchmarks/ingest.py [--num-images 20000] [--res 32] [--epochs 2] [--loader-workers 1,2]

Writes shards of uint8 3 x res x res images (`image` as a fixed-size list, `label` int64) to a temp
dir, then times full passes that end in float32 NCHW [-1, 1] torch batches with random flips:
  - ray_data: parquet_shards -> build_train_dataset (file-order shuffle, no block barrier) ->
    iter_torch_batches, i.e. what a Ray Train worker runs on a 1-worker cluster;
  - torch_dataloader (num_workers 1 and 2): an IterableDataset that reads the same files with pyarrow
    in DataLoader worker processes and does the same flip and scaling.
The first pass of each is reported separately (cold: process start-up, imports) and the images/s
figure is over the remaining warm passes. Prints one JSON line per measurement and one with the ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rayflow.data.transforms import random_flip, to_model_input


def write_shards(out: Path, num_images: int, res: int, shard_size: int, seed: int = 0) -> list[Path]:
    """Random uint8 images as parquet shards (image: fixed_size_list<uint8>[3*res*res], label: int64)."""
    rng = np.random.default_rng(seed)
    paths = []
    for start in range(0, num_images, shard_size):
        n = min(shard_size, num_images - start)
        images = rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)
        column = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), res * res * 3)
        labels = pa.array(rng.integers(0, 1000, n), type=pa.int64())
        path = out / f"shard-{start // shard_size:05d}.parquet"
        pq.write_table(pa.table({"image": column, "label": labels}), path)
        paths.append(path)
    return paths


class ParquetImages(IterableDataset):
    """Each DataLoader worker reads its share of the files (shuffled per epoch) and yields ready batches."""

    def __init__(self, files: list[Path], res: int, batch_size: int, seed: int) -> None:
        self.files, self.res, self.batch_size, self.seed = files, res, batch_size, seed
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, worker])
        files = [self.files[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files))]
        for path in files[worker::workers]:
            table = pq.read_table(path)
            flat = table.column("image").combine_chunks().flatten().to_numpy()
            images = flat.reshape(-1, self.res, self.res, 3)
            labels = table.column("label").to_numpy()
            for start in range(0, len(labels), self.batch_size):
                batch = random_flip(images[start : start + self.batch_size], rng)
                yield (
                    torch.from_numpy(to_model_input(batch)),
                    torch.from_numpy(labels[start : start + self.batch_size]),
                )


def time_passes(make_iter: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], passes: int) -> list[dict]:
    """Run passes full iterations; per pass: seconds and images (checks dtype/shape on the way)."""
    out = []
    for epoch in range(passes):
        start, images = time.perf_counter(), 0
        for x, label in make_iter(epoch):
            assert x.dtype == torch.float32 and x.ndim == 4 and label.dtype == torch.int64
            images += x.shape[0]
        out.append({"seconds": time.perf_counter() - start, "images": images})
    return out


def summarise(name: str, passes: list[dict], **extra: object) -> dict:
    warm = passes[1:]
    seconds = sum(p["seconds"] for p in warm)
    images = sum(p["images"] for p in warm)
    return {
        "bench": "ingest",
        "pipeline": name,
        "images_per_s": round(images / seconds, 1),
        "warm_passes": len(warm),
        "images_per_pass": passes[0]["images"],
        "first_pass_s": round(passes[0]["seconds"], 2),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=20_000)
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="warm passes per pipeline (plus one cold pass)")
    parser.add_argument("--loader-workers", default="1,2", help="comma-separated DataLoader num_workers values")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="logical CPUs for ray.init")
    args = parser.parse_args(argv)
    passes = args.epochs + 1
    common = dict(res=args.res, batch_size=args.batch_size, cpus=os.cpu_count())

    with tempfile.TemporaryDirectory(prefix="rayflow-ingest-") as tmp:
        files = write_shards(Path(tmp), args.num_images, args.res, args.shard_size)

        dataset = ParquetImages(files, args.res, args.batch_size, seed=0)
        torch_results = []
        for workers in (int(w) for w in args.loader_workers.split(",")):

            def loader_epoch(epoch: int, workers: int = workers) -> DataLoader:
                dataset.epoch = epoch
                return DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4)

            result = summarise("torch_dataloader", time_passes(loader_epoch, passes), num_workers=workers, **common)
            torch_results.append(result)
            print(json.dumps(result), flush=True)

        import ray

        from rayflow.data.pipeline import build_train_dataset, iter_torch_batches
        from rayflow.data.sources import parquet_shards

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level=logging.WARNING)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            source = parquet_shards(tmp, args.res, file_shuffle_seed=0)
            train = build_train_dataset(source, seed=0)  # file source: no block barrier, per-block maps
            ray_result = summarise(
                "ray_data",
                time_passes(lambda _: iter_torch_batches(train, args.batch_size, "cpu", drop_last=False), passes),
                ray_cpus=args.ray_cpus,
                **common,
            )
        finally:
            ray.shutdown()
        print(json.dumps(ray_result), flush=True)

    for result in torch_results:
        ratio = ray_result["images_per_s"] / result["images_per_s"]
        line = {"bench": "ingest", "metric": "ray_data_over_torch_dataloader", "num_workers": result["num_workers"]}
        print(json.dumps(dict(line, ratio=round(ratio, 3))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
