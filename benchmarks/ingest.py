"""Ingest throughput: Ray Data pipeline vs a plain torch DataLoader, memory-bound and decode-bound.

    python benchmarks/ingest.py [--num-images 20000] [--res 32] [--epochs 2] [--loader-workers 1,2]
                                [--jpeg-images 4000] [--jpeg-res 64] [--cases parquet,jpeg,multinode]

Every pipeline times full passes that end in float32 NCHW [-1, 1] torch batches with random flips.

parquet (memory-bound): shards of uint8 3 x res x res images (`image` as a fixed-size list, `label` int64) in a
temp dir;
  - ray_data: parquet_shards -> build_train_dataset (file-order shuffle, no block barrier; flips and CHW in the
    Ray tasks, uint8 through the object store) -> iter_torch_batches (scales to float32 in the consuming process),
    i.e. what a Ray Train worker runs on a 1-worker cluster;
  - ray_data_scale_in_pipeline: the previous path, for an A/B in the same run: the same dataset plus a fused map
    that scales to float32 in the Ray task (4x the bytes through the object store), iterated as float32;
  - torch_dataloader (num_workers 1 and 2): an IterableDataset that reads the same files with pyarrow in
    DataLoader worker processes and does the same flip and scaling.
jpeg (decode-bound): an ImageNet-layout folder (10 class folders) of jpeg-res x jpeg-res JPEGs written with PIL;
  - torch_dataloader_pil (num_workers 1 and 2): a map-style Dataset that reads and decodes each file with PIL
    (rayflow's decode_image + center_crop_resize, the same calls the Ray source makes), flip and scaling in the
    workers' collate_fn;
  - ray_data: rayflow's folder source (image_folder: FileBytesDatasource's read and the decode map, one task) ->
    build_train_dataset -> iter_torch_batches, on the same local cluster (ray.init with --ray-cpus logical CPUs).
multinode: the jpeg ray_data pipeline on a local two-node cluster on this machine (`ray start --head
  --num-cpus=1`, then a second raylet `ray start --address=... --num-cpus=1 --resources='{"extra_cpu_node": 1}'`,
  both in a private temp dir and their own process groups, stopped by process group: `ray stop` would stop every
  Ray on the machine): first the head alone, then with the extra node; `nodes_used` is from Ray Data's stats.

The first pass of each pipeline is reported separately (cold: process start-up, imports) and the images/s figure is
over the remaining warm passes; `cores` is the number of decode processes (DataLoader workers, Ray logical CPUs)
and `images_per_s_per_core` divides by it. This process (the consumer) runs torch with --consumer-threads threads.
Prints one JSON line per measurement and one per ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from rayflow.data.transforms import (
    center_crop_resize,
    decode_image,
    random_flip,
    scale_to_unit_range,
    to_model_input,
)

CLASSES = 10  # class folders of the JPEG set
# Printed ratios: (metric, (case, pipeline) over (case, pipeline)); one line per pair of measurements that ran.
COMPARISONS = [
    ("parquet_ray_data_over_torch_dataloader", ("parquet", "ray_data"), ("parquet", "torch_dataloader")),
    ("parquet_uint8_store_over_float32_store", ("parquet", "ray_data"), ("parquet", "ray_data_scale_in_pipeline")),
    ("jpeg_ray_data_over_dataloader_pil", ("jpeg", "ray_data"), ("jpeg", "torch_dataloader_pil")),
    ("multinode_two_nodes_over_head_only", ("multinode", "ray_data_multinode"), ("multinode", "ray_data_head_only")),
    ("multinode_two_nodes_over_one_node", ("multinode", "ray_data_multinode"), ("jpeg", "ray_data")),
    ("multinode_ray_data_over_dataloader_pil", ("multinode", "ray_data_multinode"), ("jpeg", "torch_dataloader_pil")),
]


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


def write_jpeg_folder(root: Path, num_images: int, res: int, seed: int = 0) -> list[tuple[str, int]]:
    """An ImageNet-layout folder root/<class>/<n>.JPEG of smooth colour pictures with noise (quality 90);
    returns (path, label) per file."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res
    files = []
    for i in range(num_images):
        label = i % CLASSES
        freq, phase = rng.uniform(1, 6, size=(2, 3)), rng.uniform(0, 2 * np.pi, size=3)
        waves = np.sin(2 * np.pi * (freq[0] * xx[..., None] + freq[1] * yy[..., None] ** 2) + phase)  # (res, res, 3)
        pixels = np.clip(127.5 + 100 * waves + rng.normal(0, 12, waves.shape), 0, 255).astype(np.uint8)
        path = root / f"class{label:02d}" / f"{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        files.append((str(path), label))
    return files


