"""The per-worker training function handed to TorchTrainer: plain torch around the core's step."""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed

from rayflow.config import JobConfig
from rayflow.data.pipeline import iter_torch_batches
from rayflow.evaluation.generate import generate_samples
from rayflow.evaluation.grid import SAMPLES_FILE, save_image_grid
from rayflow.evaluation.metrics import load_reference, metrics_against, with_caption_consistency
from rayflow.malloc import keep_freed_memory
from rayflow.models import save_state_dict
from rayflow.worker.state import TrainState, build_state

STATE_FILE = "state.pt"
LEDGER_KEY = "data"  # DataLedger's totals inside STATE_FILE (TrainState ignores the key)


def _seed(*parts: int) -> int:
    # RNG seeded from (seed, rank, update): a restarted worker draws exactly what it would have drawn.
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class DataLedger:
    """What the run consumed from the data, over all ranks: the image count and a float64 checksum, the sum over
    batches of (a fixed random projection of each image, summed) x (1 + the batch's slot, update * world + rank).
    It travels inside checkpoints, so a resumed run that skipped or repeated an image, or fed one to another
    update or rank, ends with a different checksum than an uninterrupted run (tests compare them).
    Costs one dot product per batch and no device sync: ranks sum it only when a checkpoint is written."""

    def __init__(self, images: int = 0, checksum: float = 0.0) -> None:
        self.images, self.checksum = images, checksum  # all ranks, up to the latest checkpoint
        self._pending: torch.Tensor | None = None  # this rank since then: [images, checksum] on the device
        self._probe: torch.Tensor | None = None

    def add(self, x: torch.Tensor, slot: int) -> None:
        flat = x.detach().flatten(1).to(torch.float64)  # (B, C*H*W)
        if self._probe is None:
            g = torch.Generator().manual_seed(20_240_917)  # the same probe on every rank, run and restart
            self._probe = torch.randn(flat.shape[1], generator=g, dtype=torch.float64).to(x.device)
            self._pending = torch.zeros(2, dtype=torch.float64, device=x.device)
        self._pending += torch.stack([flat.new_tensor(float(flat.shape[0])), (flat @ self._probe).sum() * (1 + slot)])

    def commit(self, world: int) -> None:
        """Fold every rank's batches since the last commit into the totals; all ranks call it together."""
        pending = self._pending if self._pending is not None else torch.zeros(2, dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(pending)
        self.images += round(pending[0].item())
        self.checksum += pending[1].item()
        pending.zero_()

    def state_dict(self) -> dict:
        return {"images": self.images, "checksum": self.checksum}


def restore(state: TrainState) -> DataLedger | None:
    """Load the latest checkpoint of this run (after a worker restart or a rerun of the same command);
    returns its data ledger, or None when the run starts fresh."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    state.load_state_dict(saved)
    return DataLedger(**saved.get(LEDGER_KEY, {}))


class ProxyEval:
    """In-training evaluation of the student's EMA on rank 0: k-step samples from the same noise every
    time (so the curve shows the model changing, not the draw) scored against a precomputed reference."""

    def __init__(self, reference: bytes, cond, labels, job: JobConfig, device: torch.device) -> None:
        self.classifier, self.ref = load_reference(io.BytesIO(reference))
        self.classifier.to(device)
        self.job, self.device = job, device
        # what each sample is conditioned on (class labels or packed captions) and the class the classifier checks
        self.cond, self.labels = torch.as_tensor(cond), torch.as_tensor(labels)

    def __call__(self, module: torch.nn.Module) -> tuple[dict[str, float], torch.Tensor]:
        """(eval.proxy_* metrics, the samples (N, C, H, W))."""
        d, r = self.job.data, self.job.run
        x, secs = generate_samples(module, "student", self.job.distill.steps, self.cond,
                                   (d.channels, d.resolution, d.resolution), batch=r.eval_batch,
                                   seed=r.seed + 29, device=self.device)
        m = with_caption_consistency(metrics_against(self.classifier, self.ref, x, self.labels), self.job.data.text)
        return {f"eval.proxy_{k}": v for k, v in m.items() if k != "real_accuracy"} | {"eval.proxy_s": secs}, x


def _report(state: TrainState, metrics: dict, *, checkpoint: bool, rank: int, ledger: DataLedger, grid=None) -> None:
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:  # one writer; the other ranks report metrics only
            save_state_dict(state.state_dict() | {LEDGER_KEY: ledger.state_dict()}, os.path.join(d, STATE_FILE))
            if grid is not None:
                save_image_grid(grid, os.path.join(d, SAMPLES_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a Train worker needs, typed: what the driver resolved, handed over once per run."""

    job: JobConfig  # validated and resolved on the driver
    role: str  # teacher | distill
    eval_reference: bytes | None = None  # the in-training evaluation's reference (bytes: workers may be remote)
    eval_cond: np.ndarray | None = None  # its conditions (class labels or packed captions) ...
    eval_labels: np.ndarray | None = None  # ... and the classes the classifier checks
    teacher_precond: Any = None  # ObjectRef of the parameter-space preconditioner (name -> tensor), or None


def train_loop_per_worker(config: dict) -> dict:
    """config: {"spec": WorkerSpec} (Ray Train hands the function a dict)."""
    spec: WorkerSpec = config["spec"]
    job = spec.job
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if job.resources.torch_threads:
        torch.set_num_threads(job.resources.torch_threads)
    if job.resources.keep_freed_memory:
        keep_freed_memory()
    device = ray.train.torch.get_device()
    # Initial weights from the run's seed, not torch's per-process random one: two runs of a job start alike, so an
    # interrupted run can be checked against an uninterrupted one. (DDP gives every rank rank 0's weights.)
    torch.manual_seed(_seed(job.run.seed, rank))
    precond = spec.teacher_precond
    precond = ray.get(precond) if isinstance(precond, ray.ObjectRef) else precond
    state = build_state(job, spec.role, device, wrap=ray.train.torch.prepare_model, precond=precond)
    ledger = restore(state)
    resumed = ledger is not None
    ledger = ledger or DataLedger()
    c = state.counters
    start_images = c.images_seen
    per_worker = job.data.batch_size // world
    shard = ray.train.get_dataset_shard("train")
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    count, wait, busy, cpu, t_last = 0, 0.0, 0.0, 0.0, time.perf_counter()
    last_report = c.images_seen // job.run.report_every_images
    last_ckpt = c.images_seen // job.run.checkpoint_every_images
    every_eval = job.run.eval_every_images if spec.eval_reference else 0
    last_eval = c.images_seen // every_eval if every_eval else 0
    proxy = (ProxyEval(spec.eval_reference, spec.eval_cond, spec.eval_labels, job, device)
             if every_eval and rank == 0 else None)
    while c.updates < state.total_updates:
        batches = iter_torch_batches(shard, per_worker, device, local_shuffle_buffer_size=None, drop_last=True)
        t0 = time.perf_counter()
        progressed = False
        for i, (x, label) in enumerate(batches):
            if i < c.batch_in_epoch:  # resume inside an epoch: skip what was consumed before the restart
                t0 = time.perf_counter()
                continue
            progressed = True
            t1 = time.perf_counter()
            wait += t1 - t0
            ledger.add(x, slot=c.updates * world + rank)
            g = torch.Generator(device=device).manual_seed(_seed(job.run.seed, rank, c.updates))
            cpu0 = time.thread_time()
            metrics = state.step(c.updates, x, label, g)  # low precision, if any, only inside network forwards
            cpu += time.thread_time() - cpu0
            for k, v in metrics.items():
                if not math.isfinite(v):
                    raise FloatingPointError(
                        f"{k} = {v} at update {c.updates} (images_seen={c.images_seen}); stopping so the last "
                        "good checkpoint stays the latest. FIX THIS by lowering the learning rate or checking data"
                    )
                sums[k] += v
                counts[k] += 1  # alternating steps produce aux and student metrics on alternate updates
            count += 1
            c.updates += 1
            c.images_seen += job.data.batch_size
            c.batch_in_epoch = i + 1
            t0 = time.perf_counter()
            busy += t0 - t1
            done = c.updates >= state.total_updates
            # Every rank takes the same decisions (from the counters): Train needs all ranks to report.
            eval_due = bool(every_eval) and (c.images_seen // every_eval > last_eval or done)
            # With evaluation on, every checkpoint carries the metric (Train keeps the best ones by it) and
            # every evaluation writes a checkpoint (its sample grid travels inside).
            ckpt_due = c.images_seen // job.run.checkpoint_every_images > last_ckpt or done or eval_due
            eval_due = eval_due or (bool(every_eval) and ckpt_due)
            if c.images_seen // job.run.report_every_images > last_report or ckpt_due or eval_due:
                now = time.perf_counter()
                out = {k: sums[k] / counts[k] for k in sums}
                out.update(
                    images_seen=c.images_seen,
                    updates=c.updates,
                    epoch=c.epoch,
                    images_per_s=count * job.data.batch_size / max(now - t_last, 1e-9),
                    data_wait_share=wait / max(wait + busy, 1e-9),
                    # this thread's CPU time over the steps' wall time: < 1 when the step waits for a core or the GIL
                    step_cpu_share=cpu / max(busy, 1e-9),
                    lr=state.lr,
                )
                grid = None
                if eval_due:
                    last_eval = c.images_seen // every_eval
                    if proxy is not None:
                        scores, samples = proxy(state.ema.module)
                        out.update(scores)
                        grid = samples[: job.tracking.sample_grid]
                if ckpt_due:
                    ledger.commit(world)
                _report(state, out, checkpoint=ckpt_due, rank=rank, ledger=ledger, grid=grid)
                last_report = c.images_seen // job.run.report_every_images
                last_ckpt = c.images_seen // job.run.checkpoint_every_images if ckpt_due else last_ckpt
                sums.clear()
                counts.clear()
                count, wait, busy, cpu, t_last = 0, 0.0, 0.0, 0.0, time.perf_counter()
                t0 = t_last
            state.step_schedules()  # after the report: its `lr` is the rate the reported updates used
            if done:
                break
        else:
            if not progressed and c.batch_in_epoch == 0:
                raise RuntimeError(
                    "the training dataset yielded no full batch; FIX THIS by lowering "
                    f"data.batch_size (per worker {per_worker}) or adding data"
                )
            c.epoch += 1
            c.batch_in_epoch = 0
    return {"images_seen": c.images_seen, "updates": c.updates, "epoch": c.epoch, "resumed": resumed,
            "resumed_at_images": start_images, "data_images": ledger.images, "data_checksum": ledger.checksum,
            "node_ids": _node_ids(world)}


def _node_ids(world: int) -> list[str]:
    # The Ray node of every rank, in rank order: evidence of where the worker group was placed.
    mine = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [mine]
    nodes: list = [None] * world
    torch.distributed.all_gather_object(nodes, mine)
    return nodes
