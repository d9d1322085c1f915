"""Hostile-job rows that need the NVFlare simulator (issues 13, 14): without ``--privacy`` the sites apply their
own policy, whose default scope runs the shipped (defended) job and refuses a job that asks for the level it blocks,
naming the site; a hung site under ``on_site_failure=continue`` does not hold ``simulate`` once the job has ended."""

import contextlib
import os
import re
import signal
import time

import psutil
import pytest
from helpers import TINY_NETWORK, TINY_SIZE

from split_unet.jobs import training_settings
from split_unet.launch.simulation import run_simulation

pytestmark = pytest.mark.simulator

HARD_LIMIT_S = 900
GRACE_S = 5


def _site_worker(site: str) -> psutil.Process:
    """The simulator's worker process of ``site``: a descendant of this test's process."""
    return next(p for p in psutil.Process().children(recursive=True)
                if "simulator_worker" in " ".join(p.cmdline()) and f"--client {site}" in " ".join(p.cmdline()))


def test_scope_without_privacy_file_and_a_hung_site(project_root, tiny_data, tmp_path, hard_limit):
    _, sites = tiny_data
    events: dict[str, float | int] = {}

    def progress(line: str) -> None:
        if "training /" in line and "hung" not in events:  # the controller starts training: t2w stops answering
            events["hung"] = _site_worker("t2w").pid
            events["stopped_at"] = time.time()
            os.kill(events["hung"], signal.SIGSTOP)
        if line.startswith("summary written"):
            events["summary_at"] = time.monotonic()

    # The shipped job's defence on the tiny network (levels 1 and 2, NoPeek, warm-up, gradient noise), under the
    # sites' default scope. The init task (the sites read and check their data) and the first training round (they
    # warm up first: 96 tiny steps, seconds) have the init timeout, here 60 s, which t2w's silence then runs out;
    # a later training round of the tiny network takes about a second on an idle machine, so 20 s is generous.
    train = {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1, "val_fraction": 0.25}
    try:
        job = training_settings(train, controller_args={"task_timeout": 20, "init_timeout": 60,
                                                        "on_site_failure": "continue"})
        summary = run_simulation(sites, tmp_path / "ws", job, site_configs=project_root / "site_configs",
                                 progress=progress, grace_seconds=GRACE_S)
        returned_at = time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(events["hung"], signal.SIGCONT)
    assert "error" not in summary, summary.get("error")
    lost = summary["lost_sites"]
    assert list(lost) == ["t2w"] and "timeout" in lost["t2w"]["reason"], lost
    # Found lost once the first training round's timeout (the init timeout: the sites warm up in it) ran out, not
    # much later (slack for a busy machine).
    assert 60 - 10 <= lost["t2w"]["detected_at"] - events["stopped_at"] <= 60 + 60
    # simulate returned once the job had ended: the grace period, then SIGTERM (SIGKILL 10 s later for a stopped
    # process), with room for a busy machine.
    assert returned_at - events["summary_at"] < GRACE_S + 60, returned_at - events["summary_at"]
    assert not psutil.pid_exists(events["hung"]) or psutil.Process(events["hung"]).status() == psutil.STATUS_ZOMBIE
    assert "stopped the simulator and the processes it started" in (tmp_path / "ws" / "simulator.log").read_text()
    # The shipped job passed the sites' default scope (its TrainingRequirements and LevelBlocking).
    config = summary["config"]
    assert config["scope"] is None and config["network"]["levels"] == [1, 2] and config["nopeek_weight"] == 1.0
    assert config["privacy_warmup_steps"] == 96


def test_the_sites_default_scope_refuses_a_job_asking_for_the_level_it_blocks(project_root, tiny_data, tmp_path,
                                                                             hard_limit):
    _, sites = tiny_data
    train = {"size": TINY_SIZE, "network": {**TINY_NETWORK, "levels": [0, 1, 2]}, "epochs": 1}
    summary = run_simulation(sites, tmp_path / "ws", training_settings(train),
                             site_configs=project_root / "site_configs", progress=None)
    assert "error" in summary
    log = (tmp_path / "ws" / "simulator.log").read_text()
    assert re.search(r"site '(flair|t1w|t1gd|t2w)', field 'network.levels': the site's policy blocks levels \[0\]",
                     log), summary["error"]
