"""The allocator setting of the processes the project starts: large blocks freed by one step are reused by the next
without faulting their pages in again."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from split_unet.launch.allocator import ENV_TUNABLES, TUNABLES, tuned_environment
from split_unet.launch.poc import PocFederation

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")]

# A child allocates, fills and frees a 64 MiB tensor (the size of a 64^3 step's largest level: above glibc's dynamic
# mmap threshold, below the setting's) again and again, as a training step does with its activations
# (torch takes its CPU memory from malloc, in pages of the base size: NumPy would ask for huge pages); it prints the
# minor page faults of the last rounds. Served by a fresh mapping each time, every round faults in all of its 16,384
# pages; served from the blocks earlier rounds freed, none once the heap has settled (glibc's aligned allocation
# leaves a few rounds' blocks unused first).
ROUNDS, MEASURED = 24, 4
FILL_FAULTS = """
import resource
import torch
{setup}
faults = []
for _ in range({rounds}):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(64 << 20, dtype=torch.uint8)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del tensor
print(sum(faults[-{measured}:]))
"""
PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def last_rounds_faults(environ: dict, setup: str = "") -> int:
    script = FILL_FAULTS.format(setup=setup, rounds=ROUNDS, measured=MEASURED)
    result = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, check=True,
                            timeout=300)
    return int(result.stdout.split()[-1])


def test_tuned_environment_adds_every_tunable_and_keeps_what_the_environment_sets():
    environ = {"PATH": "/bin", ENV_TUNABLES: "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0"}
    tuned = tuned_environment(environ)
    items = dict(item.split("=") for item in tuned[ENV_TUNABLES].split(":"))
    assert tuned["PATH"] == "/bin" and environ[ENV_TUNABLES] == "glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0"
    assert items == {"glibc.malloc.arena_max": "4", "glibc.malloc.tcache_count": "0",
                     **{name: str(value) for name, value in TUNABLES.items() if name != "glibc.malloc.arena_max"}}
    assert dict(item.split("=") for item in tuned_environment({})[ENV_TUNABLES].split(":")) == \
        {name: str(value) for name, value in TUNABLES.items()}


def test_a_started_process_reuses_a_freed_large_block_where_an_untuned_one_maps_it_again():
    plain = {key: value for key, value in os.environ.items() if key != ENV_TUNABLES}
    untuned = last_rounds_faults(plain)
    tuned = last_rounds_faults(tuned_environment(plain))
    assert untuned > 0.9 * MEASURED * PAGES  # glibc's own default maps a block this large afresh every time
    assert tuned < 0.05 * MEASURED * PAGES, (tuned, untuned)


def test_the_command_line_tunes_its_own_process_the_same_way():
    plain = {key: value for key, value in os.environ.items() if key != ENV_TUNABLES}
    setup = "import os\nfrom split_unet.launch.allocator import tune_this_process\nassert tune_this_process(os.environ)"
    assert last_rounds_faults(plain, setup) < 0.05 * MEASURED * PAGES


def test_the_poc_federation_starts_its_processes_tuned(tmp_path):
    federation = PocFederation(tmp_path / "federation", tmp_path / "sites")
    assert federation.env[ENV_TUNABLES] == tuned_environment(os.environ)[ENV_TUNABLES]


def test_the_deployment_guide_starts_a_kit_with_the_launchers_setting():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "federation.md").read_text()
    assert f"{ENV_TUNABLES}={tuned_environment({})[ENV_TUNABLES]} startup/start.sh" in guide
