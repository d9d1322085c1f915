"""Split inference jobs: built from the training job (one source of the architecture), run in the simulator."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from split_unet.errors import DataError
from split_unet.files import load_json, write_json
from split_unet.jobs import InferenceJob, export, training_settings
from split_unet.protocol.inference import RESULT_FILE
from split_unet.protocol.names import DECODER_FILE, ENCODER_FILE, SEGMENTATIONS
from split_unet.launch.simulation import SIMULATE_JOB, simulate
from split_unet.site_configs import resolve_site_configs
from split_unet.training import TrainConfig


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


def inference_job(summary: dict, decoder_path: str, encoder_path: str, patients: Sequence[str] = (),
                  overrides: dict | None = None, with_code: bool = False,
                  choose_postprocessing: bool = False) -> InferenceJob:
    """The inference job of a finished training: its sites and networks (``overrides``: ``train`` settings to
    use instead, see ``infer_in_simulator``), the trained models at ``decoder_path`` / ``encoder_path`` (see
    ``jobs.InferenceJob``, also for ``choose_postprocessing``)."""
    recorded = summary.get("config", {})
    # The training's scope: its networks send the levels that scope lets leave the sites.
    training = training_settings({**trained_config(summary), **(overrides or {})}, sites=list(recorded["sites"]),
                                 wire_dtype=recorded["wire_dtype"], scope=recorded.get("scope"),
                                 transport=recorded.get("transport", "poll"), with_code=with_code)
    return InferenceJob(training, decoder_path, encoder_path, list(patients), choose_postprocessing)


def infer_in_simulator(train_workspace: str | Path, sites_dir: str | Path, workspace: str | Path,
                       site_configs: str | Path | None = None, patients: Sequence[str] = (), progress: Callable[[str], None] | None = print,
                       overrides: dict | None = None, choose_postprocessing: bool = False) -> dict:
    """Segment with the models of a ``split-unet simulate`` run; results in ``workspace/segmentations``.

    ``overrides``: ``train`` settings to use instead of the training's: ``size`` / ``spacing`` (the networks are
    fully convolutional), ``min_component_voxels`` (post-processing). ``choose_postprocessing``: choose the
    post-processing on ``patients`` (labelled training patients); the sizes are the result's ``postprocessing``.
    """
    train_workspace, workspace = Path(train_workspace).resolve(), Path(workspace).resolve()
    summary = read_training_summary(train_workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    # Each party's trained model goes to its own workspace (its local/ folder in the simulator): a job may
    # name files there only.
    artefacts = summary["artefacts"]
    models = {site: {ENCODER_FILE: Path(path)} for site, path in artefacts["encoders"].items()}
    models["server"] = {DECODER_FILE: Path(artefacts["decoder"])}
    job = export(inference_job(summary, f"local/{DECODER_FILE}", f"local/{ENCODER_FILE}", patients, overrides,
                               choose_postprocessing=choose_postprocessing), workspace / "job")
    return_code = simulate(job, workspace, Path(sites_dir).resolve(), resolve_site_configs(site_configs, workspace),
                           progress, party_files=models)
    return collect_segmentations(workspace / "simulator" / "server" / SIMULATE_JOB / SEGMENTATIONS, workspace,
                                 f"the simulator exited with code {return_code}; see {workspace / 'simulator.log'}")


def collect_segmentations(found: Path, workspace: Path, failure: str) -> dict:
    """Copy the server's segmentations (``found``, in its run folder) to ``workspace/segmentations`` and return
    their ``inference.json``, written there and as ``workspace/inference.json`` with ``"segmentations"`` naming the
    copy. A run that wrote no results gives ``{"error": ...}``: the server's reason (its run summary), else
    ``failure``; nothing is written then, and an earlier run's results in ``workspace`` are left as they were."""
    result_path = found / RESULT_FILE
    if not result_path.is_file():
        summary_path = found.parent / "summary.json"  # the workflow records why it stopped in its run summary
        reason = load_json(summary_path).get("error") if summary_path.is_file() else None
        return {"error": f"{reason} ({failure})" if reason else failure}
    target = workspace / SEGMENTATIONS
    if target != found:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(found, target)
    result = {**load_json(target / RESULT_FILE), "segmentations": str(target)}
    write_json(target / RESULT_FILE, result)
    write_json(workspace / RESULT_FILE, result)
    return result
