"""FileBytesDatasource: read_binary_files' rows, file order and task split, without its per-file blocks."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray

from rayflow.data.sources import files
from rayflow.data.sources.files import FileBytesDatasource, read_files
from rayflow.data.sources.listing import file_shuffle


def _write(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / f"f{i:03d}.bin"
        p.write_bytes(bytes([i % 256]) * (i + 1))  # distinct contents, i + 1 bytes
        paths.append(str(p))
    return paths


def test_read_files_blocks_hold_each_files_bytes_and_close_at_the_file_or_byte_limit(tmp_path, monkeypatch):
    paths = _write(tmp_path, 10)
    fs = pafs.LocalFileSystem()
    monkeypatch.setattr(files, "BLOCK_FILES", 4)
    blocks = list(read_files(fs, paths))
    assert [b.num_rows for b in blocks] == [4, 4, 2]
    rows = [r for b in blocks for r in b.to_pylist()]
    assert [r["path"] for r in rows] == paths
    assert all(r["bytes"] == Path(r["path"]).read_bytes() for r in rows)
    monkeypatch.setattr(files, "BLOCK_BYTES", 10)  # files of 1..10 bytes: blocks close once they reach 10 bytes
    assert [b.num_rows for b in read_files(fs, paths)] == [4, 2, 2, 2]  # 1+2+3+4, 5+6, 7+8, 9+10


def test_a_missing_file_raises_naming_it(tmp_path):
    paths = _write(tmp_path, 2)
    Path(paths[1]).unlink()
    with pytest.raises(FileNotFoundError, match="f001.bin"):
        list(read_files(pafs.LocalFileSystem(), paths))


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("seed", [None, 7])
def test_rows_order_and_task_split_equal_read_binary_files_in_every_epoch(tmp_path, seed):
    """The folder source switched readers: a seeded run must see the files in the order, and split over read
    tasks (hence blocks), that read_binary_files gave it, epoch after epoch."""
    paths = _write(tmp_path, 37)
    fs = pafs.LocalFileSystem()

    def epochs(ds: ray.data.Dataset) -> list[list[tuple[str, bytes]]]:
        ds.context.execution_options.preserve_order = True
        return [[(r["path"], r["bytes"]) for r in ds.iter_rows()] for _ in range(2)]

    ours = ray.data.read_datasource(FileBytesDatasource(paths, fs, file_shuffle(seed), task_files=1),
                                    override_num_blocks=5)
    theirs = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True, shuffle=file_shuffle(seed),
                                        override_num_blocks=5)
    got, want = epochs(ours), epochs(theirs)
    assert got == want
    assert sorted(p for p, _ in got[0]) == paths
    assert (got[0] != got[1]) == (seed is not None)  # reseeded per epoch when shuffled
    tasks = FileBytesDatasource(paths, fs, file_shuffle(seed), task_files=1).get_read_tasks(5)
    assert [t.metadata.num_rows for t in tasks] == [8, 8, 7, 7, 7]
    assert sum(len(t.metadata.input_files) for t in tasks) == 37


def test_read_tasks_are_coarsened_to_task_files(tmp_path):
    paths = _write(tmp_path, 37)
    fs = pafs.LocalFileSystem()
    split = lambda n, **kw: [t.metadata.num_rows for t in FileBytesDatasource(paths, fs, **kw).get_read_tasks(n)]  # noqa: E731
    assert split(5, task_files=10) == [10, 9, 9, 9]  # ceil(37 / 10) = 4 tasks, not Ray's 5
    assert split(2, task_files=10) == [19, 18]  # Ray's count still caps it
    assert split(200, task_files=20) == [19, 18]  # at least half of task_files per task
    assert split(200, task_files=100) == [37]  # fewer files than that: one task
    assert split(200) == [37]  # the default floor is one full block (files.BLOCK_FILES)
    with pytest.raises(ValueError, match="task_files"):
        FileBytesDatasource(paths, fs, task_files=0)


def test_an_empty_file_list_is_refused():
    with pytest.raises(ValueError, match="at least one file"):
        FileBytesDatasource([], pafs.LocalFileSystem())
