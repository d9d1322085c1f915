"""Hostile jobs at the site (``protocol.executor``): a path a job names cannot leave the site's workspace, a refused
message leaves the site as it was (so the server's correct retry is accepted), and the site's own policy (its privacy
scopes, PSI) holds whatever the job asks."""

import pytest
import torch
from helpers import error_of, send_task
from hostile import init_task, site_workspace
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.private.privacy_manager import PrivacyManager, PrivacyService

from split_unet.errors import ProtocolError
from split_unet.protocol.executor import ModalitySiteExecutor, check_privacy_scope
from split_unet.protocol.wire import KIND_ACTIVATIONS, TASK_TRAIN, TensorMessage

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("field, value", [
    ("encoder_file", "../../../escaped.pt"), ("encoder_file", "/ABSOLUTE/escaped.pt"),
    ("checkpoint_dir", "../checkpoints"), ("checkpoint_dir", "/ABSOLUTE/checkpoints"),
    ("encoder_path", "../../trained/encoder.pt"), ("psi_job_id", "../.."),
])
def test_a_site_refuses_a_job_path_outside_its_workspace_before_reading_data(tiny_data, tmp_path, field, value):
    _, sites = tiny_data
    value = value.replace("/ABSOLUTE", str(tmp_path / "outside"))
    workspace = tmp_path / "deep" / "ws"
    executor = ModalitySiteExecutor(**{field: value})
    error = error_of(init_task(executor, site_workspace(workspace, sites)))
    assert f"site 'flair', field '{field}'" in error, error
    assert executor.images is None  # refused before any volume was read
    # Whatever the site did, nothing landed outside its workspace.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and workspace not in p.parents) \
        == []


def _first_step(executor, fl_ctx):
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_001"])
    features = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors
    weights = [p.detach().clone() for p in executor.party.encoder.parameters()]
    return {level: torch.ones_like(t) for level, t in features.items()}, weights


def _unchanged(executor, weights):
    return all(torch.equal(a, b) for a, b in zip(weights, executor.party.encoder.parameters()))


def test_a_gradient_with_a_bad_checkpoint_flag_changes_nothing_and_the_retry_is_accepted(site):
    executor, fl_ctx = site
    executor.checkpoint_dir = "checkpoints/{site}"
    gradients, weights = _first_step(executor, fl_ctx)
    error = error_of(send_task(executor, fl_ctx, TASK_TRAIN, 2, [], gradients, tensor_step=1, info={"checkpoint": "x"}))
    assert "site 'flair', field 'checkpoint'" in error
    assert _unchanged(executor, weights) and (executor.last_step, executor.pending_step) == (1, 1)
    retry = send_task(executor, fl_ctx, TASK_TRAIN, 2, [], gradients, tensor_step=1, info={"checkpoint": 1})
    assert retry.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert not _unchanged(executor, weights) and executor.last_step == 2


def test_a_new_batch_while_activations_await_their_gradient_changes_nothing(site):
    executor, fl_ctx = site
    gradients, weights = _first_step(executor, fl_ctx)
    error = error_of(send_task(executor, fl_ctx, TASK_TRAIN, 2, ["BRATS_002"]))
    assert "site 'flair', field 'patient_ids'" in error and "await their gradient" in error
    assert _unchanged(executor, weights) and (executor.last_step, executor.pending_step) == (1, 1)
    retry = send_task(executor, fl_ctx, TASK_TRAIN, 2, ["BRATS_002"], gradients, tensor_step=1)
    assert retry.get_return_code(ReturnCode.OK) == ReturnCode.OK and executor.pending_step == 2


def test_a_named_scope_at_a_site_without_a_policy_is_refused():
    previous = PrivacyService.manager
    PrivacyService.initialize(PrivacyManager(scopes=None, default_scope_name=None, components=None))
    try:
        fl_ctx = FLContext()
        fl_ctx.set_prop(FLContextKey.JOB_META, {"scope": "clinical"}, private=True, sticky=False)
        with pytest.raises(ProtocolError, match="site 'flair', field 'scope'.*no privacy policy"):
            check_privacy_scope(fl_ctx, "flair")
        check_privacy_scope(FLContext(), "flair")  # a job that names no scope runs under the site's default
    finally:
        PrivacyService.manager = previous


def test_a_site_policy_can_require_psi(tiny_data, tmp_path):
    _, sites = tiny_data
    error = error_of(init_task(ModalitySiteExecutor(), site_workspace(tmp_path / "ws", sites, require_psi=True)))
    assert "site 'flair', field 'psi_job_id'" in error and "requires a PSI job" in error

