"""Run the Split-U-Net job in the NVFlare simulator and collect its artefacts."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

from split_unet.errors import DataError
from split_unet.protocol.settings import CLASS_ALLOW_LIST, ENV_SITE_CONFIGS, ENV_SITES
from split_unet.reports import read_summary, write_summary

SERVER_CONFIG = Path("app_server/config/config_fed_server.json")
CONTROLLER_PATH = "split_unet.protocol.controller.SplitUNetController"


def _controller_args(server_config: dict) -> dict:
    for workflow in server_config.get("workflows", []):
        if workflow.get("path") == CONTROLLER_PATH:
            return workflow.setdefault("args", {})
    raise ValueError(f"the job has no {CONTROLLER_PATH} workflow")


def configure_job(job_dir: str | Path, out_dir: str | Path, train: dict | None = None,
                  controller: dict | None = None) -> Path:
    """Copy a job folder, overriding the controller's ``train`` settings (``network`` merged key by key)
    and other controller arguments. Returns the new job folder; the original is left as it is."""
    job_dir, out_dir = Path(job_dir), Path(out_dir)
    if not (job_dir / "meta.json").is_file():
        raise DataError("not an NVFlare job folder (no meta.json)", field=str(job_dir))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(job_dir, out_dir)
    config_path = out_dir / SERVER_CONFIG
    server_config = json.loads(config_path.read_text())
    args = _controller_args(server_config)
    args.update(controller or {})
    merged = copy.deepcopy(args.get("train", {}))
    for key, value in (train or {}).items():
        if key == "network":
            merged.setdefault("network", {}).update(value)
        else:
            merged[key] = value
    args["train"] = merged
    config_path.write_text(json.dumps(server_config, indent=2))
    return out_dir


def job_clients(job_dir: str | Path) -> list[str]:
    meta = json.loads((Path(job_dir) / "meta.json").read_text())
    return [site for app, sites in meta["deploy_map"].items() for site in sites if site != "server"]


def run_simulation(sites_dir: str | Path, workspace: str | Path, job_dir: str | Path = "jobs/split_unet",
                   site_configs: str | Path = "site_configs", train: dict | None = None,
                   controller: dict | None = None) -> dict:
    """Run the job on partitioned data; return the summary (also written to ``workspace/summary.json``).

    The sites find their data through their site settings, which name ``${SPLIT_UNET_SITES}``.
    """
    from nvflare.private.fed.app.simulator.simulator_runner import SimulatorRunner

    sites_dir, workspace = Path(sites_dir).resolve(), Path(workspace).resolve()
    site_configs = Path(site_configs).resolve()
    if not sites_dir.is_dir():
        raise DataError("partitioned data folder not found (run `split-unet partition` first)", field=str(sites_dir))
    if not site_configs.is_dir():
        raise DataError("site settings folder not found", field=str(site_configs))
    workspace.mkdir(parents=True, exist_ok=True)
    job = configure_job(job_dir, workspace / "job", train, controller)
    clients = job_clients(job)
    os.environ[ENV_SITES] = str(sites_dir)
    os.environ[ENV_SITE_CONFIGS] = str(site_configs)
    sim_root = workspace / "simulator"
    # The simulator copies its workspace's local/ folder into every site's local/ folder.
    (sim_root / "local").mkdir(parents=True, exist_ok=True)
    (sim_root / "local" / "resources.json").write_text(json.dumps({"class_allow_list": CLASS_ALLOW_LIST}, indent=2))
    runner = SimulatorRunner(job_folder=str(job), workspace=str(sim_root), clients=",".join(clients),
                             n_clients=len(clients), threads=len(clients))
    return_code = runner.run()
    server_run = sim_root / "server" / "simulate_job"
    summary_path = server_run / "summary.json"
    summary = read_summary(summary_path) if summary_path.is_file() else {
        "error": f"the simulator exited with code {return_code} before writing a summary; see {sim_root}/server/log.txt"}
    summary["artefacts"] = artefacts(sim_root, clients)
    write_summary(workspace / "summary.json", summary)
    return summary


def artefacts(sim_root: Path, clients: list[str]) -> dict:
    server_run = sim_root / "server" / "simulate_job"
    return {
        "summary": str(server_run / "summary.json"),
        "tensorboard": str(server_run / "tb_events"),
        "decoder": str(next(iter(sorted(server_run.rglob("split_unet_decoder.pt"))), server_run / "split_unet_decoder.pt")),
        "encoders": {site: str(sim_root / site / "simulate_job" / "split_unet_encoder.pt") for site in clients},
        "server_log": str(sim_root / "server" / "log.txt"),
    }
