"""Keep freed CPU memory in the process for reuse (glibc), instead of handing it back to the OS after every op.

PyTorch's CPU allocator calls malloc/free for every intermediate tensor. With glibc's defaults a step of the demo
UNet returns its activations to the kernel and faults them back in on the next step: ~10,000 minor page faults
per update, 10-30% of a CPU step (`benchmarks/train_step.py`, and its README section). Raising the mmap
threshold and the trim threshold keeps that memory mapped, so the next step reuses it. Memory held by the process
then stays at its peak, as with PyTorch's CUDA caching allocator on a GPU. No torch, Ray or config imports.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit; blocks above it are mmapped and unmapped on free
TRIM_THRESHOLD = 1 << 30  # return free heap top to the OS only beyond 1 GiB


def keep_freed_memory() -> bool:
    """Apply the settings to this process; False where they do not apply (not Linux/glibc) or glibc refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
