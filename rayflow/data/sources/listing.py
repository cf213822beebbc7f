"""Finding a source's files: local paths or URIs (s3://, gs://), recursive listings without hidden or partial
files, and the per-epoch file order."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pyarrow.fs as pafs
from ray.data import DataContext, FileShuffleConfig

# Ray Data counts the finished executions (epochs) of a dataset in its DataContext and hands that context to every
# task; RandomSeedConfig/FileShuffleConfig(reseed_after_execution=True) read the same counter. It is private in
# Ray 2.60, so rayflow.data.pipeline.build_train_dataset checks that it exists.
EPOCH_ATTR = "_execution_idx"


def resolve_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); local paths are made absolute, URIs (s3://, gs://) are kept."""
    if "://" not in path:
        path = os.path.abspath(path)
    return pafs.FileSystem.from_uri(path)


def list_files(
    fs: pafs.FileSystem, path: str, extensions: Sequence[str], *, ignore_prefixes: tuple[str, ...] = (".", "_")
) -> list[str]:
    """Files under path (recursively) whose extension is in extensions (case-insensitive); a file
    path is returned as itself.

    Files and folders (below path) whose name starts with one of ignore_prefixes are left out, as
    pyarrow datasets do: `.ipynb_checkpoints/`, macOS `._x.jpg` forks, Spark's `_temporary/` partial
    shards are not data.
    """
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    exts = tuple("." + e.lower() for e in extensions)

    def hidden(p: str) -> bool:
        return any(part.startswith(ignore_prefixes) for part in p[len(path) :].split("/") if part)

    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(exts) and not hidden(i.path)
    )


def file_shuffle(seed: int | None) -> FileShuffleConfig | None:
    """The read-time file order of a source with file_shuffle_seed=seed (None: listing order)."""
    # Reseeded per execution (epoch) from the dataset's execution index, so epochs differ but a
    # rerun with the same seed repeats them. Streams, unlike randomize_block_order (a barrier).
    return None if seed is None else FileShuffleConfig(seed=seed, reseed_after_execution=True)


def execution_index(context: DataContext | None = None) -> int:
    """The epoch Ray Data is executing: context's execution counter (by default the current task's context)."""
    return int(getattr(context if context is not None else DataContext.get_current(), EPOCH_ATTR))
