"""File helpers shared across layers (no torch, Ray or config)."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_path(directory: str, name: str) -> str:
    """`<directory>/<name>.safetensors` (a self-describing export), or an older run's `<name>.pt` when only that
    exists."""
    new, old = os.path.join(directory, name + ".safetensors"), os.path.join(directory, name + ".pt")
    return old if os.path.isfile(old) and not os.path.isfile(new) else new
