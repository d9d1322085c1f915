"""The site Executor without a federation: a real FLContext around a stand-in engine and workspace."""

import shutil

import numpy as np
import pytest
import torch
from helpers import TINY_NETWORK, TINY_SIZE, error_of, send_task, start_site
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.signal import Signal

from split_unet.protocol.wire import (KIND_ACTIVATIONS, KIND_INIT, KIND_REQUEST, TASK_FINISH, TASK_INIT, TASK_TRAIN,
                                      TASK_VALIDATE, TensorMessage)
from split_unet.protocol.names import ENCODER_FILE
from split_unet.training import TrainConfig


def test_train_step_then_gradient_updates_the_encoder_and_saves_it(site, tmp_path):
    executor, fl_ctx = site
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_001", "BRATS_002"])
    features = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors
    assert features[0].shape == (2, 4, TINY_SIZE, TINY_SIZE, TINY_SIZE) and features[2].shape[1] == 16
    before = [p.clone() for p in executor.party.encoder.parameters()]
    gradients = {level: torch.randn_like(t) for level, t in features.items()}
    reply = send_task(executor, fl_ctx, TASK_FINISH, 2, [], gradients, tensor_step=1)
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert any(not torch.equal(a, b) for a, b in zip(before, executor.party.encoder.parameters()))
    saved = torch.load(tmp_path / "job1" / ENCODER_FILE, weights_only=True)
    assert saved["modality"] == "flair" and saved["step"] == 2


def test_unknown_patient_is_refused_naming_site_and_patient(site):
    executor, fl_ctx = site
    message = error_of(send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_999"]))
    assert "flair" in message and "BRATS_999" in message


@pytest.mark.parametrize("corrupt", ["nan", "shape", "levels", "step"])
def test_bad_gradients_are_refused_and_leave_the_encoder_unchanged(site, corrupt):
    executor, fl_ctx = site
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_001"])
    features = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors
    gradients = {level: torch.zeros_like(t) for level, t in features.items()}
    tensor_step = 1
    if corrupt == "nan":
        gradients[1][0, 0, 0, 0, 0] = float("nan")
    elif corrupt == "shape":
        gradients[1] = torch.zeros(1, 8, 3, 3, 3)
    elif corrupt == "levels":
        del gradients[0]
    else:
        tensor_step = 0
    before = [p.clone() for p in executor.party.encoder.parameters()]
    message = error_of(send_task(executor, fl_ctx, TASK_TRAIN, 2, ["BRATS_002"], gradients, tensor_step=tensor_step))
    assert "site 'flair'" in message
    assert all(torch.equal(a, b) for a, b in zip(before, executor.party.encoder.parameters()))


def test_replayed_step_is_refused(site):
    executor, fl_ctx = site
    send_task(executor, fl_ctx, TASK_TRAIN, 3, ["BRATS_001"])
    assert "replayed or out of order" in error_of(send_task(executor, fl_ctx, TASK_TRAIN, 3, ["BRATS_001"]))


def test_float16_wire_keeps_tiny_gradients():
    gradient = torch.full((2, 3), 3e-9)
    gradient[0, 0] = 1e-7
    shareable, n_bytes = TensorMessage(KIND_REQUEST, 1, [], {0: gradient}).to_shareable("float16")
    assert n_bytes == gradient.numel() * 2
    decoded = TensorMessage.from_shareable(shareable, KIND_REQUEST, site="s").tensors[0]
    assert torch.allclose(decoded, gradient, rtol=2e-3)
    assert np.float16(3e-9) == 0  # what plain float16 would have sent


def test_site_answers_only_for_the_agreed_patients(site):
    executor, fl_ctx = site
    agreed = {"agreed_patients": ["BRATS_001", "BRATS_002"]}
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_001"], info=agreed)
    features = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors
    gradients = {level: torch.ones_like(t) for level, t in features.items()}
    before = [p.clone() for p in executor.party.encoder.parameters()]
    # BRATS_003 is in the datalist but not agreed: refused before the gradient is applied.
    message = error_of(send_task(executor, fl_ctx, TASK_TRAIN, 2, ["BRATS_003"], gradients, tensor_step=1))
    assert "patient 'BRATS_003'" in message and "agreed" in message
    assert all(torch.equal(a, b) for a, b in zip(before, executor.party.encoder.parameters()))
    changed = {"agreed_patients": ["BRATS_001", "BRATS_003"]}
    assert "cannot change" in error_of(send_task(executor, fl_ctx, TASK_VALIDATE, 2, ["BRATS_001"], info=changed))
    assert send_task(executor, fl_ctx, TASK_TRAIN, 3, ["BRATS_002"], gradients, tensor_step=1).get_return_code(
        ReturnCode.OK) == ReturnCode.OK


def test_agreed_patients_the_site_lacks_are_refused(site):
    executor, fl_ctx = site
    message = error_of(send_task(executor, fl_ctx, TASK_VALIDATE, 1, ["BRATS_001"], info={"agreed_patients": ["BRATS_001", "BRATS_999"]}))
    assert "patient 'BRATS_999'" in message and "field 'agreed_patients'" in message
    assert "names no patient" in error_of(send_task(executor, fl_ctx, TASK_VALIDATE, 2, []))


def test_site_sends_only_its_configured_levels_whatever_the_task_asks(site):
    executor, fl_ctx = site
    config = TrainConfig(size=TINY_SIZE, network={**TINY_NETWORK, "levels": [1, 2]})
    request = DXO(KIND_INIT, data={"train": config.to_dict(), "site_index": 0, "wire_dtype": "float32"})
    assert executor.execute(TASK_INIT, request.to_shareable(), fl_ctx, Signal()).get_return_code(
        ReturnCode.OK) == ReturnCode.OK
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_001"], info={"levels": [0, 1, 2]})
    assert sorted(TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors) == [1, 2]


@pytest.mark.parametrize("compression", ["zstd", None])
def test_site_compresses_its_activations_as_configured_and_refuses_an_unknown_setting(site, compression):
    executor, fl_ctx = site
    config = TrainConfig(size=TINY_SIZE, network=TINY_NETWORK, activation_compression=compression)
    request = DXO(KIND_INIT, data={"train": config.to_dict(), "site_index": 0, "wire_dtype": "float16"})
    assert executor.execute(TASK_INIT, request.to_shareable(), fl_ctx, Signal()).get_return_code() == ReturnCode.OK
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_001"])
    encodings = from_shareable(reply).meta["encodings"]
    assert encodings and all(header.get("compression") == compression for header in encodings.values())
    request.data["train"]["activation_compression"] = "lz4"
    refused = executor.execute(TASK_INIT, request.to_shareable(), fl_ctx, Signal())
    assert "activation_compression must be None or one of ('zstd',)" in error_of(refused)


def test_site_left_out_of_a_step_applies_its_gradient_and_sends_nothing(site):
    """Modality dropout: a training task without patients only finishes the pending backward pass."""
    executor, fl_ctx = site
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_001"])
    features = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors
    gradients = {level: torch.ones_like(t) for level, t in features.items()}
    before = [p.clone() for p in executor.party.encoder.parameters()]
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 2, [], gradients, tensor_step=1)
    assert TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors == {}
    assert any(not torch.equal(a, b) for a, b in zip(before, executor.party.encoder.parameters()))
    assert executor.pending_step is None and not executor.party.awaiting_gradient
    # The next step's message carries no gradient for it (tensor_step set, no tensors): accepted.
    assert send_task(executor, fl_ctx, TASK_TRAIN, 3, ["BRATS_002"], tensor_step=2).get_return_code(
        ReturnCode.OK) == ReturnCode.OK


