"""Site privacy policies through the real NVFlare simulator: the site's scope wins over the job."""

import torch
from helpers import TINY_NETWORK, TINY_SIZE

from split_unet.data import MODALITIES
from split_unet.leakage.record import load_record
from split_unet.simulation import run_simulation


def _run(project_root, sites, workspace, **kwargs):
    return run_simulation(sites, workspace, job_dir=project_root / "jobs/split_unet",
                          site_configs=project_root / "site_configs", progress=None,
                          privacy_file=project_root / "site_configs/flair/local/privacy.json", **kwargs)


def test_clinical_scope_noises_activations_the_job_did_not_ask_to_protect(project_root, tiny_data, tmp_path):
    _, sites = tiny_data
    # The job configures no filter at all; it only names the sites' "clinical" scope and avoids level 0,
    # which that scope blocks.
    train = {"size": TINY_SIZE, "network": {**TINY_NETWORK, "levels": [1, 2]}, "epochs": 1, "val_fraction": 0.5}
    summary = _run(project_root, sites, tmp_path / "ws", train=train, scope="clinical", record_steps=[1])
    assert "error" not in summary, summary.get("error")
    assert set(summary["privacy"]) == set(MODALITIES)
    assert all(0 < entry["epsilon"] < float("inf") for entry in summary["privacy"].values())
    # What the server received: clipped to norm 100 per level, then noise of std 0.1 x 100 on every element.
    for exchange in load_record(summary["artefacts"]["leakage_record"]):
        assert sorted(exchange.activations) == [1, 2]
        noise_floor = 10.0 * torch.tensor(exchange.activations[1][0].numel()).sqrt()
        assert exchange.activations[1][0].norm() > 0.9 * noise_floor


def test_clinical_scope_refuses_a_job_that_sends_the_full_resolution_level(project_root, tiny_data, tmp_path):
    _, sites = tiny_data
    summary = _run(project_root, sites, tmp_path / "ws", scope="clinical",
                   train={"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1})
    assert "blocks levels [0]" in summary["error"] and "network.levels" in summary["error"]


def test_a_job_naming_an_unknown_scope_is_refused(project_root, tiny_data, tmp_path):
    _, sites = tiny_data
    summary = _run(project_root, sites, tmp_path / "ws", scope="research-only",
                   train={"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1})
    assert "privacy scope 'research-only'" in summary["error"] and "site '" in summary["error"]
