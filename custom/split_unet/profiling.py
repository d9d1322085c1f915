"""Figures a benchmark needs from inside a process: its peak memory, step-time statistics and (opt-in) a CPU
profile of all its threads."""

from __future__ import annotations

import json
import os
import resource
import sys
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MiB.

    psutil reports no peak resident memory on Linux or macOS (only Windows' ``peak_wset``), hence by hand:
    Linux: ``VmHWM`` of ``/proc/self/status``, because ``ru_maxrss`` survives ``exec`` there and a process
    started by a larger one would report its parent's peak. Elsewhere ``ru_maxrss`` (bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far, all its threads."""
    return process_cpu_seconds(os.getpid())


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of a process so far; None where it is gone or not ours to read.

    A job process reads its parent's with it: in POC the parent relays every message of the job (NVFlare's
    server or client process), and its CPU is part of what the federation costs."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:  # NoSuchProcess, AccessDenied, ZombieProcess
        return None
    return round(times.user + times.system, 2)


def resident_memory_mb() -> float:
    """Current resident memory of this process in MiB."""
    return round(psutil.Process().memory_info().rss / 2**20, 1)


class CpuPerStep:
    """CPU seconds per step of one process, from the end of its first step to the end of its last (start-up,
    imports and the first step's allocations left out). ``mark`` takes ``cpu_seconds()`` at each step's end."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.steps = 0

    def mark(self, seconds: float) -> None:
        self.first = seconds if self.first is None else self.first
        self.last = seconds
        self.steps += 1

    @property
    def per_step(self) -> float | None:
        return round((self.last - self.first) / (self.steps - 1), 4) if self.steps > 1 else None


def step_statistics(seconds: Sequence[float], warmup: int = 1) -> dict:
    """Median and spread of step times, the first ``warmup`` steps left out (allocation, caches, JIT)."""
    kept = np.asarray(seconds[warmup:] if len(seconds) > warmup else seconds, dtype=float)
    if kept.size == 0:
        return {"steps": 0}
    return {"steps": int(kept.size), "median": float(np.median(kept)), "p10": float(np.percentile(kept, 10)),
            "p90": float(np.percentile(kept, 90)), "mean": float(kept.mean())}


# Opt-in CPU profile of a federation's processes: a folder in this variable makes the server's controller and
# every site's executor profile their process (all threads, CPU time per thread) and write it there at the end.
PROFILE_ENV = "SPLIT_UNET_PROFILE"
PROFILE_FRAMES = 12  # frames kept per traced allocation: enough to reach the caller in NVFlare or split_unet


def start_profile() -> bool:
    """Start profiling this process if ``SPLIT_UNET_PROFILE`` names a folder; True if it runs.

    yappi (a development dependency) because it measures CPU time per thread, including threads that NVFlare
    started before this call; cProfile sees only the thread that enables it and py-spy counted threads blocked
    in ``Condition.wait`` as running in this container.
    """
    if not os.environ.get(PROFILE_ENV):
        return False
    import yappi

    if not yappi.is_running():
        yappi.set_clock_type("cpu")
        yappi.start(builtins=True, profile_threads=True)
    if not tracemalloc.is_tracing():  # what is still allocated at the end: what a run accumulates
        tracemalloc.start(PROFILE_FRAMES)
    return True


def save_profile(name: str) -> Path | None:
    """Write this process's profile as ``<SPLIT_UNET_PROFILE>/<name>-<pid>.pstat`` (readable with ``pstats``),
    with the process's CPU seconds and peak memory beside it (``.json``) and its largest live Python allocations
    (``.memory.txt``, tracemalloc); None when profiling is off."""
    folder = os.environ.get(PROFILE_ENV)
    if not folder:
        return None
    import yappi

    if not yappi.is_running():
        return None
    yappi.stop()
    path = Path(folder) / f"{name}-{os.getpid()}.pstat"
    path.parent.mkdir(parents=True, exist_ok=True)
    yappi.get_func_stats().save(str(path), type="pstat")
    path.with_suffix(".json").write_text(json.dumps({
        "name": name, "pid": os.getpid(), "cpu_seconds": cpu_seconds(), "peak_memory_mb": peak_memory_mb(),
        "threads": [{"name": t.name, "cpu_seconds": round(t.ttot, 3)} for t in yappi.get_thread_stats()]}))
    yappi.clear_stats()
    if tracemalloc.is_tracing():
        live = tracemalloc.take_snapshot().statistics("traceback")
        path.with_suffix(".memory.txt").write_text("\n\n".join(
            f"{stat.size / 2**20:.1f} MiB in {stat.count} blocks\n" + "\n".join(stat.traceback.format())
            for stat in live[:20]))
        tracemalloc.stop()
    return path
