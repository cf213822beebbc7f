"""The bad-file policy of the file sources and the ledger of what they skipped.

A file (or webdataset sample) that fails to decode either raises (`on_error="raise"`, one line naming the file
and the fix) or is skipped (`on_error="skip"`): logged by name and, with a `SkipLog`, counted across every Ray
task of the dataset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

OnError = Literal["skip", "raise"]


@dataclass(frozen=True)
class SkippedFile:
    """A file (or webdataset sample) that a source dropped, and why."""

    path: str
    reason: str


@ray.remote(num_cpus=0)
class _SkipLedger:
    def __init__(self) -> None:
        # Keyed by path: a retried task reports the same file again, it still counts once.
        self._skipped: dict[str, str] = {}

    def add(self, items: list[tuple[str, str]]) -> None:
        self._skipped.update(items)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._skipped.items())


class SkipLog:
    """Collects the files that decoding skipped, from every Ray task of a dataset.

    Create it on the driver, pass it to a source (`skip_log=`), consume the dataset, then read
    `skipped()`. It is backed by a small zero-CPU actor, so it also works from Ray Train's split
    coordinator and from other nodes.
    """

    def __init__(self) -> None:
        # On the creating process's node (the driver's): a ledger placed on a worker node dies with that node,
        # taking the records with it (seen when a test removed a node mid-run).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._ledger = _SkipLedger.options(scheduling_strategy=here).remote()

    def record(self, items: list[tuple[str, str]]) -> None:
        """Add (path, reason) pairs; called from decode tasks."""
        if items:
            # Wait for the ack: a fire-and-forget call can be lost if the worker exits first.
            ray.get(self._ledger.add.remote(items))

    def skipped(self) -> list[SkippedFile]:
        """All files skipped so far, sorted by path."""
        return [SkippedFile(p, r) for p, r in ray.get(self._ledger.items.remote())]


def bad_file_error(name: str, problem: str) -> ValueError:
    """The on_error="raise" error for a bad file or sample: one line naming it, what is wrong and the fix."""
    return ValueError(
        f"{name}: {problem}. FIX THIS by deleting or replacing the file, "
        "or pass on_error='skip' to drop bad files and count them in a SkipLog"
    )


def report_skipped(bad: list[tuple[str, str]], skip_log: SkipLog | None) -> None:
    """on_error="skip": log each skipped (name, problem) and add them to skip_log, if any."""
    # One line per file: the user needs every name to fix or delete, and bad files are rare.
    for name, problem in bad:
        logger.warning("skipped %s: %s (on_error='skip'; 'raise' stops at the first bad file)", name, problem)
    if skip_log is not None:
        skip_log.record(bad)
