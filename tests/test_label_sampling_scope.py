"""A site's privacy scope allows or refuses label sampling (patch corners centred on the label holder's tumour)."""

from pathlib import Path

import pytest
from nvflare.apis.dxo import DXO

from split_unet.defence import DEFENCE, DEFENDED_SCOPE, STRICT, UNDEFENDED, UNDEFENDED_SCOPE
from split_unet.errors import ProtocolError
from split_unet.filters import TrainingRequirements
from split_unet.jobs import native_settings, training_settings
from split_unet.protocol.wire import KIND_INIT
from helpers import party_context

pytestmark = pytest.mark.unit


def _init(filter_: TrainingRequirements, train: dict, site: str = "t1gd"):
    request = DXO(KIND_INIT, data={"train": train, "site_index": 0}).to_shareable()
    return filter_.process(request, party_context(Path("unused"), identity=site))


def test_a_scope_that_refuses_label_sampling_refuses_a_label_sampled_patch_job_naming_the_site():
    refusing = TrainingRequirements(allow_label_sampling=False)
    with pytest.raises(ProtocolError, match=r"site 't1gd', field 'train.patch_sampling'.*refuses label sampling"):
        _init(refusing, {"patch_size": 64, "patch_sampling": "label"})
    _init(refusing, {"patch_size": 64, "patch_sampling": "uniform"})  # uniform corners say nothing: passes
    _init(refusing, {"patch_sampling": "label"})  # whole volumes: no corners are sent
    _init(TrainingRequirements(), {"patch_size": 64, "patch_sampling": "label"})  # allowed by default


def test_the_defended_scopes_refuse_label_sampling_and_jobs_sample_as_their_scope_allows():
    assert not DEFENCE.label_sampling and not STRICT.label_sampling and UNDEFENDED.label_sampling
    scope = DEFENCE.site_scope(DEFENDED_SCOPE, {})
    assert scope["task_data_filters"][0]["args"]["allow_label_sampling"] is False
    assert "allow_label_sampling" not in str(UNDEFENDED.site_scope(UNDEFENDED_SCOPE, {}))
    assert native_settings().train.patch_sampling == "uniform"  # the shipped native job passes its sites' scope
    assert native_settings(scope=UNDEFENDED_SCOPE).train.patch_sampling == "label"
    assert training_settings({"patch_size": 32, "patch_sampling": "label"}).train.patch_sampling == "label"
