"""Both transports of the server's requests (``protocol.transport``) through the real NVFlare simulator: every site
filter and privacy scope and every server filter runs on every request and answer, a job a site's scope refuses is
refused, and a site that hangs past the task timeout is lost as the job's policy says."""

import contextlib
import json
import os
import signal
import time
from collections import Counter

import pytest
from helpers import TINY_NETWORK, TINY_SIZE, simulator_worker
from job_edits import EVERY_FILTER_POLICY, EVERY_SITE_FILTER, add_filter_logs, read_log

from split_unet.data import MODALITIES as SITES
from split_unet.jobs import export, training_settings
from split_unet.launch.simulation import SIMULATE_JOB, run_simulation, simulate
from split_unet.leakage.record import load_record
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_REQUEST, TASK_TRAIN

pytestmark = pytest.mark.simulator

HARD_LIMIT_S = 900


@pytest.mark.parametrize("transport", ["poll", "push"])
def test_every_filter_runs_on_every_request_and_answer(project_root, tiny_data, tmp_path, transport, hard_limit):
    _, sites = tiny_data
    policy = tmp_path / "privacy.json"
    policy.write_text(json.dumps(EVERY_FILTER_POLICY))
    # The shipped defence (its server's gradient protection) under the scope, the leakage recorder on at step 1.
    train = {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1, "val_fraction": 0.25}
    settings = training_settings(train, scope=EVERY_SITE_FILTER["name"], record_steps=[1], transport=transport,
                                 executor_args={"num_threads": 1})
    job = export(settings, tmp_path / "job")
    add_filter_logs(job)
    workspace = tmp_path / "ws"
    simulate(job, workspace, sites, project_root / "site_configs", progress=None, privacy_file=policy)
    server_run = workspace / "simulator" / "server" / SIMULATE_JOB
    summary = json.loads((server_run / "summary.json").read_text())
    assert "error" not in summary, summary.get("error")
    steps = summary["steps"]
    assert set(summary["privacy"]) == set(SITES)  # every site's ActivationClipNoise reported its budget

    server = read_log(server_run)
    for site in SITES:
        site_log = read_log(workspace / "simulator" / site / SIMULATE_JOB)
        # The site's own chains ran on every request (in) and answer (out), in the same number as the server's.
        for direction, server_direction in (("in", "out"), ("out", "in")):
            seen = Counter(e["task"] for e in site_log if e["direction"] == direction)
            sent = Counter(e["task"] for e in server if e["direction"] == server_direction and e["peer"] == site)
            assert seen == sent and seen[TASK_TRAIN] >= steps, (site, direction, seen, sent)
        # Every gradient the site received went through the server's gradient protection, and every activation
        # the server received through the site scope's noise (and its level blocking, which had nothing to block),
        # as the history shows. (The simulator applies the sites' scope in the server process, on the server's side
        # of each chain; POC at the sites: test_poc_push.)
        gradients = [e for e in site_log if e["kind"] == KIND_REQUEST and e["tensors"]]
        assert gradients and all("GradientProtection" in e["history"] for e in gradients)
        answers = [e for e in server if e["peer"] == site and e["kind"] == KIND_ACTIVATIONS and e["tensors"]]
        assert len(answers) >= steps and all("ActivationClipNoise" in e["history"] for e in answers)
    # The leakage recorder (last in the server's chains) kept step 1 of every site.
    assert sorted(exchange.site for exchange in load_record(server_run / "leakage_record")) == sorted(SITES)
    assert summary["config"]["network"]["levels"] == [1, 2] and summary["config"]["nopeek_weight"] == 1.0


# Polled: test_hostile_jobs_simulator (the sites' default scope refuses a job asking for a level it blocks).
@pytest.mark.parametrize("transport", ["push"])
def test_a_job_the_sites_scope_refuses_is_refused(project_root, tiny_data, tmp_path, transport, hard_limit):
    _, sites = tiny_data
    # Under the sites' default scope (TrainingRequirements: NoPeek at least 1.0), a job without NoPeek.
    train = {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1, "nopeek_weight": 0.0, "privacy_warmup_steps": 0}
    summary = run_simulation(sites, tmp_path / "ws", training_settings(train, transport=transport),
                             site_configs=project_root / "site_configs", progress=None)
    assert "error" in summary and summary["rounds_done"] == 0, summary
    log = (tmp_path / "ws" / "simulator.log").read_text()
    assert "nopeek_weight" in log and "TrainingRequirements" in log


# Polled: test_hostile_jobs_simulator (a hung site under the sites' default scope, lost as its timeout runs out).
@pytest.mark.parametrize("transport", ["push"])
def test_a_site_hung_past_the_task_timeout_is_lost(project_root, tiny_data, tmp_path, transport, hard_limit):
    _, sites = tiny_data
    events: dict = {}

    def progress(line: str) -> None:
        if "training /" in line and "hung" not in events:  # the controller starts training: t2w stops answering
            events["hung"] = simulator_worker("t2w").pid
            events["stopped_at"] = time.time()
            os.kill(events["hung"], signal.SIGSTOP)

    task_timeout = 15  # a training round of the tiny network takes about a second on an idle machine
    train = {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1}
    job = training_settings(train, scope="undefended", transport=transport,
                            controller_args={"task_timeout": task_timeout, "on_site_failure": "continue"})
    try:
        summary = run_simulation(sites, tmp_path / "ws", job, site_configs=project_root / "site_configs",
                                 progress=progress, grace_seconds=5)
    finally:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(events["hung"], signal.SIGCONT)
    assert "error" not in summary, summary.get("error")
    lost = summary["lost_sites"]
    assert list(lost) == ["t2w"] and "timeout" in lost["t2w"]["reason"], lost
    # Found lost once the task timeout ran out, not much later (slack for a busy machine).
    assert task_timeout <= lost["t2w"]["detected_at"] - events["stopped_at"] <= task_timeout + 60
