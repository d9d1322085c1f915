"""Progress as events the server writes (not NVFlare's log lines), read back by the launchers; TensorBoard figures
(the server's segmentation overlays, a site's own scalars)."""

import numpy as np
import pytest
import torch
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from split_unet.filters import ActivationClipNoise, gaussian_epsilon
from split_unet.filters.activation_privacy import EPSILON_TAG
from split_unet.protocol.names import TENSORBOARD_FOLDER
from split_unet.protocol.telemetry import PROGRESS_FILE, SiteTelemetry, Telemetry, read_progress
from split_unet.protocol.wire import KIND_ACTIVATIONS, TASK_TRAIN, TensorMessage
from split_unet.reports import REGION_COLOURS, overlay_figure
from split_unet.training import TrainConfig

from helpers import TINY_NETWORK, TINY_SIZE, init_site, party_context, send_task

pytestmark = pytest.mark.unit


def test_progress_events_are_read_once_each_and_half_written_lines_wait(tmp_path):
    telemetry = Telemetry(component=None)
    telemetry.progress("info", "before the run: nowhere to write")
    telemetry.start(tmp_path)
    telemetry.progress("info", "epoch 1/2 loss 0.9")
    telemetry.progress("warning", "site t1w lost")
    path = tmp_path / PROGRESS_FILE
    events, position = read_progress(path, 0)
    assert [(e["level"], e["message"]) for e in events] == [("info", "epoch 1/2 loss 0.9"), ("warning", "site t1w lost")]
    with open(path, "a") as out:
        out.write('{"time": 1, "level": "info", "mess')  # a write in progress
    assert read_progress(path, position) == ([], position)
    with open(path, "a") as out:
        out.write('age": "done"}\n')
    events, _ = read_progress(path, position)
    assert [e["message"] for e in events] == ["done"]
    assert read_progress(tmp_path / "absent.jsonl", 0) == ([], 0)


# TensorBoard: the server's segmentation overlays and a site's own figures ---------------------------------------------
def _events(folder):
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _masks(shape=(6, 5)):
    """(3, H, W) nested region masks: WT a block, TC inside it, ET one voxel of TC."""
    masks = np.zeros((3, *shape), dtype=bool)
    masks[0, 1:5, 1:4] = True
    masks[1, 2:4, 2:3] = True
    masks[2, 2, 2] = True
    return masks


def test_overlay_paints_each_voxel_in_its_innermost_region_truth_left_prediction_right():
    truth, prediction = _masks(), np.zeros((3, 6, 5), dtype=bool)
    figure = overlay_figure(truth, prediction)
    assert figure.shape == (6, 11, 3) and figure.dtype == np.uint8
    assert tuple(figure[2, 2]) == REGION_COLOURS["ET"]
    assert tuple(figure[3, 2]) == REGION_COLOURS["TC"]
    assert tuple(figure[1, 1]) == REGION_COLOURS["WT"]
    assert tuple(figure[0, 0]) == (0, 0, 0)  # no image at the server: black
    assert (figure[:, 5] == 128).all() and not figure[:, 6:].any()  # separator; an empty prediction
    image = np.arange(30, dtype=float).reshape(6, 5)
    with_image = overlay_figure(truth, truth, image)
    assert (with_image[:, :5] == with_image[:, 6:]).all()
    # The image in grey, 0 at its 1st percentile and 255 at its 99th; inside a region, half the region's colour.
    low, high = np.percentile(image, (1, 99))
    grey = np.clip((image - low) / (high - low), 0, 1) * 255
    assert tuple(with_image[5, 4]) == (255, 255, 255) and tuple(with_image[0, 0]) == (0, 0, 0)
    assert (with_image[0, 1] == round(grey[0, 1])).all()
    assert np.abs(with_image[2, 2] - (0.5 * grey[2, 2] + 0.5 * np.asarray(REGION_COLOURS["ET"]))).max() <= 0.5
    with pytest.raises(ValueError, match="region masks"):
        overlay_figure(truth[:2], prediction[:2])
    with pytest.raises(ValueError, match="differ in size"):
        overlay_figure(truth, prediction, image[:, :4])


