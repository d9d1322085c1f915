"""glibc's allocator, set so that the large buffers of every step go back to the system when freed.

glibc serves a block of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and unmaps it on ``free``; but
the threshold is dynamic: each time such a block is freed, it rises to that block's size (up to 32 MiB). After the
first step, every message buffer, decoded tensor and gradient of a step (1 to 11 MB at 64^3) is therefore
carved out of the heaps of the thread that allocates it, and NVFlare allocates on many threads: the freed
space of each arena is reused only by that arena and rarely returned, so the resident memory of the server
grew with every step (measured in docs/performance/wire.md). Setting the threshold explicitly turns the
dynamic rise off (``mallopt(3)``). Python offers no API for it; ctypes is how it is reached.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt(3) parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks of 1 MiB and more: a U-Net level of a batch, never Python's small objects


def release_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve blocks of ``threshold`` bytes and more by mmap, returned to the system on free (glibc only; elsewhere
    nothing happens). Returns True when the setting took effect."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # another C library (musl) has no mallopt
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
