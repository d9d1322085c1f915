"""Faults in a real NVFlare federation on loopback (POC): a site's process and the server's process killed
mid-training, the job's policy applied, and a resume that reaches the uninterrupted run's result.

One federation (a module fixture) serves every test, and every test runs on both transports of the server's
requests (polled and pushed tasks). The first three tests are one story told in order on each transport: the
site-kill job leaves the checkpoints that the server-kill job resumes from, whose checkpoints the last resume
finishes from; a test whose predecessor failed is skipped. Bounded: a hard alarm ends each test and the
federation's start, and the federation is stopped in every case.
"""

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from split_unet.launch.poc import PocFederation
from split_unet.protocol.checkpoint import SERVER_CHECKPOINT, site_checkpoint
from split_unet.files import load_json
from split_unet.defence import UNDEFENDED_SCOPE
from split_unet.jobs import export, training_settings
from split_unet.launch.simulation import run_simulation

from helpers import TINY_NETWORK, TINY_SIZE, free_port, make_dataset, processes_mentioning, time_limit

pytestmark = pytest.mark.poc
# Idle 2-core machine: start and reference ~1 min, each test ~1 min; the limits are generous for a loaded one.
SETUP_LIMIT_S = 900
HARD_LIMIT_S = 600
TRAIN = {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 4, "batch_size": 2, "val_interval": 3}
TRAIN_STEPS = 12  # 4 epochs of 3 batches: 6 of the 8 patients train, in pairs
TASK_TIMEOUT = 10
DETECTION_SLACK_S = 30  # beyond the task timeout, for a loaded machine; NVFlare's own defaults are minutes
CHECKPOINT_INTERVAL = 3


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def job_process(federation: PocFederation, participant: str, job_id: str) -> int:
    """The process that runs one participant's part of one job (POC starts one per job and participant)."""
    root = str(federation.site_root(participant))
    found = [pid for pid in processes_mentioning(job_id)
             if root in (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="ignore")]
    assert len(found) == 1, f"expected one job process of {participant} for job {job_id}, found {found}"
    return found[0]


def wait_for_server_checkpoint(path: Path, train_step: int, timeout: float = 300) -> None:
    """Until the server's checkpoint (written after every site saved theirs) is of ``train_step`` or later."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and torch.load(path, weights_only=True)["train_step"] >= train_step):
        assert time.monotonic() < deadline, f"no checkpoint of step {train_step} in {path} within {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def poc_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("poc_faults")


@pytest.fixture(scope="module")
def sites_dir(poc_root) -> Path:
    return make_dataset(poc_root / "data", patients=8)[1]


@pytest.fixture(scope="module")
def federation(poc_root, sites_dir, project_root):
    federation = PocFederation(poc_root / "federation", sites_dir, project_root / "site_configs", port=free_port())
    try:
        with time_limit(SETUP_LIMIT_S, "starting the POC federation"):
            federation.prepare()
            federation.start()
        yield federation
    finally:
        federation.stop()
    assert not federation.running()
    assert processes_mentioning(str(poc_root / "federation")) == []


@pytest.fixture(scope="module", params=["poll", "push"])
def transport(request) -> str:
    """Every story is told on both transports of the server's requests, in the one federation."""
    return request.param


@pytest.fixture(scope="module")
def story(transport) -> dict:
    """What the ordered tests hand on: each records its outcome under its own name."""
    return {}


@pytest.fixture(scope="module")
def uninterrupted(poc_root, sites_dir, project_root) -> dict:
    """The uninterrupted run, in the simulator (which POC reproduces to ~1e-7, test_poc), on the polled route: one
    reference for both transports, which compute the same steps."""
    reference = run_simulation(sites_dir, poc_root / "reference", training_settings(TRAIN, scope=UNDEFENDED_SCOPE),
                               site_configs=project_root / "site_configs", progress=None)
    assert reference["steps"] == TRAIN_STEPS
    return reference


def job(poc_root: Path, name: str, transport: str, **controller) -> Path:
    # Each party keeps its checkpoints in its own workspace (a job may name no other folder).
    # Undefended: the shipped defence's gradient noise is drawn afresh in every run, and resuming must end exactly as
    # the uninterrupted run.
    folder = f"checkpoints/{name}_{transport}"
    settings = training_settings(TRAIN, scope=UNDEFENDED_SCOPE, transport=transport, controller_args={
        "checkpoint_dir": folder, "checkpoint_interval": CHECKPOINT_INTERVAL, "task_timeout": TASK_TIMEOUT,
        **controller}, executor_args={"checkpoint_dir": folder})
    return export(settings, poc_root / "jobs" / f"{name}_{transport}")


def server_checkpoint(federation: PocFederation, name: str, transport: str) -> Path:
    return federation.site_root("localhost") / "checkpoints" / f"{name}_{transport}" / SERVER_CHECKPOINT