class CapturingComponent(FLComponent):
    """The server component whose analytics events the test hands to a real TensorBoard receiver."""

    def __init__(self):
        super().__init__()
        self.events = []

    def fire_event(self, event_type, fl_ctx):
        self.events.append(fl_ctx.get_prop(FLContextKey.EVENT_DATA))


def test_overlay_reaches_tensorboard_as_an_image_at_the_training_step(tmp_path):
    fl_ctx, component = party_context(tmp_path), CapturingComponent()
    receiver = TBAnalyticsReceiver(tb_folder=TENSORBOARD_FOLDER)
    receiver.initialize(fl_ctx)
    telemetry = Telemetry(component)
    telemetry.overlay("val/overlay", _masks((4, 7)), _masks((4, 7)), 12, fl_ctx)  # H = 4: not mistaken for channels
    telemetry.scalar("val/dice_mean", 0.5, 12, fl_ctx)
    for shareable in component.events:
        receiver.save(fl_ctx, shareable, "server")
    receiver.finalize(fl_ctx)
    events = _events(tmp_path / "job1" / TENSORBOARD_FOLDER / "server")
    (image,) = events.Images("val/overlay")
    assert (image.step, image.height, image.width) == (12, 4, 15)
    assert [(e.step, e.value) for e in events.Scalars("val/dice_mean")] == [(12, 0.5)]


def test_site_telemetry_writes_scalars_against_the_step_into_the_site_run_folder(tmp_path):
    telemetry = SiteTelemetry(tmp_path)
    for step, loss in [(1, 0.9), (2, 0.7), (3, 0.4)]:
        telemetry.scalar("site/nopeek_loss", loss, step)
    # Readable before close: each point is flushed as it is written.
    scalars = _events(tmp_path / TENSORBOARD_FOLDER).Scalars("site/nopeek_loss")
    assert [(e.step, round(e.value, 6)) for e in scalars] == [(1, 0.9), (2, 0.7), (3, 0.4)]
    telemetry.close()


def test_the_noise_filter_logs_its_epsilon_at_the_training_steps_of_training_answers(tmp_path):
    noise = ActivationClipNoise(clip_norm=1.0, noise_multiplier=1.0, seed=0)
    fl_ctx = party_context(tmp_path)
    epsilons = {}
    for step, info in [(1, {"train_step": 1}), (2, {}), (3, {"train_step": 2}), (4, {"train_step": "2"})]:
        message = TensorMessage(KIND_ACTIVATIONS, step, ["P1"], {0: torch.ones(1, 2, 4, 4, 4)}, info=info)
        noise.process(message.to_shareable("float32")[0], fl_ctx)
        if "train_step" in info:
            epsilons.setdefault(info["train_step"], noise.epsilon())
    scalars = _events(tmp_path / "job1" / TENSORBOARD_FOLDER).Scalars(EPSILON_TAG)
    # The validation answer (no train_step) and a malformed step log nothing; step 2 includes the validation release.
    assert [e.step for e in scalars] == [1, 2]
    assert [e.value for e in scalars] == pytest.approx([epsilons[1], epsilons[2]], rel=1e-6)
    assert epsilons[2] == pytest.approx(gaussian_epsilon(1.0, 3, noise.delta))


def test_a_site_logs_its_nopeek_term_at_the_training_step_of_each_gradient(tiny_data, tmp_path):
    executor, fl_ctx = init_site(tiny_data[1], tmp_path, TrainConfig(size=TINY_SIZE, network=TINY_NETWORK,
                                                                     nopeek_weight=0.1))
    reply = send_task(executor, fl_ctx, TASK_TRAIN, 1, ["BRATS_001"], info={"train_step": 1, "train_steps": 2})
    features = TensorMessage.from_shareable(reply, KIND_ACTIVATIONS, site="flair").tensors
    gradients = {level: torch.ones_like(t) for level, t in features.items()}
    send_task(executor, fl_ctx, TASK_TRAIN, 2, [], gradients, tensor_step=1, info={"gradient_train_step": 1})
    executor.site_telemetry.close()
    events = EventAccumulator(str(tmp_path / "job1" / TENSORBOARD_FOLDER))
    events.Reload()
    (point,) = events.Scalars("site/nopeek_loss")
    assert point.step == 1 and point.value == pytest.approx(executor.party.last_nopeek_loss) and point.value > 0
