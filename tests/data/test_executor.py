"""rayflow.data.executor: an epoch's first tasks run side by side, not one at a time while Ray Data's executor
waits for its first answer about the cluster's size."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import ray

from rayflow.data.pipeline import build_train_dataset, iter_torch_batches

TASK_S = 0.6  # under Ray's 1 s limits cache: without the fix the second task starts only after the first ends


def _source(log: Path, blocks: int) -> ray.data.Dataset:
    """`blocks` one-image blocks whose tasks each take TASK_S and log (start, end)."""

    def slow(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.time()
        time.sleep(TASK_S)
        with open(log, "a") as f:
            f.write(f"{start} {time.time()}\n")
        return batch

    items = [{"image": np.full((4, 4, 1), i, np.uint8), "label": i} for i in range(blocks)]
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(slow, batch_size=None)


@pytest.mark.parametrize("consumer", ["driver", "split_coordinator"])
def test_an_epochs_first_tasks_run_side_by_side(ray_cluster, tmp_path, consumer):
    assert ray.cluster_resources().get("CPU", 0) >= 2
    log = tmp_path / "tasks.log"
    ds = build_train_dataset(_source(log, 2), seed=0, flip=False)
    # driver: the executor runs in this process; split_coordinator: in the actor behind a streaming split (as
    # behind ray.train.get_dataset_shard), which imports rayflow.data.pipeline when it unpickles the transforms
    it = ds if consumer == "driver" else ds.streaming_split(1)[0]
    for epoch in range(3):  # every execution starts cold; the first may also wait for worker processes to start
        log.unlink(missing_ok=True)
        labels = [int(y) for _, y in iter_torch_batches(it, 1, "cpu", drop_last=False)]
        assert sorted(labels) == [0, 1]
        (s0, e0), (s1, e1) = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
        assert epoch == 0 or s1 < e0, f"epoch {epoch}: the second task started {s1 - e0:.2f} s after the first ended"
