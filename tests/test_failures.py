"""Failures injected into a two-worker run on a local multi-node cluster (tests/multinode_driver.py): a worker
process killed, a whole node removed, the driver killed and the command run again. Each run must finish from its
last checkpoint exactly as an uninterrupted run of the same job does: the same counters, the same images at the
same updates and ranks (the data ledger's checksum), the same weights, optimizer and EMA state."""

from __future__ import annotations

import pytest
import torch

from rayflow.worker.loop import STATE_FILE, DataLedger
from tests.multinode_driver import GATE_IMAGES, GLOBAL_BATCH, IMAGES_PER_EPOCH, TRAIN_IMAGES, run_scenarios

FAILURES = ("worker_kill", "node_removal", "driver_kill")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_scenarios(tmp_path_factory.mktemp("failures"), ["spread", *FAILURES])


def _state(result: dict) -> dict:
    return torch.load(f"{result['checkpoint']}/{STATE_FILE}", weights_only=True)


def _assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs by up to {(a.double() - b.double()).abs().max().item():.3g}"
    else:
        assert a == b, where


@pytest.mark.slow  # a three-node cluster, four runs and three restarts: minutes on a 2-core machine
@pytest.mark.parametrize("failure", FAILURES)
def test_a_run_finishes_from_its_last_checkpoint_as_if_nothing_failed(runs, failure):
    reference, result = runs["spread"], runs[failure]
    got, want = result["return_value"], reference["return_value"]
    # the failure came after the checkpoint at GATE_IMAGES (inside the second epoch); the run went on from a
    # checkpoint at or after it
    assert result["injected"]["gate_images_seen"] == GATE_IMAGES > IMAGES_PER_EPOCH
    assert got["resumed"] is True and want["resumed"] is False
    assert GATE_IMAGES <= got["resumed_at_images"] < TRAIN_IMAGES
    assert (got["images_seen"], got["updates"], got["epoch"]) == (want["images_seen"], want["updates"], want["epoch"])
    assert (got["images_seen"], got["updates"]) == (TRAIN_IMAGES, TRAIN_IMAGES // GLOBAL_BATCH)
    # Nothing skipped or counted twice: the images the ranks really consumed, and which images went to which
    # update and rank, are those of the uninterrupted run.
    assert got["data_images"] == TRAIN_IMAGES
    assert got["data_checksum"] == want["data_checksum"]
    # weights, optimizer moments and step counts, EMA, counters: bit for bit
    a, b = _state(result), _state(reference)
    for key in ("models", "optimizers", "ema", "counters", "data"):
        _assert_same_tensors(a[key], b[key], key)
    if failure == "node_removal":
        assert result["injected"]["removed_node_id"] not in got["node_ids"]


# ---------------------------------------------------------------------------------------------------
# The data ledger itself (no Ray)
# ---------------------------------------------------------------------------------------------------


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(4, 1, 8, 8, generator=g) * 2 - 1 for _ in range(6)]


def _consume(order: list[int], *, resume_at: int | None = None) -> DataLedger:
    ledger, xs = DataLedger(), _batches()
    for update, i in enumerate(order):
        if update == resume_at:  # a checkpoint, then a fresh ledger restored from it
            ledger.commit(world=1)
            ledger = DataLedger(**ledger.state_dict())
        ledger.add(xs[i], slot=update)
    ledger.commit(world=1)
    return ledger


def test_a_resumed_ledger_ends_as_an_uninterrupted_one():
    whole, resumed = _consume([0, 1, 2, 3, 4, 5]), _consume([0, 1, 2, 3, 4, 5], resume_at=3)
    assert (resumed.images, resumed.checksum) == (whole.images, pytest.approx(whole.checksum, rel=1e-12))
    assert whole.images == 24


@pytest.mark.parametrize("order", [[0, 1, 2, 4, 5], [0, 1, 2, 2, 3, 4, 5], [0, 1, 3, 2, 4, 5]],
                         ids=["skipped", "repeated", "swapped"])
def test_the_ledger_tells_skipped_repeated_and_reordered_batches(order):
    whole = _consume([0, 1, 2, 3, 4, 5])
    assert _consume(order, resume_at=3).checksum != pytest.approx(whole.checksum, rel=1e-9)