def after(story: dict, previous: str) -> None:
    if previous not in story:
        pytest.skip(f"needs what '{previous}' leaves (it failed or did not run)")


def test_a_killed_site_fails_the_job_naming_it_and_keeps_its_checkpoints(federation, poc_root, transport, story,
                                                                          hard_limit):
    job_id = federation.submit(job(poc_root, "resumed", transport))
    # After the step-6 checkpoint is complete (the server saves last), so that it is the one to resume from.
    wait_for_server_checkpoint(server_checkpoint(federation, "resumed", transport), 6)
    os.kill(job_process(federation, "t1w", job_id), signal.SIGKILL)
    killed_at = time.time()
    status = federation.wait(job_id, timeout=300)
    failed = load_json(federation.download(job_id) / "workspace" / "summary.json")
    assert "COMPLETED" not in status and "NVFlare aborted the job" in failed["error"], failed["error"]
    server_log = (federation.site_root("localhost") / "log.txt").read_text()
    assert f"Failing job {job_id} due to reported failure from t1w" in server_log
    detected = failed["failed_at"] - killed_at
    assert detected <= TASK_TIMEOUT + DETECTION_SLACK_S
    assert failed["last_checkpoint"] >= 6
    story["site killed"] = True
    print(f"\nsite killed, policy stop: detected after {detected:.1f} s, "
          f"{failed['train_step'] - failed['last_checkpoint']} steps after the last checkpoint to redo")


def test_a_resumed_job_whose_server_is_killed_does_not_complete(federation, poc_root, transport, story, hard_limit):
    after(story, "site killed")
    checkpoint = server_checkpoint(federation, "resumed", transport)
    job_id = federation.submit(job(poc_root, "resumed", transport, resume=True))
    before = checkpoint.stat().st_mtime_ns
    deadline = time.monotonic() + 300
    while checkpoint.stat().st_mtime_ns == before:  # a new checkpoint: this job is training
        assert time.monotonic() < deadline, "the resumed job wrote no checkpoint"
        time.sleep(0.05)
    os.kill(job_process(federation, "localhost", job_id), signal.SIGKILL)
    assert "COMPLETED" not in federation.wait(job_id, timeout=300)
    story["server killed"] = True


def test_resuming_again_ends_as_the_uninterrupted_run(federation, poc_root, uninterrupted, transport, story,
                                                      hard_limit):
    after(story, "server killed")
    reference = uninterrupted
    started = time.monotonic()
    job_id = federation.submit(job(poc_root, "resumed", transport, resume=True))
    assert "COMPLETED" in federation.wait(job_id, timeout=400)
    resumed = load_json(federation.download(job_id) / "workspace" / "summary.json")
    assert "error" not in resumed, resumed.get("error")
    assert resumed["dice"]["mean"] == pytest.approx(reference["dice"]["mean"], abs=1e-4)
    for ours, theirs in zip(resumed["history"], reference["history"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
    print(f"\nresume after a server kill: {time.monotonic() - started:.1f} s to the end, Dice "
          f"{resumed['dice']['mean']:.4f} vs {reference['dice']['mean']:.4f} uninterrupted")


def test_policy_continue_trains_on_without_a_hung_site(federation, poc_root, transport, hard_limit):
    # A site stops answering (its process hangs: SIGSTOP) and training goes on without its modality. (A site
    # whose process ends is the first test: NVFlare itself fails the job then.) The site comes back once the
    # server has finished (SIGCONT): its late answer is ignored and NVFlare ends the job.
    job_id = federation.submit(job(poc_root, "continued", transport, on_site_failure="continue"))
    wait_for(site_checkpoint(federation.site_root("t2w") / "checkpoints" / f"continued_{transport}", 6))
    hung = job_process(federation, "t2w", job_id)
    os.kill(hung, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        wait_for(federation.site_root("localhost") / job_id / "summary.json", timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
    assert "COMPLETED" in federation.wait(job_id, timeout=300)
    continued = load_json(federation.download(job_id) / "workspace" / "summary.json")
    assert "error" not in continued, continued.get("error")
    lost = continued["lost_sites"]
    assert list(lost) == ["t2w"] and lost["t2w"]["train_step"] >= 6
    detected = lost["t2w"]["detected_at"] - stopped_at
    assert detected <= TASK_TIMEOUT + DETECTION_SLACK_S
    assert continued["steps"] == TRAIN_STEPS and 0 <= continued["dice"]["mean"] <= 1
    assert continued["memory_mb"]["sites"]["t2w"] is None
    print(f"\npolicy continue: detected after {detected:.1f} s, Dice {continued['dice']['mean']:.4f} without t2w "
          f"from step {lost['t2w']['train_step']}")