def _init(executor, fl_ctx, **extra):
    config = TrainConfig(size=TINY_SIZE, network=TINY_NETWORK)
    request = DXO(KIND_INIT, data={"train": config.to_dict(), "site_index": 0, "wire_dtype": "float32", **extra})
    return executor.execute(TASK_INIT, request.to_shareable(), fl_ctx, Signal())


def test_site_checkpoints_when_asked_and_resumes_from_it(site, tmp_path):
    executor, fl_ctx = site
    assert "no checkpoint_dir" in error_of(send_task(executor, fl_ctx, TASK_TRAIN, 1, [], info={"checkpoint": 1}))
    executor.checkpoint_dir = "checkpoints/{site}"
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 2, ["BRATS_001"])
    features = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors
    gradients = {level: torch.ones_like(t) for level, t in features.items()}
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 3, [], gradients, tensor_step=2, info={"checkpoint": 1})
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert (tmp_path / "checkpoints" / "flair" / "step_0000001.pt").is_file()
    trained = [p.clone() for p in executor.party.encoder.parameters()]

    assert "no checkpoint of step 5" in error_of(_init(executor, fl_ctx, resume_step=5))
    assert _init(executor, fl_ctx, resume_step=1).get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert all(torch.equal(a, b) for a, b in zip(trained, executor.party.encoder.parameters()))


def test_a_site_without_its_data_answers_init_with_an_error_naming_site_and_datalist(tiny_data, tmp_path):
    """A site whose partitioned folder is missing (e.g. never copied there) refuses the job at init, naming itself
    and the datalist it looked for; the server puts that reply into the run's summary (the simulator test of a
    corrupt file shows the way there)."""
    sites = tmp_path / "sites"
    shutil.copytree(tiny_data[1], sites)
    shutil.rmtree(sites / "t2w")
    executor, _, reply = start_site(sites, tmp_path / "t2w", TrainConfig(size=TINY_SIZE, network=TINY_NETWORK),
                                    site="t2w", site_index=3)
    error = error_of(reply)
    assert error.startswith("site 't2w'") and str(sites / "t2w" / "datalist.json") in error, error
    assert executor.images is None  # nothing opened
