"""Faults in a real NVFlare federation on loopback (POC): a site's process and the server's process killed
mid-training, the job's policy applied, and a resume that reaches the uninterrupted run's result.

One federation serves every job. Bounded: a hard alarm ends the test and the federation is stopped in every case.
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
from split_unet.jobs import export, training_settings
from split_unet.launch.simulation import run_simulation

from helpers import TINY_NETWORK, TINY_SIZE, free_port, make_dataset, processes_mentioning

pytestmark = pytest.mark.poc
HARD_LIMIT_S = 1200  # about 4 min on an idle 2-core machine; generous for a loaded one
TRAIN = {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 6, "batch_size": 2, "val_interval": 3}
TASK_TIMEOUT = 10
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


def test_kill_site_and_server_then_resume(project_root, tmp_path, hard_limit):
    _, sites_dir = make_dataset(tmp_path / "data", patients=8)

    def job(name: str, **controller) -> Path:
        # Each party keeps its checkpoints in its own workspace (a job may name no other folder).
        settings = training_settings(TRAIN, controller_args={
            "checkpoint_dir": f"checkpoints/{name}", "checkpoint_interval": CHECKPOINT_INTERVAL,
            "task_timeout": TASK_TIMEOUT, **controller}, executor_args={"checkpoint_dir": f"checkpoints/{name}"})
        return export(settings, tmp_path / "jobs" / name)

    # The uninterrupted run, in the simulator (which POC reproduces to ~1e-7, test_poc).
    reference = run_simulation(sites_dir, tmp_path / "reference", training_settings(TRAIN),
                               site_configs=project_root / "site_configs", progress=None)
    steps = reference["steps"]
    assert steps == 18

    federation = PocFederation(tmp_path / "federation", sites_dir, project_root / "site_configs", port=free_port())
    try:
        federation.prepare()
        federation.start()

        # 1. A site's process dies: NVFlare fails the job, which ends naming the site; its checkpoints stay.
        job_id = federation.submit(job("resumed"))
        # After the step-6 checkpoint is complete (the server saves last), so that it is the one to resume from.
        server_checkpoint = federation.site_root("localhost") / "checkpoints" / "resumed" / SERVER_CHECKPOINT
        wait_for_server_checkpoint(server_checkpoint, 6)
        os.kill(job_process(federation, "t1w", job_id), signal.SIGKILL)
        killed_at = time.time()
        status = federation.wait(job_id, timeout=300)
        failed = load_json(federation.download(job_id) / "workspace" / "summary.json")
        assert "COMPLETED" not in status and "NVFlare aborted the job" in failed["error"], failed["error"]
        server_log = (federation.site_root("localhost") / "log.txt").read_text()
        assert f"Failing job {job_id} due to reported failure from t1w" in server_log
        detect_site = failed["failed_at"] - killed_at
        assert detect_site <= TASK_TIMEOUT + 10
        assert failed["last_checkpoint"] >= 6
        site_steps_lost = failed["train_step"] - failed["last_checkpoint"]

        # 2. Resume from the last complete checkpoint; the server's process is killed mid-way through.
        job_id = federation.submit(job("resumed", resume=True))
        before = server_checkpoint.stat().st_mtime_ns
        deadline = time.monotonic() + 120
        while server_checkpoint.stat().st_mtime_ns == before:  # a new checkpoint: this job is training
            assert time.monotonic() < deadline, "the resumed job wrote no checkpoint"
            time.sleep(0.05)
        os.kill(job_process(federation, "localhost", job_id), signal.SIGKILL)
        status = federation.wait(job_id, timeout=300)
        assert "COMPLETED" not in status

        # 3. Resume again: the run ends as the uninterrupted one did.
        started = time.monotonic()
        job_id = federation.submit(job("resumed", resume=True))
        assert "COMPLETED" in federation.wait(job_id, timeout=400)
        resumed = load_json(federation.download(job_id) / "workspace" / "summary.json")
        assert "error" not in resumed, resumed.get("error")
        assert resumed["dice"]["mean"] == pytest.approx(reference["dice"]["mean"], abs=1e-4)
        for ours, theirs in zip(resumed["history"], reference["history"]):
            assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
        resume_seconds = time.monotonic() - started

        # 4. Policy "continue": a site stops answering (its process hangs: SIGSTOP) and training goes on without
        # its modality. (A site whose process ends is case 1: NVFlare itself fails the job then.) The site comes
        # back once the server has finished (SIGCONT): its late answer is ignored and NVFlare ends the job.
        job_id = federation.submit(job("continued", on_site_failure="continue"))
        wait_for(site_checkpoint(federation.site_root("t2w") / "checkpoints" / "continued", 6))
        hung = job_process(federation, "t2w", job_id)
        os.kill(hung, signal.SIGSTOP)
        killed_at = time.time()
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
        detect_continue = lost["t2w"]["detected_at"] - killed_at
        assert detect_continue <= TASK_TIMEOUT + 10
        assert continued["steps"] == steps and 0 <= continued["dice"]["mean"] <= 1
        assert continued["memory_mb"]["sites"]["t2w"] is None
    finally:
        federation.stop()
    assert not federation.running()
    assert processes_mentioning(str(tmp_path / "federation")) == []
    print(f"\nsite killed, policy stop: detected after {detect_site:.1f} s, {site_steps_lost} steps after the last "
          f"checkpoint redone; resume after a server kill: {resume_seconds:.1f} s to the end, Dice "
          f"{resumed['dice']['mean']:.4f} vs {reference['dice']['mean']:.4f} uninterrupted; policy continue: "
          f"detected after {detect_continue:.1f} s, Dice {continued['dice']['mean']:.4f} without t2w from step "
          f"{lost['t2w']['train_step']}")
