"""The simulator launcher (``launch.simulation``): one privacy policy for every site, and a simulator that hangs
after its job ended is stopped with the processes it started."""

import shutil
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from split_unet.errors import DataError
from split_unet.launch.simulation import _follow, simulation_policy, stop_process_tree

pytestmark = pytest.mark.unit


def test_the_simulator_applies_the_sites_own_policy_and_refuses_sites_that_differ(project_root, tmp_path):
    clients = ["flair", "t1w", "t1gd", "t2w"]
    policy = simulation_policy(clients, project_root / "site_configs", None)
    assert policy == project_root / "site_configs" / "flair" / "local" / "privacy.json"
    shutil.copytree(project_root / "site_configs", tmp_path / "site_configs")
    (tmp_path / "site_configs" / "t2w" / "local" / "privacy.json").unlink()
    with pytest.raises(DataError, match=r"one privacy policy to every site, but the policies of \['t2w'\] differ"):
        simulation_policy(clients, tmp_path / "site_configs", None)


HUNG_SIMULATOR = textwrap.dedent("""
    import subprocess, sys, time
    # A client worker in a session of its own, as NVFlare's simulator starts them; it never exits.
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(sys.argv[1], "a") as log:
        log.write("2026-01-01 00:00:00 - ServerRunner - INFO - [identity=simulator_server, run=simulate_job] - "
                  "Server runner finished.\\n")
    time.sleep(600)
""")


def test_a_simulator_that_hangs_after_the_job_ended_is_stopped_with_the_processes_it_started(tmp_path):
    log = tmp_path / "simulator.log"
    log.write_text("")
    process = subprocess.Popen([sys.executable, "-c", HUNG_SIMULATOR, str(log)], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(psutil.Process(process.pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = psutil.Process(process.pid).children()[0]
        started = time.monotonic()
        _follow(process, log, tmp_path / "progress.jsonl", None, grace_seconds=2)
        assert time.monotonic() - started < 60  # the 2 s grace, then SIGTERM (10 s before SIGKILL)
        assert process.poll() is not None and not worker.is_running()
        assert "stopped the simulator and the processes it started" in log.read_text()
    finally:
        if process.poll() is None:
            stop_process_tree(process)

