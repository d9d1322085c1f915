"""The shipped sites' privacy policy (``site_configs/<site>/local/privacy.json``): the shipped job passes its default
scope, and a job that weakens the defence is refused at the site."""

import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import party_context
from nvflare.apis.dxo import DXO, from_shareable

from split_unet.errors import ProtocolError
from split_unet.jobs import TrainingJob
from split_unet.protocol.rounds import refuse_blocked_levels
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_INIT, KIND_SITE_INFO, TensorMessage
from split_unet.training import TrainConfig

pytestmark = pytest.mark.unit


def _default_scope_filters(project_root: Path, site: str) -> tuple[list, list]:
    """(task data filters, task result filters) of a shipped site's default scope, built from its privacy.json as
    NVFlare builds them (class path and arguments)."""
    policy = json.loads((project_root / "site_configs" / site / "local" / "privacy.json").read_text())
    scope = next(scope for scope in policy["scopes"] if scope["name"] == policy["default_scope"])

    def build(spec):
        module, _, name = spec["path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**spec["args"])
    return [build(s) for s in scope["task_data_filters"]], [build(s) for s in scope["task_result_filters"]]


def _through(filters, payload, fl_ctx):
    for filter_ in filters:
        payload = filter_.process(payload, fl_ctx)
    return payload


@pytest.mark.parametrize("site", ["flair", "t1w", "t1gd", "t2w"])
def test_the_shipped_job_passes_the_default_scope_and_a_hostile_job_cannot_weaken_it(project_root, site):
    data_filters, result_filters = _default_scope_filters(project_root, site)
    fl_ctx = party_context(Path("unused"), identity=site)

    def init(train: TrainConfig | dict):
        settings = train.to_dict() if isinstance(train, TrainConfig) else train
        request = DXO(KIND_INIT, data={"train": settings, "site_index": 0, "wire_dtype": "float16"})
        return _through(data_filters, request.to_shareable(), fl_ctx)

    def declared_blocked_levels():
        info = _through(result_filters, DXO(KIND_SITE_INFO, data={"patient_ids": ["P1"]}).to_shareable(), fl_ctx)
        return from_shareable(info).data.get("blocked_levels", [])

    shipped = TrainingJob().train
    assert from_shareable(init(shipped)).data["train"] == shipped.to_dict()  # passes unchanged
    refuse_blocked_levels(site, declared_blocked_levels(), shipped.network.sent_levels)
    # A job that switches the site's training defence off, or leaves it out, is refused at the site, by name.
    # (As settings, not TrainConfigs: the server writes them; a hostile one need not be a valid TrainConfig.)
    for key, value in (("nopeek_weight", 0.0), ("nopeek_weight", float("nan"))):
        with pytest.raises(ProtocolError, match=rf"site '{site}', field 'train.{key}'.*requires {key}"):
            init({**shipped.to_dict(), key: value})
    with pytest.raises(ProtocolError, match=rf"site '{site}', field 'train.nopeek_levels'.*every level it sends"):
        init({**shipped.to_dict(), "nopeek_levels": [3]})  # NoPeek's weight, but not on levels 1 and 2
    omitted = DXO(KIND_INIT, data={"train": {k: v for k, v in shipped.to_dict().items() if k != "nopeek_weight"}})
    with pytest.raises(ProtocolError, match="requires nopeek_weight >= 1"):
        _through(data_filters, omitted.to_shareable(), fl_ctx)
    # A job whose network sends the full-resolution level is refused at start naming the site (the server's check
    # of what the site declared); whatever the server does, the level never leaves the site.
    all_levels = replace(shipped, network=replace(shipped.network, levels=None))
    with pytest.raises(ProtocolError, match=rf"site '{site}'.*blocks levels \[0\]"):
        refuse_blocked_levels(site, declared_blocked_levels(), all_levels.network.sent_levels)
    sent = TensorMessage(KIND_ACTIVATIONS, 1, ["P1"], {0: torch.ones(1, 4, 8, 8, 8), 1: torch.ones(1, 8, 4, 4, 4)})
    received = _through(result_filters, sent.to_shareable("float32")[0], fl_ctx)
    assert sorted(TensorMessage.from_shareable(received, KIND_ACTIVATIONS, site=site).tensors) == [1]

