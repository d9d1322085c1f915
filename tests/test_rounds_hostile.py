"""What the server accepts from the sites (``protocol.rounds``): init replies with bad patient ids or grids, reports
a site cannot have measured, and the timeouts of the rounds in which the sites check their data or warm up."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hostile import TRAIN
from nvflare.apis.controller_spec import TaskCompletionStatus
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from split_unet.errors import ProtocolError
from split_unet.filters import ActivationClipNoise
from split_unet.protocol.controller import SplitUNetController
from split_unet.protocol.rounds import activation_shapes, check_empty_windows
from split_unet.protocol.wire import (KIND_ACTIVATIONS, KIND_SITE_INFO, TASK_INIT, TASK_TRAIN, TASK_VALIDATE,
                                      TensorMessage)

pytestmark = pytest.mark.unit


def test_the_server_refuses_an_unknown_activation_compression_when_the_job_loads():
    with pytest.raises(ValueError, match="activation_compression must be None or one of"):
        SplitUNetController(train={**TRAIN.to_dict(), "activation_compression": "lz4"})


def _init_reply(info: dict):
    return DXO(KIND_SITE_INFO, data=info).to_shareable()


@pytest.mark.parametrize("patient_ids, shown", [("ABC", "got str"), ([1, 2], "patient id 1 is not"),
                                                (["../../x"], "patient id '../../x'"), (["a", "a"], "repeat")])
def test_the_server_refuses_init_replies_with_bad_patient_ids(patient_ids, shown):
    controller = SplitUNetController(sites=["flair"], train=TRAIN.to_dict())
    controller.rounds.broadcast = lambda *args: {"flair": _init_reply({"patient_ids": patient_ids, "modality": "flair"})}
    with pytest.raises(ProtocolError, match=f"site 'flair', field 'patient_ids'.*{re.escape(shown)}"):
        controller.rounds.initialize({}, Signal(), FLContext())


@pytest.mark.parametrize("geometry, shown", [
    (None, "must map every patient the site holds"), ({}, "must map every patient the site holds"),
    ({"P1": {"shape": [240, 240], "affine": np.eye(4).tolist()}}, "patient 'P1', field 'info.geometry.shape'"),
    ({"P1": {"shape": [240, 240, 155], "affine": np.zeros((4, 4)).tolist()}}, "field 'info.geometry.affine'")])
def test_the_server_refuses_init_replies_without_each_patients_grid(geometry, shown):
    controller = SplitUNetController(sites=["flair"], train=TRAIN.to_dict())
    info = {"patient_ids": ["P1"], "modality": "flair", "geometry": geometry}
    controller.rounds.broadcast = lambda *args: {"flair": _init_reply(info)}
    with pytest.raises(ProtocolError, match=f"site 'flair', .*{re.escape(shown)}"):
        controller.rounds.initialize({}, Signal(), FLContext())


def test_the_init_task_waits_its_own_timeout_and_rounds_theirs():
    """Sites check all their data in the init task: it may take minutes where a round takes seconds, so a short
    ``task_timeout`` (a hung site is found quickly) must not fail a slow but healthy init."""
    controller = SplitUNetController(sites=["flair", "t1w"], train=TRAIN.to_dict(), task_timeout=7, init_timeout=900,
                                     on_site_failure="continue")
    timeouts, target = {}, {}

    def broadcast(task, fl_ctx, targets, min_responses):
        timeouts[task.name], target[id(task)] = task.timeout, targets[0]

    def wait_for_task(task, abort_signal):  # t1w answers, flair does not (NVFlare ends its task at the timeout)
        if target[id(task)] == "t1w":
            task.client_tasks = [SimpleNamespace(result=Shareable())]
        else:
            task.completion_status = TaskCompletionStatus.TIMEOUT

    controller.broadcast, controller.communicator = broadcast, SimpleNamespace(wait_for_task=wait_for_task)
    payloads = {"flair": Shareable(), "t1w": Shareable()}
    with pytest.raises(ProtocolError, match="site 'flair', field 'split_unet_init': no answer within the task "
                                            "timeout of 900 s"):
        controller.rounds.broadcast(TASK_INIT, payloads, Signal(), FLContext())
    assert list(controller.rounds.broadcast(TASK_TRAIN, payloads, Signal(), FLContext())) == ["t1w"]
    assert timeouts == {TASK_INIT: 900, TASK_TRAIN: 7}
    assert "no answer within the task timeout of 7 s" in controller.rounds.lost["flair"]["reason"]
    controller.rounds.broadcast(TASK_TRAIN, {"t1w": Shareable()}, Signal(), FLContext(), start_up=True)
    assert timeouts[TASK_TRAIN] == 900


@pytest.mark.parametrize("warmup_steps, start_up", [(0, [False, False]), (4, [True, False])])
def test_the_round_in_which_the_sites_warm_up_is_a_start_up_round(warmup_steps, start_up):
    """A site takes its privacy warm-up in its first training task, the one that names the agreed patients: with a
    warm-up only that round may take as long as the init task."""
    train = {**TRAIN.to_dict(), "nopeek_weight": 1.0, "privacy_warmup_steps": warmup_steps}
    controller = SplitUNetController(sites=["flair"], train=train, task_timeout=7, init_timeout=900)
    rounds = []
    controller.rounds.broadcast = lambda *args, start_up: rounds.append(start_up) or {}  # flair answers nothing
    controller.rounds.announce(["BRATS_001"])
    for _ in range(2):
        controller.rounds.exchange(TASK_TRAIN, ["BRATS_001"], Signal(), FLContext())
    assert rounds == start_up


def _server_round(info: dict, controller: SplitUNetController | None = None, patient: str = "P1"):
    controller = controller or SplitUNetController(sites=["flair"], train=TRAIN.to_dict())
    tensors = {level: torch.zeros(shape) for level, shape in activation_shapes(TRAIN, 1).items()}
    step = controller.rounds.step + 1
    reply = TensorMessage(KIND_ACTIVATIONS, step, [patient], tensors, info=info).to_shareable("float32")[0]
    controller.rounds.broadcast = lambda *args, **kwargs: {"flair": reply}
    controller.rounds.exchange(TASK_VALIDATE, [patient], Signal(), FLContext())
    return controller


def _honest_privacy_info(releases: int = 1) -> tuple[dict, ActivationClipNoise]:
    noise = ActivationClipNoise(clip_norm=1.0, noise_multiplier=0.5, seed=0)
    tensors = {level: torch.zeros(shape) for level, shape in activation_shapes(TRAIN, 1).items()}
    for _ in range(releases):
        message = noise.transform(TensorMessage(KIND_ACTIVATIONS, 1, ["P1"], dict(tensors)), FLContext())
    return message.info, noise


@pytest.mark.parametrize("info, field", [
    ({"peak_memory_mb": "x" * 5_000_000}, "info.peak_memory_mb"),
    ({"cpu_seconds": float("nan")}, "info.cpu_seconds"),
    ({"cpu_seconds": -1.0}, "info.cpu_seconds"),
    ({"dp_epsilon": 0.0, "dp_delta": 1e-5}, "info.dp_noise_multiplier"),
    ({**_honest_privacy_info()[0], "dp_epsilon": 0.0}, "info.dp_epsilon"),
    ({**_honest_privacy_info()[0], "dp_releases": 0, "dp_epsilon": 0.0}, "info.dp_releases"),
])
def test_the_server_refuses_what_a_site_cannot_have_measured(info, field):
    with pytest.raises(ProtocolError, match=f"site 'flair', field '{re.escape(field)}'"):
        _server_round(info)


def test_the_server_keeps_the_epsilon_it_recomputed_from_an_honest_filter():
    controller = SplitUNetController(sites=["flair"], train=TRAIN.to_dict())
    for round_ in (1, 2):
        info, noise = _honest_privacy_info(releases=round_)
        _server_round(info, controller)
    assert controller.rounds.privacy["flair"]["epsilon"] == pytest.approx(noise.epsilon(), rel=1e-12)
    assert controller.rounds.privacy["flair"]["releases_per_patient"] == 2 * len(activation_shapes(TRAIN, 1))



@pytest.mark.parametrize("flags", ["all", [True], [True, 1], [True, None], {"0": True, "1": False}])
def test_the_server_refuses_empty_window_flags_that_do_not_fit_the_windows(flags):
    with pytest.raises(ProtocolError, match=re.escape("site 'flair', field 'info.empty_windows'")):
        check_empty_windows({"empty_windows": flags}, "flair", 2)


def test_a_window_is_without_image_only_where_every_site_that_encoded_it_says_so():
    controller = SplitUNetController(sites=["flair", "t1"], train=TRAIN.to_dict())
    rounds = controller.rounds
    assert rounds.windows_without_image(2) == [False, False]  # no round of windows yet
    rounds.empty_windows = {"flair": [True, True], "t1": [True, False]}
    assert rounds.windows_without_image(2) == [True, False]
    rounds.empty_windows = {"flair": [True, True], "t1": None}  # t1's privacy filter dropped its flags
    assert rounds.windows_without_image(2) == [False, False]
