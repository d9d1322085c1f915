"""Run the Split-U-Net job in the NVFlare simulator and collect its artefacts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil

from split_unet.errors import DataError
from split_unet.files import load_json, write_json
from split_unet.jobs import TrainingJob, export, job_sites
from split_unet.launch.allocator import tuned_environment
from split_unet.leakage.record import RECORD_FOLDER
from split_unet.protocol.names import DECODER_FILE, ENCODER_FILE, TENSORBOARD_FOLDER
from split_unet.protocol.recorder import LeakageRecorder
from split_unet.protocol.telemetry import PROGRESS_FILE, START_FAILED, read_progress
from split_unet.protocol.settings import CLASS_ALLOW_LIST, ENV_SITE_CONFIGS, ENV_SITES, RESEARCH_CLASSES
from split_unet.site_configs import PRIVACY_FILE, resolve_site_configs

RECORDER_PATH = f"{LeakageRecorder.__module__}.{LeakageRecorder.__name__}"
# The server's run is over (its workflow ended, END_RUN sent): from here the simulator only shuts down.
JOB_END_PATTERN = re.compile(r"ServerRunner - INFO - \[[^]]*\] - Server runner finished")
# A party's worker failed to start, and a line of a Python error, e.g. the worker's own.
START_FAILED_PATTERN = re.compile(re.escape(START_FAILED) + r": (.*)$")
ERROR_LINE_PATTERN = re.compile(r"^(?:[\w.]+(?:Error|Exception)): .+")
STOP_GRACE_SECONDS = 60.0
SIMULATE_JOB = "simulate_job"  # the simulator's name for the job's run folder


def run_simulation(sites_dir: str | Path, workspace: str | Path, job: TrainingJob | None = None,
                   site_configs: str | Path | None = None, site_threads: int | None = None,
                   privacy_file: str | Path | None = None, persistent: str | Path | None = None,
                   progress: Callable[[str], None] | None = print,
                   grace_seconds: float = STOP_GRACE_SECONDS) -> dict:
    """Run a training job (default ``TrainingJob()``) on partitioned data; return the summary (also written to
    ``workspace/summary.json``).

    The simulator runs in a child process whose full output goes to ``workspace/simulator.log``; the
    controller's progress lines are passed to ``progress``. The sites find their data through their site
    settings (``site_configs``, default the package's, see ``site_configs.py``), which name ``${SPLIT_UNET_SITES}``.
    All sites share this machine in the simulator, so each gets ``site_threads`` torch threads (default: the
    cores divided among them) instead of all of them, unless the job's ``executor_args`` set ``num_threads``.
    The sites' privacy policy is their own ``<site_configs>/<site>/local/privacy.json`` (the same at every site,
    see ``simulation_policy``) unless ``privacy_file`` replaces it; the job's ``scope`` picks one of its scopes
    (a site that lacks it refuses the job).
    ``persistent``: see ``simulate``.
    """
    sites_dir, workspace = Path(sites_dir).resolve(), Path(workspace).resolve()
    if not sites_dir.is_dir():
        raise DataError("partitioned data folder not found (run `split-unet partition` first)", field=str(sites_dir))
    workspace.mkdir(parents=True, exist_ok=True)
    site_configs = resolve_site_configs(site_configs, workspace)
    job = job or TrainingJob()
    threads = site_threads or max(1, (os.cpu_count() or 1) // len(job.sites))
    job = replace(job, executor_args={"num_threads": threads, **job.executor_args})
    clients = job.sites
    return_code = simulate(export(job, workspace / "job"), workspace, sites_dir, site_configs, progress, privacy_file,
                           persistent=persistent, grace_seconds=grace_seconds)
    log_path = workspace / "simulator.log"
    summary_path = workspace / "simulator" / "server" / SIMULATE_JOB / "summary.json"
    summary = load_json(summary_path) if summary_path.is_file() else {"error": simulator_failure(log_path, return_code)}
    summary["artefacts"] = artefacts(workspace, clients)
    write_json(workspace / "summary.json", summary)
    return summary


def simulate(job: Path, workspace: Path, sites_dir: Path, site_configs: Path,
             progress: Callable[[str], None] | None = print, privacy_file: str | Path | None = None,
             party_files: dict[str, dict[str, Path]] | None = None, persistent: str | Path | None = None,
             grace_seconds: float = STOP_GRACE_SECONDS) -> int:
    """Run a configured job in the simulator under ``workspace/simulator``; return its exit code.

    A real site has a ``local/`` folder of its own; the simulator gives every party a copy of one, with the class
    allow list and the privacy policy (``simulation_policy``: ``privacy_file``, else the sites' own), and adds each
    party's ``party_files`` (``{party: {file name: source}}``, e.g. a trained model) to its copy.
    ``persistent``: a folder that outlives the simulator run, as a real site's workspace outlives its jobs
    (checkpoints to resume from): linked as ``<party workspace>/persistent`` to ``persistent/<party>``.

    Logs go to ``workspace/simulator.log``; the controllers' progress lines are passed to ``progress``. Once the
    server's run has finished, the simulator and every process it started get ``grace_seconds`` to exit and are
    then stopped: a hung site never holds the caller.
    """
    clients = job_sites(job)
    sim_root = workspace / "simulator"
    if sim_root.exists():
        shutil.rmtree(sim_root)
    # The simulator copies its workspace's local/ folder into every party's local/ folder.
    (sim_root / "local").mkdir(parents=True)
    allowed = CLASS_ALLOW_LIST + (RESEARCH_CLASSES if _uses(job, RECORDER_PATH) else [])
    (sim_root / "local" / "resources.json").write_text(json.dumps({"class_allow_list": allowed}, indent=2))
    policy = simulation_policy(clients, site_configs, privacy_file)
    if policy:
        shutil.copyfile(policy, sim_root / "local" / PRIVACY_FILE)
    local = _party_local(workspace / "party_local", ["server", *clients], party_files or {})
    env = tuned_environment({**os.environ, ENV_SITES: str(sites_dir), ENV_SITE_CONFIGS: str(site_configs)})
    log_path = workspace / "simulator.log"
    command = [sys.executable, "-m", "split_unet.launch.simulation", str(job), str(sim_root), ",".join(clients), str(local),
               str(Path(persistent).resolve()) if persistent else ""]
    with open(log_path, "w") as log:
        # Its own process group, so the simulator's client processes can be stopped with it.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return_code = _follow(process, log_path, sim_root / "server" / SIMULATE_JOB / PROGRESS_FILE, progress,
                              grace_seconds)
    finally:  # interrupted (Ctrl-C, a test timeout) or hung: stop the processes we started, and only those
        if process.poll() is None:
            stop_process_tree(process)
    return return_code


def _uses(job: Path, class_path: str) -> bool:
    return any(class_path in path.read_text() for path in job.glob("app_*/config/config_fed_*.json"))


def simulation_policy(clients: list[str], site_configs: Path, privacy_file: str | Path | None) -> Path | None:
    """The privacy policy of a simulation: ``privacy_file``, else the sites' own
    ``site_configs/<site>/local/privacy.json``. NVFlare's simulator reads one policy for every site (its
    workspace's ``local/privacy.json``; measured with 2.9), so sites whose own policies differ are refused rather
    than run under another site's policy."""
    if privacy_file:
        return Path(privacy_file)
    paths = {site: site_configs / site / "local" / PRIVACY_FILE for site in clients}
    policies = {site: json.loads(path.read_text()) if path.is_file() else None for site, path in paths.items()}
    if any(policy != policies[clients[0]] for policy in policies.values()):
        differ = sorted(site for site, policy in policies.items() if policy != policies[clients[0]])
        raise DataError(f"the simulator applies one privacy policy to every site, but the policies of {differ} "
                        f"differ from '{clients[0]}''s (having none counts as differing): give one with --privacy, "
                        f"or run in POC", field=str(site_configs))
    return paths[clients[0]] if policies[clients[0]] is not None else None


def _party_local(folder: Path, parties: list[str], party_files: dict[str, dict[str, Path]]) -> Path:
    """``folder/<party>/``: the files the simulator adds to each party's ``local/`` folder."""
    if folder.exists():
        shutil.rmtree(folder)
    for party in parties:
        own = folder / party
        own.mkdir(parents=True)
        for name, source in party_files.get(party, {}).items():
            shutil.copyfile(source, own / name)
    return folder


def simulator_failure(log_path: Path, return_code: int | None) -> str:
    """Why a simulation ended without results, from its log: the party that failed to start and the last error line
    before (e.g. its worker's "OSError: [Errno 98] Address already in use"), else the exit code."""
    cause, last_error = None, None
    with open(log_path, errors="replace") as log:
        for line in log:
            if match := START_FAILED_PATTERN.search(line):
                cause = match.group(1).strip()
                break
            if ERROR_LINE_PATTERN.match(line.strip()):
                last_error = line.strip()
    if cause:
        return f"{cause}" + (f" (last error before it: {last_error})" if last_error else "") + f"; see {log_path}"
    return f"the simulator exited with code {return_code} before writing a summary; see {log_path}"


def _follow(process: subprocess.Popen, log_path: Path, progress_path: Path,
            progress: Callable[[str], None] | None, grace_seconds: float) -> int:
    """Wait for the simulator, passing on the controller's progress events (``progress_path``) as they appear;
    once the server's run has finished, wait at most ``grace_seconds`` more, then stop it and its processes. A party
    that failed to start (``START_FAILED_PATTERN``) stops it at once: the server would wait for it until its
    ``init_timeout``."""
    ended_at, position = None, 0

    def pass_on_progress() -> None:
        nonlocal position
        events, position = read_progress(progress_path, position)
        for event in events if progress else ():
            progress(event["message"])

    def stop(note: str) -> int:
        stopped = stop_process_tree(process)
        with open(log_path, "a") as out:
            out.write(f"split_unet.launch.simulation - WARNING - {note}: stopped the simulator and the processes it "
                      f"started (PIDs {stopped})\n")
        if progress:
            progress(note)
        return process.returncode

    with open(log_path) as log:
        while True:
            pass_on_progress()  # first, even while the log is busy: a caller may act on an event at once
            line = log.readline()
            if line:
                if ended_at is None and JOB_END_PATTERN.search(line):
                    ended_at = time.monotonic()
                if failed := START_FAILED_PATTERN.search(line):
                    return stop(failed.group(0))
                continue
            if process.poll() is not None:
                pass_on_progress()
                return process.returncode
            if ended_at is not None and time.monotonic() - ended_at > grace_seconds:
                return stop(f"the server's run ended {grace_seconds:g} s ago but the simulator had not exited")
            time.sleep(0.2)


def stop_process_tree(process: subprocess.Popen, timeout: float = 10) -> list[int]:
    """Stop ``process`` and every process it started, by PID (the simulator starts each client worker in a
    session of its own, out of reach of our process group): SIGTERM, then SIGKILL after ``timeout``."""
    try:
        root = psutil.Process(process.pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=timeout)
    process.wait(timeout=timeout)
    return [member.pid for member in family]


def artefacts(workspace: Path, clients: list[str]) -> dict:
    sim_root = workspace / "simulator"
    server_run = sim_root / "server" / SIMULATE_JOB
    found = {
        "summary": str(server_run / "summary.json"),
        "tensorboard": str(server_run / TENSORBOARD_FOLDER),
        "decoder": str(next(iter(sorted(server_run.rglob(DECODER_FILE))), server_run / DECODER_FILE)),
        "encoders": {site: str(sim_root / site / SIMULATE_JOB / ENCODER_FILE) for site in clients},
        "server_log": str(sim_root / "server" / "log.txt"),
        "simulator_log": str(workspace / "simulator.log"),
    }
    if (server_run / RECORD_FOLDER).is_dir():  # only with --record-steps
        found["leakage_record"] = str(server_run / RECORD_FOLDER)
    return found


def main(argv: list[str]) -> int:
    """Child-process entry: ``python -m split_unet.launch.simulation JOB SIM_WORKSPACE CLIENTS PARTY_LOCAL PERSISTENT``."""
    from split_unet.launch.simulator_runner import PartyLocalRunner

    job, sim_root, clients, party_local, persistent = argv
    n_clients = len(clients.split(","))
    return PartyLocalRunner(job_folder=job, workspace=sim_root, clients=clients, n_clients=n_clients,
                            threads=n_clients, party_local=party_local, persistent=persistent or None).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
