"""Site privacy policies through the real NVFlare simulator: the site's scope wins over the job."""

import json

import pytest
import torch
from helpers import TINY_NETWORK, TINY_SIZE
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.private.privacy_manager import PrivacyManager, PrivacyService, Scope

from split_unet.data import MODALITIES
from split_unet.defence import DEFENDED_SCOPE, STRICT_SCOPE, UNDEFENDED_SCOPE
from split_unet.errors import ProtocolError
from split_unet.protocol.rounds import refuse_blocked_levels
from split_unet.protocol.executor import check_privacy_scope
from split_unet.leakage.record import load_record
from split_unet.jobs import training_settings
from split_unet.launch.simulation import run_simulation


# A site's own scope that blocks the full-resolution level and clips and noises the rest (the sweep's "no full-res
# + activation noise" point).
NOISE_SCOPE = {"name": "noised", "properties": {"data": "patient images"}, "task_data_filters": [],
               "task_result_filters": [
                   {"path": "split_unet.filters.LevelBlocking", "args": {"blocked_levels": [0]}},
                   {"path": "split_unet.filters.ActivationClipNoise",
                    "args": {"clip_norm": 250.0, "noise_multiplier": 0.004}}]}


@pytest.mark.simulator
def test_a_site_scope_noises_activations_the_job_did_not_ask_to_protect(project_root, tiny_data, tmp_path):
    _, sites = tiny_data
    policy = tmp_path / "privacy.json"
    policy.write_text(json.dumps({"scopes": [NOISE_SCOPE], "default_scope": NOISE_SCOPE["name"]}))
    # The job configures no site filter at all; it only names the sites' scope and avoids level 0, which that
    # scope blocks.
    train = {"size": TINY_SIZE, "network": {**TINY_NETWORK, "levels": [1, 2]}, "epochs": 1, "val_fraction": 0.5}
    summary = run_simulation(sites, tmp_path / "ws", training_settings(train, scope="noised", record_steps=[1]),
                             site_configs=project_root / "site_configs", progress=None, privacy_file=policy)
    assert "error" not in summary, summary.get("error")
    assert set(summary["privacy"]) == set(MODALITIES)
    assert all(0 < entry["epsilon"] < float("inf") for entry in summary["privacy"].values())
    # What the server received carries the scope's noise: std noise_multiplier x clip_norm on every element.
    noise = NOISE_SCOPE["task_result_filters"][1]["args"]
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
    policy = json.loads((project_root / "site_configs/flair/local/privacy.json").read_text())
    shipped = [scope["name"] for scope in policy["scopes"]]
    # A clinical site that removed the opt-in "undefended" scope from its policy: a study job cannot run there.
    clinical_only = [name for name in shipped if name != UNDEFENDED_SCOPE]
    previous = PrivacyService.manager
    try:
        for names, asked, allowed in ((shipped, DEFENDED_SCOPE, True), (shipped, UNDEFENDED_SCOPE, True),
                                      (shipped, STRICT_SCOPE, True),
                                      (shipped, "research-only", False), (shipped, "public", False),
                                      (clinical_only, UNDEFENDED_SCOPE, False), (clinical_only, DEFENDED_SCOPE, True)):
            PrivacyService.initialize(PrivacyManager(scopes=[_scope(name) for name in names],
                                                     default_scope_name=policy["default_scope"], components={}))
            fl_ctx = FLContext()
            fl_ctx.set_prop(FLContextKey.JOB_META, {"scope": asked}, private=True, sticky=False)
            if allowed:
                check_privacy_scope(fl_ctx, "flair")
            else:
                with pytest.raises(ProtocolError, match=f"site 'flair'.*'{asked}'"):
                    check_privacy_scope(fl_ctx, "flair")
    finally:
        PrivacyService.manager = previous


def _scope(name):
    scope = Scope()
    scope.set_name(name)
    return scope
