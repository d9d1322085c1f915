"""Split inference jobs: built from the training job (one source of the architecture), run in the simulator."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from split_unet.errors import DataError
from split_unet.protocol.wire import TASK_INFER, TASK_INIT
from split_unet.files import load_json, write_json
from split_unet.simulation import CONTROLLER_PATHS, EXECUTOR_PATH, configure_job, simulate
from split_unet.training import TrainConfig

INFERENCE_CONTROLLER = "split_unet.protocol.inference.SplitInferenceController"
SEGMENTATIONS = "segmentations"
ENCODER_FILE = "split_unet_encoder.pt"  # ModalitySiteExecutor's default encoder_file
DECODER_FILE = "split_unet_decoder.pt"  # the training job's persistor file


def trained_config(summary: dict) -> dict:
    """The ``train`` settings a training run recorded in its summary (so inference builds the same networks)."""
    fields = TrainConfig().to_dict()
    return {key: value for key, value in summary.get("config", {}).items() if key in fields}


def read_training_summary(train_workspace: str | Path) -> dict:
    """The summary of a finished ``split-unet simulate`` run; a clear error if there is none or it failed."""
    summary_path = Path(train_workspace) / "summary.json"
    if not summary_path.is_file():
        raise DataError("no training summary (run `split-unet simulate` first)", field=str(summary_path))
    summary = load_json(summary_path)
    if "error" in summary:
        raise DataError(f"the training run failed: {summary['error']}", field=str(summary_path))
    return summary


def build_inference_job(train_job: str | Path, out_dir: str | Path, decoder_path: str, encoder_path: str,
                        train: dict | None = None, patients: Sequence[str] = (), with_code: bool = False) -> Path:
    """The training job turned into an inference job.

    Args:
        train_job: the training job folder (e.g. ``jobs/split_unet``).
        out_dir: where to write the inference job.
        decoder_path: the trained decoder at the server, relative to its workspace.
        encoder_path: each site's trained encoder, relative to the site's workspace (``{site}`` is replaced by
            the site name).
        train: ``train`` overrides, e.g. ``trained_config(training summary)``.
        patients: patients to segment (default: every patient all sites hold).
        with_code: carry the ``split_unet`` package in the job (see ``configure_job``).
    """
    job = configure_job(train_job, out_dir, train, {"decoder_path": decoder_path, "patients": list(patients)},
                        {"encoder_path": encoder_path}, with_code=with_code)
    meta_path = job / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["name"] = f"{meta.get('name', 'split_unet')}_infer"
    meta_path.write_text(json.dumps(meta, indent=2))
    for config_path in job.glob("app_*/config/config_fed_*.json"):
        config = json.loads(config_path.read_text())
        for workflow in config.get("workflows", []):
            if workflow.get("path") in CONTROLLER_PATHS:
                workflow["path"] = INFERENCE_CONTROLLER
                # The decoder comes from decoder_path, not from the training job's persistor.
                persistor = workflow["args"].pop("persistor_id", None)
                config["components"] = [c for c in config.get("components", []) if c.get("id") != persistor]
                workflow["args"]["output_folder"] = SEGMENTATIONS
        for entry in config.get("executors", []):
            if entry.get("executor", {}).get("path") == EXECUTOR_PATH:
                entry["tasks"] = [TASK_INIT, TASK_INFER]
        config_path.write_text(json.dumps(config, indent=2))
    return job


def infer_in_simulator(train_workspace: str | Path, sites_dir: str | Path, workspace: str | Path,
                       job_dir: str | Path = "jobs/split_unet", site_configs: str | Path = "site_configs",
                       patients: Sequence[str] = (), progress: Callable[[str], None] | None = print,
                       overrides: dict | None = None) -> dict:
    """Segment with the models of a ``split-unet simulate`` run; results in ``workspace/segmentations``.

    ``overrides``: ``train`` settings to use instead of the training's: ``size`` / ``spacing`` (the networks are
    fully convolutional), ``min_component_voxels`` (post-processing).
    """
    train_workspace, workspace = Path(train_workspace).resolve(), Path(workspace).resolve()
    summary = read_training_summary(train_workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    # Each party's trained model goes to its own workspace (its local/ folder in the simulator): a job may
    # name files there only.
    artefacts = summary["artefacts"]
    models = {site: {ENCODER_FILE: Path(path)} for site, path in artefacts["encoders"].items()}
    models["server"] = {DECODER_FILE: Path(artefacts["decoder"])}
    job = build_inference_job(job_dir, workspace / "job", f"local/{DECODER_FILE}", f"local/{ENCODER_FILE}",
                              {**trained_config(summary), **(overrides or {})}, patients)
    return_code = simulate(job, workspace, Path(sites_dir).resolve(), Path(site_configs).resolve(), progress,
                           party_files=models)
    return collect_segmentations(workspace / "simulator" / "server" / "simulate_job" / SEGMENTATIONS, workspace,
                                 f"the simulator exited with code {return_code}; see {workspace / 'simulator.log'}")


def collect_segmentations(found: Path, workspace: Path, failure: str) -> dict:
    """Copy the server's segmentations to ``workspace/segmentations``; return ``inference.json`` (or the error)."""
    result_path = found / "inference.json"
    if not result_path.is_file():
        result = {"error": failure}
    else:
        target = workspace / SEGMENTATIONS
        if target != found:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(found, target)
        result = load_json(target / "inference.json")
        result["segmentations"] = str(target)
    write_json(workspace / "inference.json", result)
    return result
