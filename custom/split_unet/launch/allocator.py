"""glibc's allocator for every process the project starts: one heap, and a step's large blocks kept for the next.

A training step allocates and frees the same large tensors every time (one fused level of four sites' activations
is 67 MB at 64^3 and batch 2). glibc serves a block above its mmap threshold (dynamic, at most 32 MiB) with a mapping
of its own and unmaps it on free, and a thread's own arena (NVFlare runs the decoder and each site's task on worker
threads) cannot hold a block beyond its 64 MiB heap: each step then faults its tensors in again, page by page
(130,000 minor faults in one decoder step at 64^3, 0.66 s against 0.42 s without them). One arena and an mmap
threshold of 96 MiB serve every block of a 64^3 step from the heap, where the next step reuses it; a trim threshold of
192 MiB keeps the heap's top. Larger blocks are mapped as before: held in the heap, the 134-537 MB levels of 128^3
leave holes that torch's 64-byte-aligned requests cannot reuse (a 1 GiB threshold took a 128^3 step's peak from 6.6
to 11.0 GB; ``docs/performance.md``, "The allocator").

The settings reach a process through ``GLIBC_TUNABLES``, which glibc reads when the process starts
(``tuned_environment``, for the processes the launchers start), or through ``mallopt(3)`` before the process's
threads first allocate (``tune_this_process``, for the command line's own process). A tunable the environment
already sets is left as set. On a C library other than glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Mapping

ENV_TUNABLES = "GLIBC_TUNABLES"
TUNABLES = {"glibc.malloc.arena_max": 1, "glibc.malloc.mmap_threshold": 96 << 20,
            "glibc.malloc.trim_threshold": 192 << 20}
MALLOPT_PARAMETERS = {"glibc.malloc.arena_max": -8, "glibc.malloc.mmap_threshold": -3,  # glibc's malloc.h
                      "glibc.malloc.trim_threshold": -1}


def _items(environ: Mapping[str, str]) -> list[str]:
    """The ``name=value`` items of the environment's ``GLIBC_TUNABLES``."""
    return [item for item in environ.get(ENV_TUNABLES, "").split(":") if item]


def _open(environ: Mapping[str, str]) -> dict[str, int]:
    """The allocator's tunables that the environment does not set itself."""
    named = {item.split("=", 1)[0] for item in _items(environ)}
    return {name: value for name, value in TUNABLES.items() if name not in named}


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the allocator's tunables added to ``GLIBC_TUNABLES`` (those it names already are kept)."""
    items = _items(environ) + [f"{name}={value}" for name, value in _open(environ).items()]
    return {**environ, ENV_TUNABLES: ":".join(items)}


def tune_this_process(environ: Mapping[str, str]) -> bool:
    """The same settings for the calling process, by ``mallopt``; the arena limit holds only if no second thread
    has allocated yet. True when every setting the environment leaves open took effect (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # another C library (musl) has no mallopt
        return False
    return all(mallopt(MALLOPT_PARAMETERS[name], value) == 1 for name, value in _open(environ).items())
