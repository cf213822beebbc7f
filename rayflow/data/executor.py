"""How Ray Data's streaming executor learns the cluster's size at the start of each execution (epoch).

Ray 2.60's executor asks its cluster autoscaler for the resources it may use; the autoscaler asks a coordinator
actor without blocking, so the first answer of every execution is empty (the actor has not replied yet), and the
executor's ResourceManager keeps that answer for GLOBAL_LIMITS_UPDATE_INTERVAL_S (1 s): for the first second of
every epoch each operator's budget is 0 CPUs and the executor runs one task at a time, however many CPUs the
cluster has (benchmarks/README.md, "Ray Data's first second"). `prompt_cluster_limits` makes an empty answer
count for nothing: the next scheduling round asks again, so the actor's reply (milliseconds) is used as soon as it
arrives (within that first interval only); once the limits are known they are refreshed at Ray's own interval.

Every process that runs an executor needs it: the driver (iterating a dataset there), and on a Ray Train run the
SplitCoordinator actor behind `get_dataset_shard`. rayflow.data.pipeline calls it when imported, which each of
those processes does when it unpickles a training dataset's transforms.
"""

from __future__ import annotations

import functools
import logging
import time

logger = logging.getLogger(__name__)

_MARK = "_rayflow_prompt_limits"


def prompt_cluster_limits() -> bool:
    """Install the empty-answer retry into Ray Data's ResourceManager (idempotent). False, with a warning, when
    this Ray has no such method or field (another version than the pinned 2.60): nothing is changed then."""
    from ray.data._internal.execution.resource_manager import ResourceManager

    original = ResourceManager.get_global_limits
    if getattr(original, _MARK, False):
        return True
    if not hasattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S"):
        logger.warning("rayflow: Ray Data's ResourceManager has no limits cache here; epochs start as Ray starts them")
        return False

    @functools.wraps(original)
    def get_global_limits(self):
        limits = original(self)
        started = self.__dict__.setdefault(_MARK, time.monotonic())
        # Within the first interval only: a cluster whose CPUs all go to training workers (exclude_resources)
        # has zero limits for good, and must not ask the coordinator actor every round.
        if (limits.cpu == 0 and limits.gpu == 0 and hasattr(self, "_global_limits_last_update_time")
                and time.monotonic() - started < ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S):
            self._global_limits_last_update_time = 0  # the autoscaler has not answered yet: ask again next round
        return limits

    setattr(get_global_limits, _MARK, True)
    ResourceManager.get_global_limits = get_global_limits
    return True
