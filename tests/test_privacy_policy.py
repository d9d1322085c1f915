"""Site privacy policies through the real NVFlare simulator: the site's scope wins over the job."""

import json

import pytest
import torch
from helpers import TINY_NETWORK, TINY_SIZE
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.private.privacy_manager import PrivacyManager, PrivacyService, Scope

from split_unet.data import MODALITIES
from split_unet.errors import ProtocolError
from split_unet.protocol.rounds import refuse_blocked_levels
from split_unet.protocol.executor import check_privacy_scope
from split_unet.leakage.record import load_record
from split_unet.jobs import training_settings
from split_unet.launch.simulation import run_simulation


def _run(project_root, sites, workspace, train, **settings):
    return run_simulation(sites, workspace, training_settings(train, **settings),
                          site_configs=project_root / "site_configs", progress=None,
                          privacy_file=project_root / "site_configs/flair/local/privacy.json")


@pytest.mark.simulator
def test_clinical_scope_noises_activations_the_job_did_not_ask_to_protect(project_root, tiny_data, tmp_path):
    _, sites = tiny_data
    # The job configures no filter at all; it only names the sites' "clinical" scope and avoids level 0,
    # which that scope blocks.
    train = {"size": TINY_SIZE, "network": {**TINY_NETWORK, "levels": [1, 2]}, "epochs": 1, "val_fraction": 0.5}
    summary = _run(project_root, sites, tmp_path / "ws", train=train, scope="clinical", record_steps=[1])
    assert "error" not in summary, summary.get("error")
    assert set(summary["privacy"]) == set(MODALITIES)
    assert all(0 < entry["epsilon"] < float("inf") for entry in summary["privacy"].values())
    # What the server received carries the scope's noise: std noise_multiplier x clip_norm on every element.
    policy = json.loads((project_root / "site_configs/flair/local/privacy.json").read_text())
    clinical = next(scope for scope in policy["scopes"] if scope["name"] == "clinical")
    noise = next(f["args"] for f in clinical["task_result_filters"] if f["path"].endswith("ActivationClipNoise"))
    for exchange in load_record(summary["artefacts"]["leakage_record"]):
        assert sorted(exchange.activations) == [1, 2]
        floor = noise["noise_multiplier"] * noise["clip_norm"] * torch.tensor(exchange.activations[1][0].numel()).sqrt()
        assert exchange.activations[1][0].norm() > 0.9 * floor


def test_blocked_levels_refuse_the_job_at_start_naming_site_and_levels():
    refuse_blocked_levels("flair", [0], [1, 2, 3])  # consistent: nothing to refuse
    with pytest.raises(ProtocolError, match=r"site 'flair'.*blocks levels \[0\].*network.levels"):
        refuse_blocked_levels("flair", [0], [0, 1, 2, 3])


def test_a_job_naming_a_scope_the_site_lacks_is_refused(project_root):
    # The site's own policy, as NVFlare loads it; the simulator skips NVFlare's deploy-time scope check.
    scopes = json.loads((project_root / "site_configs/flair/local/privacy.json").read_text())["scopes"]
    manager = PrivacyManager(scopes=[_scope(s["name"]) for s in scopes], default_scope_name="public", components={})
    previous = PrivacyService.manager
    PrivacyService.initialize(manager)
    try:
        for scope, allowed in (("clinical", True), ("public", True), ("research-only", False)):
            fl_ctx = FLContext()
            fl_ctx.set_prop(FLContextKey.JOB_META, {"scope": scope}, private=True, sticky=False)
            if allowed:
                check_privacy_scope(fl_ctx, "flair")
            else:
                with pytest.raises(ProtocolError, match="site 'flair'.*'research-only'"):
                    check_privacy_scope(fl_ctx, "flair")
    finally:
        PrivacyService.manager = previous


def _scope(name):
    scope = Scope()
    scope.set_name(name)
    return scope
