"""A site in patch training: it cuts the server's patches and windows, and refuses a request that does not fit the
job (patch corners off the grid, missing augmentation seeds, too many windows, windows of two patients, a prefetch
of a patient it does not hold) without changing anything, so the server's correct retry is accepted."""

import numpy as np
import pytest
import torch
from helpers import TINY_NETWORK, error_of, init_site, send_task
from nvflare.apis.fl_constant import ReturnCode

from split_unet.errors import ProtocolError
from split_unet.protocol.wire import KIND_ACTIVATIONS, TASK_TRAIN, TASK_VALIDATE, TensorMessage
from split_unet.training import TrainConfig
from split_unet.training.schedule import PatchBatch, Schedule

pytestmark = pytest.mark.unit

CONFIG = TrainConfig(size=(32, 28, 24), patch_size=16, augment=True, sw_batch_size=2, network=TINY_NETWORK)
GOOD = {"starts": [[0, 4, 8], [16, 12, 8]], "seeds": [1, 2]}


@pytest.fixture
def patch_site(tiny_data, tmp_path):
    return init_site(tiny_data[1], tmp_path, CONFIG)


def _train(executor, fl_ctx, step, patches, prefetch=(), ids=("BRATS_001", "BRATS_002")):
    return send_task(executor, fl_ctx, TASK_TRAIN, step, list(ids),
                     info={"train_step": step, "train_steps": 9, "patches": patches, "prefetch": list(prefetch)})


def _features(reply):
    return TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors


@pytest.mark.parametrize("patches, prefetch, field", [
    (None, (), "info.patches"),
    ({"starts": [[0, 4, 8], [32, 12, 8]], "seeds": [1, 2]}, (), "info.patches.starts"),  # starts beyond the grid
    ({"starts": [[0, 4, 8], [-16, 0, 0]], "seeds": [1, 2]}, (), "info.patches.starts"),  # ends before it
    ({"starts": [[0, 4, 8]], "seeds": [1]}, (), "info.patches"),  # one patch for two patients
    ({"starts": GOOD["starts"], "seeds": None}, (), "info.patches.seeds"),  # the job augments
    ({"starts": GOOD["starts"], "seeds": [1, True]}, (), "info.patches.seeds"),
    (GOOD, ("NOT_HELD",), "info.prefetch"),
])
def test_a_bad_patch_request_changes_nothing_and_the_retry_is_accepted(patch_site, patches, prefetch, field):
    executor, fl_ctx = patch_site
    weights = [p.detach().clone() for p in executor.party.encoder.parameters()]
    error = error_of(_train(executor, fl_ctx, 1, patches, prefetch))
    assert "site 'flair'" in error and f"field '{field}" in error, error
    assert (executor.last_step, executor.pending_step) == (-1, None)
    assert all(torch.equal(a, b) for a, b in zip(weights, executor.party.encoder.parameters()))
    reply = _train(executor, fl_ctx, 1, GOOD, prefetch=["BRATS_003"])
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert _features(reply)[0].shape == (2, 4, 16, 16, 16) and executor.pending_step == 1


def test_the_site_cuts_the_servers_patches_as_the_schedule_does(patch_site):
    """The patches the site encodes are those ``PatchBatch`` cuts from its volumes (then its own intensity
    augmentation): without augmentation, exactly those."""
    executor, fl_ctx = patch_site
    executor.config = TrainConfig(**{**CONFIG.__dict__, "augment": False})
    step = next(Schedule(["BRATS_001", "BRATS_002"], executor.config, 4).steps(0))
    patches = Schedule(["BRATS_001", "BRATS_002"], executor.config, 4).patches(step)
    assert patches.seeds is None
    received = PatchBatch.from_message(patches.message(), executor.config, 2, site="flair")
    assert received == patches
    expected = executor.party.infer(patches.cut([executor.images.volume(pid) for pid in step.patient_ids],
                                                mode="bilinear"))
    features = _features(_train(executor, fl_ctx, 1, patches.message(), ids=step.patient_ids))
    for level, tensor in expected.items():
        # forward (training mode) and infer (evaluation mode) agree: instance norm has no running statistics
        assert torch.allclose(features[level], tensor, atol=1e-6), level


@pytest.mark.parametrize("message, error", [
    ({"starts": [[0, 0, 0]], "seeds": [1, 2]}, "1 patch corners for 2 patients"),
    ({"starts": [[0, 0, 0], [0, 0, 0]], "seeds": [1]}, "1 augmentation seeds for 2 patients"),
])
def test_a_patch_batch_must_cover_every_patient(message, error):
    """One corner and one seed per patient of the batch: a short list is refused, naming the field."""
    config = TrainConfig(**{**CONFIG.__dict__, "augment": True})
    with pytest.raises(ProtocolError, match=error):
        PatchBatch.from_message(message, config, 2, site="flair")


@pytest.mark.parametrize("ids, windows, field", [
    (["BRATS_001"], [[0, 0, 0]] * 3, "info.windows"),  # more than sw_batch_size
    (["BRATS_001", "BRATS_002"], [[0, 0, 0]], "patient_ids"),  # one patient at a time
    (["BRATS_001"], [[0, 0, 24]], "info.windows"),  # off the grid
    (["BRATS_001"], "all", "info.windows"),
])
def test_bad_windows_are_refused(patch_site, ids, windows, field):
    executor, fl_ctx = patch_site
    error = error_of(send_task(executor, fl_ctx, TASK_VALIDATE, 1, ids, info={"windows": windows}))
    assert f"field '{field}" in error, error
    reply = send_task(executor, fl_ctx, TASK_VALIDATE, 1, ["BRATS_001"], info={"windows": [[0, 0, 0], [16, 12, 8]]})
    assert _features(reply)[1].shape == (2, 8, 8, 8, 8)


def test_windows_reaching_beyond_the_grid_are_zero_filled(patch_site):
    executor, _ = patch_site
    volume = executor.images.volume("BRATS_001")
    from split_unet.training.patches import cut_patch
    window = cut_patch(volume, (-4, 20, 16), (16, 16, 16))
    assert np.all(window[:, :4] == 0) and np.all(window[:, :, 8:] == 0) and np.all(window[:, :, :, 8:] == 0)
    assert np.array_equal(window[:, 4:, :8, :8], volume[:, :12, 20:28, 16:24])


def test_the_site_says_which_windows_hold_no_image_there(patch_site):
    """``empty_windows``: a window 0 throughout at this site (outside the head, or beyond the grid) is flagged; one
    that holds any voxel of the image is not."""
    executor, fl_ctx = patch_site
    volume = executor.images.volume("BRATS_001")
    from split_unet.training.patches import cut_patch
    windows = [[-12, -12, -12], [8, 6, 4]]  # reaching 4 voxels into the grid's corner; its middle
    assert not cut_patch(volume, windows[0], (16, 16, 16)).any() and cut_patch(volume, windows[1], (16, 16, 16)).any()
    reply = send_task(executor, fl_ctx, TASK_VALIDATE, 1, ["BRATS_001"], info={"windows": windows})
    message = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair")
    assert message.info["empty_windows"] == [True, False]
