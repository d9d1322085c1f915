"""The process readings the benchmark and the federation's summary take: CPU seconds and memory."""

import mmap
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from split_unet.profiling import cpu_seconds, peak_memory_mb, process_cpu_seconds, resident_memory_mb

pytestmark = pytest.mark.unit


def test_own_cpu_seconds_agree_with_getrusage_and_grow_with_work():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    before = cpu_seconds()
    # Both read the kernel's counters of this process; rounding to 0.01 s and the instants apart allow 0.05 s.
    assert before == pytest.approx(usage.ru_utime + usage.ru_stime, abs=0.05)
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert cpu_seconds() >= before + 0.25


def test_another_process_cpu_seconds_and_none_once_it_is_gone():
    # Busy for 0.6 s of CPU by its own clock; /proc counts in ticks of 10 ms and the reading is rounded to 0.01 s,
    # so at least 0.5 s is certain to show (0.5 s exactly was read as 0.49 once).
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.6\n"
                             "while time.process_time() < end: pass\nimport sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120  # generous: the interpreter's start on a loaded machine
        while (process_cpu_seconds(busy.pid) or 0) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_cpu_seconds(busy.pid) >= 0.5
    finally:
        busy.communicate(b"")
    assert process_cpu_seconds(busy.pid) is None


def _file_backed_mb() -> float:
    """Resident pages of mapped files (libraries): the kernel may drop them under another process's memory
    pressure at any time, so they move the resident size without this process doing anything."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_resident_memory_follows_an_allocation_and_the_peak_keeps_it():
    def anonymous() -> float:  # the resident size without mapped files' pages (see _file_backed_mb)
        return resident_memory_mb() - _file_backed_mb()

    before = anonymous()
    # 64 MiB of fresh anonymous pages, one byte written in each, so resident. Not an array from the allocator: in
    # a test process that ran other tests it may hand back memory freed earlier and still resident (the suite saw
    # a growth of exactly 0.0 MiB twice).
    block = mmap.mmap(-1, 64 * 2**20)
    pages = np.frombuffer(block, dtype=np.uint8)
    pages[::mmap.PAGESIZE] = 1
    # The kernel's per-CPU batching of its page counters may show the pages late, and library pages dropped
    # meanwhile move the resident size (left out above): read again for up to 5 s before concluding.
    deadline, grown = time.monotonic() + 5, anonymous() - before
    while grown < 56 and time.monotonic() < deadline:
        time.sleep(0.05)
        grown = anonymous() - before
    during = resident_memory_mb()
    assert grown == pytest.approx(64, abs=8)  # allocator and page-table overhead: a few MiB
    # The peak (VmHWM) and psutil's resident size (statm) come from two kernel readings whose counters are
    # batched per CPU: they may differ by a few pages, hence 1 MiB.
    assert peak_memory_mb() >= during - 1
    del pages
    block.close()
    assert peak_memory_mb() >= during - 1