def _model_batch(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """uint8 (N, H, W, C) + labels -> flipped float32 (N, C, H, W) [-1, 1] and int64 tensors (DataLoader side)."""
    return torch.from_numpy(to_model_input(random_flip(images, rng))), torch.from_numpy(np.asarray(labels, np.int64))


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
                end = start + self.batch_size
                yield _model_batch(images[start:end], labels[start:end], rng)


class JpegFiles(Dataset):
    """Map-style: one file read and decoded with PIL per item, as torchvision's ImageFolder does."""

    def __init__(self, files: list[tuple[str, int]], res: int) -> None:
        self.files, self.res = files, res

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.files[i]
        with open(path, "rb") as f:
            return center_crop_resize(decode_image(f.read()), self.res), label  # uint8 (res, res, 3)


def flip_and_scale_collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn, run in the DataLoader worker: stack, flip (seeded by DataLoader's per-worker seed), scale."""
    info = get_worker_info()
    rng = np.random.default_rng([info.seed if info else 0, len(samples)])
    images, labels = zip(*samples, strict=True)
    return _model_batch(np.stack(images), np.array(labels), rng)


MakeIter = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def time_interleaved(makers: dict[str, MakeIter], passes: int) -> dict[str, list[dict]]:
    """passes full iterations of each pipeline, alternating pass by pass (so load from other processes and warm-up
    hit them alike); per pass: seconds and images (checks dtype/shape on the way)."""
    out: dict[str, list[dict]] = {name: [] for name in makers}
    for epoch in range(passes):
        for name, make_iter in makers.items():
            start, images = time.perf_counter(), 0
            for x, label in make_iter(epoch):
                assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[1] == 3 and label.dtype == torch.int64
                images += x.shape[0]
            out[name].append({"seconds": time.perf_counter() - start, "images": images})
    return out


def time_passes(make_iter: MakeIter, passes: int) -> list[dict]:
    return time_interleaved({"": make_iter}, passes)[""]


def scale_ms_per_batch(batch_size: int, res: int, repeats: int = 20) -> float:
    """What the consumer pays per batch on this CPU for the worker-side scaling (uint8 -> float32 [-1, 1]), ms."""
    from rayflow.data.transforms import scale_to_unit_range_torch

    x = torch.randint(0, 256, (batch_size, 3, res, res), dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scale_to_unit_range_torch(x)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 2)  # the median: load from other processes hits single calls


def summarise(name: str, passes: list[dict], cores: int, **extra: object) -> dict:
    warm = passes[1:]
    seconds = sum(p["seconds"] for p in warm)
    images = sum(p["images"] for p in warm)
    return {
        "bench": "ingest",
        "pipeline": name,
        "images_per_s": round(images / seconds, 1),
        "cores": cores,
        "images_per_s_per_core": round(images / seconds / cores, 1),
        "warm_passes": len(warm),
        "images_per_pass": passes[0]["images"],
        "first_pass_s": round(passes[0]["seconds"], 2),
        "consumer_threads": torch.get_num_threads(),
        **extra,
    }


def emit(result: dict, results: list[dict]) -> None:
    results.append(result)
    print(json.dumps(result), flush=True)


def ratio(num: dict, den: dict, metric: str, **extra: object) -> None:
    """num / den in images/s and in images/s per core."""
    values = {k: round(num[k] / den[k], 3) for k in ("images_per_s", "images_per_s_per_core")}
    print(json.dumps({"bench": "ingest", "metric": metric, **extra, "ratio": values["images_per_s"],
                      "ratio_per_core": values["images_per_s_per_core"]}), flush=True)


def run_dataloaders(name: str, make_loader: Callable[[int, int], DataLoader], workers: list[int], passes: int,
                    results: list[dict], **common: object) -> None:
    for w in workers:
        emit(summarise(name, time_passes(lambda epoch, w=w: make_loader(epoch, w), passes), cores=w, num_workers=w,
                       **common), results)


def ray_batches(train, batch_size: int) -> MakeIter:
    from rayflow.data.pipeline import iter_torch_batches

    return lambda _: iter_torch_batches(train, batch_size, "cpu", drop_last=False)


def ray_summary(name: str, train, batch_size: int, passes: int, /, *, cores: int, **extra: object) -> dict:
    """Timed passes of rayflow's iter_torch_batches over train, with the nodes its tasks ran on."""
    timings = time_passes(ray_batches(train, batch_size), passes)
    return summarise(name, timings, cores=cores, nodes_used=nodes_used(train), **extra)


def _scale_in_task(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": scale_to_unit_range(batch["image"]), "label": batch["label"]}  # float32 (N, C, H, W)


def float_store_batches(train, batch_size: int) -> MakeIter:
    """The previous path: scaled to float32 in the Ray task (fused into the flip map), float32 in the store."""
    floats = train.map_batches(_scale_in_task, batch_format="numpy", batch_size=None)

    def batches(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dtypes = {"image": torch.float32, "label": torch.int64}
        for b in floats.iter_torch_batches(batch_size=batch_size, dtypes=dtypes, device="cpu", prefetch_batches=2):
            yield b["image"], b["label"]

    return batches


def nodes_used(train) -> int:
    """Most nodes any operator of the last execution ran tasks on (Ray Data's stats)."""
    lines = [line for line in train.stats().splitlines() if "nodes used" in line]
    return max((int(line.rsplit(";", 1)[1].split()[0]) for line in lines), default=0)


# ------------------------------------------------------------------------------------- local multi-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(tmp: Path, name: str, *args: str) -> subprocess.Popen:
    """`ray start --block ...` in its own process group (so it can be stopped by group, not machine-wide)."""
    ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")  # free ones: the defaults would collide with any other Ray on this machine
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--node-ip-address=127.0.0.1",
           "--disable-usage-stats", *args, *(f"--{p}={_free_port()}" for p in ports)]
    with open(tmp / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for(check: Callable[[], bool], what: str, procs: list[subprocess.Popen], logs: Path,
              timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # the head is not up yet
            pass
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            tails = "\n".join(f"{log.name}: {log.read_text()[-1500:]}" for log in sorted(logs.glob("*.log")))
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s; ray start said:\n{tails}")
        time.sleep(1)


def multinode_case(files_root: Path, args: argparse.Namespace, passes: int, results: list[dict], **common) -> None:
    import ray

    from rayflow.data.pipeline import build_train_dataset
    from rayflow.data.sources import image_folder

    tmp = Path(tempfile.mkdtemp(prefix="rfin", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    procs: list[subprocess.Popen] = []
    try:
        port = _free_port()
        procs.append(_ray_start(tmp, "head", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                f"--temp-dir={tmp / 'ray'}"))
        address = f"127.0.0.1:{port}"

        def connected() -> bool:
            return ray.init(address=address, logging_level=logging.WARNING) is not None

        _wait_for(connected, "head start", procs, tmp)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for nodes in (1, 2):
            if nodes == 2:
                procs.append(_ray_start(tmp, "extra", f"--address={address}", "--num-cpus=1",
                                        '--resources={"extra_cpu_node": 1}'))
                _wait_for(lambda: ray.cluster_resources().get("extra_cpu_node") == 1, "extra node start", procs, tmp)
            cpus = int(ray.cluster_resources()["CPU"])
            train = build_train_dataset(image_folder(str(files_root), args.jpeg_res, file_shuffle_seed=0), seed=0)
            name = "ray_data_multinode" if nodes == 2 else "ray_data_head_only"
            emit(ray_summary(name, train, args.batch_size, passes, cores=cpus, nodes=nodes, **common), results)
    finally:
        ray.shutdown()
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=20_000, help="parquet case")
    parser.add_argument("--res", type=int, default=32, help="parquet case")
    parser.add_argument("--shard-size", type=int, default=1_000)
    parser.add_argument("--jpeg-images", type=int, default=4_000, help="jpeg and multinode cases")
    parser.add_argument("--jpeg-res", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="warm passes per pipeline (plus one cold pass)")
    parser.add_argument("--loader-workers", default="1,2", help="comma-separated DataLoader num_workers values")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="logical CPUs for ray.init")
    parser.add_argument("--cases", default="parquet,jpeg,multinode", help="comma-separated subset to run")
    parser.add_argument("--consumer-threads", type=int, default=1,
                        help="torch threads of this (consuming) process; 0 = torch's default. 1 is what a Ray Train "
                             "worker with 1 CPU gets (Ray sets OMP_NUM_THREADS to a worker's CPUs)")
    args = parser.parse_args(argv)
    if args.consumer_threads:
        # On a loaded machine torch's default (one thread per core) made the consumer's small scaling ops ~100x
        # slower (threads waiting on busy cores): 36 ms instead of 0.2 ms per 256 x 3 x 32 x 32 batch.
        torch.set_num_threads(args.consumer_threads)
    cases = set(args.cases.split(","))
    passes = args.epochs + 1
    workers = [int(w) for w in args.loader_workers.split(",")]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only clusters
    results: list[dict] = []

    import ray

    from rayflow.data.pipeline import build_train_dataset
    from rayflow.data.sources import image_folder, parquet_shards

    # after the imports (Ray Data sets up its logging on import): per-execution INFO lines would drown the JSON
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="rayflow-ingest-") as tmp:
        parquet_dir, jpeg_dir = Path(tmp) / "parquet", Path(tmp) / "jpeg"
        parquet_dir.mkdir()
        pq_common = dict(case="parquet", res=args.res, batch_size=args.batch_size)
        jpeg_common = dict(case="jpeg", res=args.jpeg_res, batch_size=args.batch_size)
        if "parquet" in cases:
            dataset = ParquetImages(write_shards(parquet_dir, args.num_images, args.res, args.shard_size),
                                    args.res, args.batch_size, seed=0)

            def parquet_loader(epoch: int, w: int) -> DataLoader:
                dataset.epoch = epoch
                return DataLoader(dataset, batch_size=None, num_workers=w, prefetch_factor=4)

            run_dataloaders("torch_dataloader", parquet_loader, workers, passes, results, **pq_common)
        if cases & {"jpeg", "multinode"}:
            t0 = time.perf_counter()
            jpegs = write_jpeg_folder(jpeg_dir, args.jpeg_images, args.jpeg_res)
            size = sum(os.path.getsize(p) for p, _ in jpegs)
            print(json.dumps({"bench": "ingest", "case": "jpeg", "files": len(jpegs), "mean_bytes": size // len(jpegs),
                              "write_s": round(time.perf_counter() - t0, 1)}), flush=True)
        if "jpeg" in cases:
            jpeg_set = JpegFiles(jpegs, args.jpeg_res)

            def jpeg_loader(epoch: int, w: int) -> DataLoader:
                return DataLoader(jpeg_set, batch_size=args.batch_size, shuffle=True, num_workers=w, prefetch_factor=4,
                                  collate_fn=flip_and_scale_collate, generator=torch.Generator().manual_seed(epoch))

            run_dataloaders("torch_dataloader_pil", jpeg_loader, workers, passes, results, **jpeg_common)

        if cases & {"parquet", "jpeg"}:
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level=logging.WARNING)
            try:
                ray.data.DataContext.get_current().enable_progress_bars = False
                if "parquet" in cases:
                    # file source: no block barrier, per-block maps
                    train = build_train_dataset(parquet_shards(str(parquet_dir), args.res, file_shuffle_seed=0), seed=0)
                    makers = {"ray_data": ray_batches(train, args.batch_size),
                              "ray_data_scale_in_pipeline": float_store_batches(train, args.batch_size)}
                    timed = time_interleaved(makers, passes)
                    scale_ms = scale_ms_per_batch(args.batch_size, args.res)
                    for name, timings in timed.items():
                        extra = {"consumer_scale_ms_per_batch": scale_ms} if name == "ray_data" else {}
                        emit(summarise(name, timings, cores=args.ray_cpus, **extra, **pq_common), results)
                if "jpeg" in cases:
                    train = build_train_dataset(image_folder(str(jpeg_dir), args.jpeg_res, file_shuffle_seed=0), seed=0)
                    emit(ray_summary("ray_data", train, args.batch_size, passes, cores=args.ray_cpus, **jpeg_common),
                         results)
            finally:
                ray.shutdown()
        if "multinode" in cases:
            multinode_case(jpeg_dir, args, passes, results, **dict(jpeg_common, case="multinode"))

    for metric, num, den in COMPARISONS:
        for n in (r for r in results if (r["case"], r["pipeline"]) == num):
            for d in (r for r in results if (r["case"], r["pipeline"]) == den):
                ratio(n, d, metric, **{k: d[k] for k in ("num_workers",) if k in d})
    return 0


if __name__ == "__main__":
    sys.exit(main())
