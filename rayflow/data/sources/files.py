"""Many small files as Ray Data blocks of {path, bytes}: the image folder's read.

`ray.data.read_binary_files` builds one Arrow block per file (a path column filled per block, the compression
sniffed from the name, the path parsed for partitions, a retry wrapper per open) and concatenates the one-row
blocks again: ~130 us of CPU per file in-process and ~210 us in a Ray task on the 2-core box, as much as decoding
and resizing a 64 px JPEG (benchmarks/README.md, "Ingest"). `FileBytesDatasource` reads each file with one
`open_input_stream(...).read()` (~7 us) and builds one block per many files. The file order, and the split of
files over read tasks, are those of `read_binary_files` with the same `FileShuffleConfig`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from ray.data import DataContext, FileShuffleConfig
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from rayflow.data.sources.listing import execution_index

# A read block closes at whichever comes first: enough files to amortise the block's cost, or enough bytes to
# keep a task's memory bounded on full-size images (ImageNet JPEGs average ~110 kB).
BLOCK_FILES = 1024
BLOCK_BYTES = 64 << 20
# Files per read task that Ray's split is coarsened to (ceil(files / TASK_FILES) tasks, at most Ray's count): Ray
# Data costs each task ~0.1 s of scheduling around it, so its default split (16,000 64 px JPEGs into 45 tasks of
# ~120 ms) left the two CPUs of a small box idle half the time (benchmarks/README.md, "Read tasks of up to a block").
TASK_FILES = BLOCK_FILES
_SIZE_SAMPLE = 32  # files whose size is looked up to estimate the read's size (Ray picks the task count from it)


def shuffled(paths: Sequence[str], shuffle: FileShuffleConfig | None, execution_idx: int) -> list[str]:
    """paths in the order `read_binary_files(shuffle=shuffle)` reads them in execution (epoch) execution_idx."""
    paths = list(paths)
    if shuffle is not None and paths:
        np.random.default_rng(shuffle.get_seed(execution_idx)).shuffle(paths)
    return paths


def read_files(fs: pafs.FileSystem, paths: Sequence[str]) -> Iterator[pa.Table]:
    """{path: string, bytes: binary} tables of paths' whole contents, at most BLOCK_FILES rows / ~BLOCK_BYTES each.

    A file that cannot be read raises (OSError): the task fails and Ray retries it; only decoding has a skip
    policy (`rayflow.data.sources.skips`)."""
    names: list[str] = []
    datas: list[bytes] = []
    size = 0
    for path in paths:
        with fs.open_input_stream(path) as f:
            data = f.read()
        names.append(path)
        datas.append(data)
        size += len(data)
        if len(names) >= BLOCK_FILES or size >= BLOCK_BYTES:
            yield _table(names, datas)
            names, datas, size = [], [], 0
    if names:
        yield _table(names, datas)


def _table(names: list[str], datas: list[bytes]) -> pa.Table:
    return pa.table({"bytes": pa.array(datas, type=pa.binary()), "path": pa.array(names, type=pa.string())})


class FileBytesDatasource(Datasource):
    """Ray Data source of {bytes, path} rows, one per file: `ray.data.read_datasource(FileBytesDatasource(...))`.

    shuffle reorders the files per execution like `read_binary_files(shuffle=...)`: reseeded from the dataset's
    execution index when `reseed_after_execution`, so epochs differ and a rerun repeats them. Files are split
    evenly over Ray's requested number of read tasks, or over ceil(files / task_files) tasks if that is fewer
    (tasks of task_files / 2 to task_files files: fewer, larger tasks, still at least two where there are
    more than task_files files, so two CPUs both get work)."""

    def __init__(self, paths: Sequence[str], filesystem: pafs.FileSystem, shuffle: FileShuffleConfig | None = None,
                 *, task_files: int = TASK_FILES):
        super().__init__()
        if not paths:
            raise ValueError("FileBytesDatasource needs at least one file")
        if task_files < 1:
            raise ValueError(f"task_files={task_files} must be >= 1")
        self._paths, self._fs, self._shuffle = list(paths), filesystem, shuffle
        self._task_files = int(task_files)
        sample = self._paths[:: max(1, len(self._paths) // _SIZE_SAMPLE)][:_SIZE_SAMPLE]
        sizes = [i.size for i in filesystem.get_file_info(sample) if i.type == pafs.FileType.File]
        self._mean_size = int(np.mean(sizes)) if sizes else None

    def default_tasks(self) -> int:
        """ceil(files / task_files): the read task count to ask Ray for (`override_num_blocks`)."""
        return -(-len(self._paths) // self._task_files)

    def get_name(self) -> str:
        return "FileBytes"  # Ray names the read operator "ReadFileBytes"

    def estimate_inmemory_data_size(self) -> int | None:
        return None if self._mean_size is None else self._mean_size * len(self._paths)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: DataContext | None = None) -> list[ReadTask]:
        paths = shuffled(self._paths, self._shuffle, execution_index(data_context) if data_context is not None else 0)
        fs, tasks = self._fs, []
        # Ray's parallelism caps the task count; task_files keeps tasks from being too small to pay for themselves
        n_tasks = max(1, min(parallelism, self.default_tasks()))
        for chunk in np.array_split(np.array(paths, dtype=object), n_tasks):
            chunk = chunk.tolist()
            size = None if self._mean_size is None else self._mean_size * len(chunk)
            meta = BlockMetadata(num_rows=len(chunk), size_bytes=size, exec_stats=None, input_files=chunk)
            # a partial, not a closure: unpickling it imports this module (and pyarrow.fs) before the filesystem,
            # which pyarrow's S3FileSystem needs (Ray's own reads wrap it for the same reason, ray#17085)
            read = functools.partial(read_files, fs, chunk)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks
