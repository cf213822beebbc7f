"""Training on a local multi-node Ray cluster (several raylets, tests/multinode_driver.py): the workers of one run
land on different nodes, and two workers train like one worker with the same global batch and learning rate."""

from __future__ import annotations

import pytest
import torch

from tests.multinode_driver import GLOBAL_BATCH, TRAIN_IMAGES, run_scenarios

pytestmark = pytest.mark.slow  # a cluster of three nodes and two runs: minutes on a 2-core machine


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_scenarios(tmp_path_factory.mktemp("multinode"), ["single", "spread"])


def test_the_workers_of_a_run_are_placed_on_different_nodes(runs):
    nodes = runs["spread"]["return_value"]["node_ids"]  # rank order, reported by the workers themselves
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    assert len(runs["single"]["return_value"]["node_ids"]) == 1


def test_two_nodes_train_with_the_global_batch_and_learning_rate_of_one(runs):
    one, two = runs["single"], runs["spread"]
    for r in (one, two):
        v = r["return_value"]
        assert (v["images_seen"], v["updates"]) == (TRAIN_IMAGES, TRAIN_IMAGES // GLOBAL_BATCH)
        # images the ranks really took from their shards, summed over ranks: the global batch per update,
        # not the per-worker batch and not the global batch per worker
        assert v["data_images"] == TRAIN_IMAGES
    m1, m2 = one["metrics"], two["metrics"]
    assert m1["lr"] == m2["lr"]  # the same schedule position at the end (it follows updates, not workers)
    lr_groups = [torch.load(f"{r['checkpoint']}/state.pt", weights_only=True)["optimizers"]["teacher"]["param_groups"]
                 for r in (one, two)]
    assert [g["lr"] for g in lr_groups[0]] == [g["lr"] for g in lr_groups[1]]
    # The two runs see different noise and different images per update (each rank draws from its own shard
    # with its own seed), so they match statistically, not bit for bit: the loss over the last checkpoint
    # interval agrees closely, as two seeds of one run would.
    assert m2["loss/teacher"] == pytest.approx(m1["loss/teacher"], rel=0.1)
