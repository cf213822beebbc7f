"""ImageNet-layout image folders: `root/<class>/<image files>`, labels from the sorted class folder names."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from rayflow.data.sources.decode import Row, check_options, decode_rows, map_decode
from rayflow.data.sources.files import FileBytesDatasource
from rayflow.data.sources.listing import file_shuffle, list_files, resolve_filesystem
from rayflow.data.sources.skips import OnError, SkipLog
from rayflow.data.transforms import CropMethod

IMAGE_EXTENSIONS = ("jpeg", "jpg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")


def list_class_files(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, list[str]]:
    """{class folder name: its image files (recursive)}, classes sorted; a class's label is its index.

    Class indices follow the sorted folder names and nothing else, so they stay stable whatever
    decodes: a class whose files all fail to decode keeps its index (and yields no rows). Folders and
    files whose name starts with "." (`.ipynb_checkpoints`, `.DS_Store`, `._x.JPEG`) are not classes
    or images. Raises ValueError if root has no class folders or a class folder holds no image file,
    because silently dropping a class would shift every later label.
    """
    fs, base = resolve_filesystem(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise ValueError(f"image folder {root!r} does not exist or is not a directory; FIX THIS by fixing the path")
    classes = sorted(
        i.base_name
        for i in fs.get_file_info(pafs.FileSelector(base))
        if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
    )
    if not classes:
        raise ValueError(
            f"image folder {root!r} has no class sub-folders; FIX THIS by using the ImageNet layout "
            "root/<class>/<image files>"
        )
    files = {c: list_files(fs, f"{base}/{c}", extensions, ignore_prefixes=(".",)) for c in classes}
    empty = [c for c, paths in files.items() if not paths]
    if empty:
        raise ValueError(
            f"class folder(s) {empty} under {root!r} hold no image files ({', '.join(extensions)}); "
            "FIX THIS by removing them or adding images (labels follow sorted folder names, so a "
            "dropped class would shift every later label)"
        )
    return files


def find_classes(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted class folder names under root (label i = classes[i]); see `list_class_files`."""
    return list(list_class_files(root, extensions))


def _decode_folder_batch(
    batch: dict[str, np.ndarray], *, base: str, class_index: dict[str, int], **decode_kwargs: Any
) -> pa.Table:
    def rows() -> Iterator[Row]:
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            path = str(path)
            yield path, data, class_index[path[len(base) :].lstrip("/").split("/")[0]], None

    return decode_rows(rows(), **decode_kwargs)


def image_folder(
    root: str,
    res: int,
    *,
    channels: int = 3,
    crop: CropMethod = "adm",
    on_error: OnError = "skip",
    skip_log: SkipLog | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    file_shuffle_seed: int | None = None,
    include_paths: bool = False,
) -> ray.data.Dataset:
    """Read an ImageNet-layout folder `root/<class>/*.JPEG|*.png...`; labels index `find_classes(root)`.

    Files are read by `FileBytesDatasource` (`read_binary_files`' rows and order at a fraction of its per-file
    cost), decoded by content and centre-cropped/resized to res by `map_decode` (fused with the read: one task
    per block of files). A file that fails to decode is skipped (and recorded in skip_log) or raises, per
    on_error. file_shuffle_seed shuffles file order per epoch; include_paths=True adds a `path` column (used by
    `rayflow.prepare`).
    """
    check_options(res, channels, on_error)
    class_files = list_class_files(root, extensions)
    fs, base = resolve_filesystem(root)
    # The listing above is reused: Ray reads exactly the files whose classes were checked.
    paths = [path for paths in class_files.values() for path in paths]
    source = FileBytesDatasource(paths, fs, file_shuffle(file_shuffle_seed))
    # as many output blocks as read tasks: asked for more, Ray splits the read's blocks and the read no longer fuses
    # with the decode (map_decode)
    ds = ray.data.read_datasource(source, override_num_blocks=source.default_tasks())
    return map_decode(
        ds,
        _decode_folder_batch,
        base=base,
        class_index={c: i for i, c in enumerate(class_files)},
        res=res,
        channels=channels,
        crop=crop,
        on_error=on_error,
        skip_log=skip_log,
        with_paths=include_paths,
    )
