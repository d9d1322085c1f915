"""Run the Split-U-Net job in the NVFlare simulator and collect its artefacts."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from split_unet.errors import DataError
from split_unet.protocol.settings import CLASS_ALLOW_LIST, ENV_SITE_CONFIGS, ENV_SITES
from split_unet.protocol.wire import TASK_FINISH, TASK_TRAIN, TASK_VALIDATE
from split_unet.files import load_json, write_json

CONTROLLER_PATHS = ("split_unet.protocol.controller.SplitUNetController",
                    "split_unet.protocol.inference.SplitInferenceController")
EXECUTOR_PATH = "split_unet.protocol.executor.ModalitySiteExecutor"
RECORDER_PATH = "split_unet.protocol.recorder.LeakageRecorder"
PROGRESS_PATTERN = re.compile(r"Split(?:UNet|Inference)Controller - (?:INFO|WARNING|ERROR) - \[[^]]*\] - (.*)")


def configure_job(job_dir: str | Path, out_dir: str | Path, train: dict | None = None,
                  controller: dict | None = None, executor: dict | None = None,
                  record_steps: list[int] | None = None, with_code: bool = False, scope: str | None = None,
                  site_filters: list[dict] | None = None, server_filters: list[dict] | None = None) -> Path:
    """Copy a job folder, overriding the controller's ``train`` settings (``network`` merged key by key),
    other controller arguments and the site executors' arguments. The original is left as it is.

    ``record_steps`` adds the leakage evaluation: the server's ``LeakageRecorder`` last in its filter
    chains, and the sites keep encoder snapshots of those steps. ``with_code`` copies this ``split_unet``
    package into every app's ``custom/`` folder, so the job runs where the package is not installed (NVFlare
    then treats it as BYOC: the submitter needs the ``byoc`` right, and the site's class allow list is skipped).
    ``scope`` names the sites' privacy scope the job asks for (``meta.json``). ``site_filters`` (NVFlare
    component configs) become job filters on the sites' activations, ``server_filters`` on the gradients
    the server sends; the recorder, if any, comes after them and so records what they let through.
    """
    job_dir, out_dir = Path(job_dir), Path(out_dir)
    if not (job_dir / "meta.json").is_file():
        raise DataError("not an NVFlare job folder (no meta.json)", field=str(job_dir))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(job_dir, out_dir)
    if scope:
        meta = json.loads((out_dir / "meta.json").read_text())
        meta["scope"] = scope
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    for config_path in out_dir.glob("app_*/config/config_fed_*.json"):
        config = json.loads(config_path.read_text())
        if config.get("workflows") and server_filters:
            _add_filters(config, "task_data_filters", [TASK_TRAIN, TASK_VALIDATE, TASK_FINISH], server_filters)
        for workflow in config.get("workflows", []):
            if workflow.get("path") in CONTROLLER_PATHS:
                _override_controller(workflow.setdefault("args", {}), train or {}, controller or {})
            if record_steps:
                _add_recorder(config, record_steps)
        if config.get("executors") and site_filters:
            _add_filters(config, "task_result_filters", [TASK_TRAIN, TASK_VALIDATE], site_filters)
        for entry in config.get("executors", []):
            if entry.get("executor", {}).get("path") == EXECUTOR_PATH:
                entry["executor"].setdefault("args", {}).update(executor or {})
                if record_steps:
                    entry["executor"]["args"]["snapshot_steps"] = list(record_steps)
        config_path.write_text(json.dumps(config, indent=2))
    if with_code:
        package = Path(__file__).resolve().parent
        for app in out_dir.glob("app_*"):
            shutil.copytree(package, app / "custom" / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    return out_dir


def _add_filters(config: dict, chain_key: str, tasks: list[str], filters: list[dict]) -> None:
    """Append filters to the chain of exactly these tasks (NVFlare allows one chain per task), or add one."""
    for chain in config.setdefault(chain_key, []):
        if set(chain.get("tasks", [])) & set(tasks):
            if sorted(chain["tasks"]) != sorted(tasks):
                raise DataError(f"{chain_key} chain for {chain['tasks']} overlaps {tasks}", field=chain_key)
            chain["filters"].extend(filters)
            return
    config[chain_key].append({"tasks": list(tasks), "filters": list(filters)})


def _add_recorder(server_config: dict, steps: list[int]) -> None:
    """The recorder last in both chains, so it keeps what the other filters let through."""
    recorder = {"path": RECORDER_PATH, "args": {"steps": list(steps)}}
    _add_filters(server_config, "task_result_filters", [TASK_TRAIN], [recorder])
    _add_filters(server_config, "task_data_filters", [TASK_TRAIN, TASK_VALIDATE, TASK_FINISH], [recorder])


def _override_controller(args: dict, train: dict, controller: dict) -> None:
    args.update(controller)
    merged = copy.deepcopy(args.get("train", {}))
    for key, value in train.items():
        if key == "network":
            merged.setdefault("network", {}).update(value)
        else:
            merged[key] = value
    args["train"] = merged


def job_clients(job_dir: str | Path) -> list[str]:
    meta = json.loads((Path(job_dir) / "meta.json").read_text())
    return [site for app, sites in meta["deploy_map"].items() for site in sites if site != "server"]


def run_simulation(sites_dir: str | Path, workspace: str | Path, job_dir: str | Path = "jobs/split_unet",
                   site_configs: str | Path = "site_configs", train: dict | None = None,
                   controller: dict | None = None, executor: dict | None = None, site_threads: int | None = None,
                   record_steps: list[int] | None = None, privacy_file: str | Path | None = None,
                   scope: str | None = None, site_filters: list[dict] | None = None,
                   server_filters: list[dict] | None = None,
                   progress: Callable[[str], None] | None = print) -> dict:
    """Run the job on partitioned data; return the summary (also written to ``workspace/summary.json``).

    The simulator runs in a child process whose full output goes to ``workspace/simulator.log``; the
    controller's progress lines are passed to ``progress``. The sites find their data through their site
    settings, which name ``${SPLIT_UNET_SITES}``. ``controller`` and ``executor`` override the controller's and
    the site executors' arguments. All sites share this machine in the simulator, so each
    gets ``site_threads`` torch threads (default: the cores divided among them) instead of all of them.
    ``privacy_file`` becomes the sites' ``local/privacy.json`` and ``scope`` picks one of its scopes.
    """
    sites_dir, workspace = Path(sites_dir).resolve(), Path(workspace).resolve()
    site_configs = Path(site_configs).resolve()
    if not sites_dir.is_dir():
        raise DataError("partitioned data folder not found (run `split-unet partition` first)", field=str(sites_dir))
    if not site_configs.is_dir():
        raise DataError("site settings folder not found", field=str(site_configs))
    workspace.mkdir(parents=True, exist_ok=True)
    clients = job_clients(job_dir)
    site_threads = site_threads or max(1, (os.cpu_count() or 1) // len(clients))
    executor = {"num_threads": site_threads, **(executor or {})}
    job = configure_job(job_dir, workspace / "job", train, controller, executor, record_steps,
                        scope=scope, site_filters=site_filters, server_filters=server_filters)
    return_code = simulate(job, workspace, sites_dir, site_configs, progress, privacy_file)
    log_path = workspace / "simulator.log"
    summary_path = workspace / "simulator" / "server" / "simulate_job" / "summary.json"
    summary = load_json(summary_path) if summary_path.is_file() else {
        "error": f"the simulator exited with code {return_code} before writing a summary; see {log_path}"}
    summary["artefacts"] = artefacts(workspace, clients)
    write_json(workspace / "summary.json", summary)
    return summary


def simulate(job: Path, workspace: Path, sites_dir: Path, site_configs: Path,
             progress: Callable[[str], None] | None = print, privacy_file: str | Path | None = None) -> int:
    """Run a configured job in the simulator under ``workspace/simulator``; return its exit code.

    The simulator gives every site one copy of its ``local/`` folder: the class allow list and, if given,
    ``privacy_file`` as the sites' privacy policy.

    Logs go to ``workspace/simulator.log``; the controllers' progress lines are passed to ``progress``.
    """
    clients = job_clients(job)
    sim_root = workspace / "simulator"
    if sim_root.exists():
        shutil.rmtree(sim_root)
    # The simulator copies its workspace's local/ folder into every site's local/ folder.
    (sim_root / "local").mkdir(parents=True)
    (sim_root / "local" / "resources.json").write_text(json.dumps({"class_allow_list": CLASS_ALLOW_LIST}, indent=2))
    if privacy_file:
        shutil.copyfile(privacy_file, sim_root / "local" / "privacy.json")
    env = {**os.environ, ENV_SITES: str(sites_dir), ENV_SITE_CONFIGS: str(site_configs)}
    log_path = workspace / "simulator.log"
    command = [sys.executable, "-m", "split_unet.simulation", str(job), str(sim_root), ",".join(clients)]
    with open(log_path, "w") as log:
        # Its own process group, so the simulator's client processes can be stopped with it.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return_code = _follow(process, log_path, progress)
    finally:  # interrupted (Ctrl-C, a test timeout): stop the processes we started, and only those
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    return return_code


def _follow(process: subprocess.Popen, log_path: Path, progress: Callable[[str], None] | None) -> int:
    """Wait for the simulator, passing on the controller's log lines as they appear."""
    with open(log_path) as log:
        while True:
            line = log.readline()
            if line:
                if progress and PROGRESS_PATTERN.search(line):
                    progress(PROGRESS_PATTERN.search(line).group(1).rstrip())
                continue
            if process.poll() is not None:
                return process.returncode
            time.sleep(0.2)


def artefacts(workspace: Path, clients: list[str]) -> dict:
    sim_root = workspace / "simulator"
    server_run = sim_root / "server" / "simulate_job"
    found = {
        "summary": str(server_run / "summary.json"),
        "tensorboard": str(server_run / "tb_events"),
        "decoder": str(next(iter(sorted(server_run.rglob("split_unet_decoder.pt"))), server_run / "split_unet_decoder.pt")),
        "encoders": {site: str(sim_root / site / "simulate_job" / "split_unet_encoder.pt") for site in clients},
        "server_log": str(sim_root / "server" / "log.txt"),
        "simulator_log": str(workspace / "simulator.log"),
    }
    if (server_run / "leakage_record").is_dir():  # only with --record-steps
        found["leakage_record"] = str(server_run / "leakage_record")
    return found


def main(argv: list[str]) -> int:
    """Child-process entry: ``python -m split_unet.simulation JOB SIM_WORKSPACE CLIENTS``."""
    from nvflare.private.fed.app.simulator.simulator_runner import SimulatorRunner

    job, sim_root, clients = argv
    n_clients = len(clients.split(","))
    return SimulatorRunner(job_folder=job, workspace=sim_root, clients=clients, n_clients=n_clients,
                           threads=n_clients).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
