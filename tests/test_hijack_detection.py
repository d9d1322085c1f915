"""The site's hijacking detector on real gradients: the decoder's (honest, also noised and float16 on the wire)
and a feature-space hijacking server's (``studies.hijacking``), through the NVFlare filter and without it."""

import json
import math
from unittest.mock import MagicMock

import pytest
import torch
from helpers import StandInEngine
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.server_engine_spec import ServerEngineSpec
from nvflare.apis.shareable import make_reply

from split_unet.errors import ProtocolError
from split_unet.filters import GradientAnomalyDetector
from split_unet.filters.gradient_protection import relative_noise
from split_unet.filters.hijack_detection import ALARM_FILE, DEFAULT_THRESHOLD, spatial_mean_ratio
from split_unet.networks import NetworkConfig, build_decoder, build_encoder
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_REQUEST, TensorMessage
from split_unet.studies.hijacking import FeatureSpaceHijacker
from split_unet.training import DecoderParty

pytestmark = pytest.mark.unit

SIZE = 16
NETWORK = NetworkConfig(channels=(4, 8, 16), strides=(2, 2))


def _ctx(tmp_path, site="flair"):
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.ENGINE, StandInEngine(tmp_path), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job1", private=False, sticky=False)
    return fl_ctx


def _gradient_task(gradients, step=3, codec="float32"):
    return TensorMessage(KIND_REQUEST, step + 1, ["P1", "P2"], gradients, tensor_step=step).to_shareable(codec)[0]


@pytest.fixture(scope="module")
def features():
    images = torch.randn(2, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        return build_encoder(NETWORK, 0, seed=0)(images)


@pytest.fixture(scope="module")
def honest(features):
    """The decoder's gradient for the site's features (two sites, random labels)."""
    server = DecoderParty(build_decoder(NETWORK, 2, seed=0), 5e-3, torch.device("cpu"))
    target = (torch.rand(2, 3, SIZE, SIZE, SIZE) > 0.9).float()
    return server.train_step([features, features], target)[1][0]


@pytest.fixture(scope="module")
def hijacking(features):
    """A hijacking server's first crafted gradient (pilot pair pre-trained briefly on random 'auxiliary' images)."""
    server = FeatureSpaceHijacker(NETWORK, torch.randn(4, 1, SIZE, SIZE, SIZE), seed=0, pretrain_steps=2)
    return server.step(features)


def test_the_statistic_is_zero_for_a_zero_mean_gradient_one_for_white_noise_and_n_for_a_constant():
    generator = torch.Generator().manual_seed(0)
    noise = {0: torch.randn(2, 4, 8, 8, 8, generator=generator), 1: torch.randn(2, 8, 4, 4, 4, generator=generator)}
    # Mean of 24 chi-square(1) variables: 1 +- 0.29; 4 standard deviations either side.
    assert abs(spatial_mean_ratio(noise) - 1) < 4 * math.sqrt(2 / 24)
    centred = {level: t - t.flatten(2).mean(2)[..., None, None, None] for level, t in noise.items()}
    assert spatial_mean_ratio(centred) < 1e-10
    assert spatial_mean_ratio({0: torch.ones(2, 4, 8, 8, 8)}) == pytest.approx(512)
    assert spatial_mean_ratio({0: torch.zeros(1, 2, 4, 4, 4)}) == 0.0


def test_honest_gradients_pass_untouched_even_noised_and_in_float16(honest, tmp_path):
    ratio = spatial_mean_ratio(honest)
    assert ratio < 1e-6  # the decoder normalises each channel first: no spatial mean at all
    generator = torch.Generator().manual_seed(0)
    noised = {level: relative_noise(g, 10.0, generator) for level, g in honest.items()}
    detector = GradientAnomalyDetector()
    for gradients, codec in ((honest, "float32"), (honest, "float16"), (noised, "float16")):
        task = _gradient_task(gradients, codec=codec)
        before = TensorMessage.from_shareable(task, KIND_REQUEST, site="flair").tensors
        after = detector.process(task, _ctx(tmp_path))
        assert all(torch.equal(before[level], t) for level, t in
                   TensorMessage.from_shareable(after, KIND_REQUEST, site="flair").tensors.items())
    assert not (tmp_path / "job1" / ALARM_FILE).exists()


def test_a_hijacking_gradient_is_refused_with_site_and_step_and_so_is_everything_after(honest, hijacking, tmp_path):
    print(f"spatial-mean ratio: honest {spatial_mean_ratio(honest):.3g}, hijacking {spatial_mean_ratio(hijacking):.3g}")
    # ~50 here (16^3, the first step); the statistic grows with the voxels per channel (hundreds at 32^3).
    assert spatial_mean_ratio(hijacking) > 2 * DEFAULT_THRESHOLD
    detector = GradientAnomalyDetector()
    with pytest.raises(ProtocolError, match=r"site 'flair', field 'split_unet.gradients\[step 3\]'.*crafted"):
        detector.process(_gradient_task(hijacking), _ctx(tmp_path))
    alarm = json.loads((tmp_path / "job1" / ALARM_FILE).read_text())
    assert alarm["site"] == "flair" and alarm["first_alarm"]["step"] == 3
    # A server caught once is not trusted again in this run, even with an honest-looking gradient.
    with pytest.raises(ProtocolError, match="refused since the alarm at step 3"):
        detector.process(_gradient_task(honest, step=4), _ctx(tmp_path))


def _server_ctx(tmp_path, peer_site):
    fl_ctx = _ctx(tmp_path, site="simulator_server")
    server_engine = MagicMock(spec=ServerEngineSpec)
    server_engine.get_workspace.return_value = StandInEngine(tmp_path).get_workspace()
    fl_ctx.set_prop(ReservedKey.ENGINE, server_engine, private=True, sticky=False)
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, peer_site, private=False, sticky=False)
    fl_ctx.set_peer_context(peer)
    return fl_ctx


def test_in_the_simulator_the_alarm_names_the_receiving_site(honest, hijacking, tmp_path):
    """NVFlare's simulator runs the sites' policy in the server process, one filter for every site: the alarm
    names the task's peer, and one site's alarm does not refuse another's gradients."""
    detector = GradientAnomalyDetector()
    with pytest.raises(ProtocolError, match="site 't2w'"):
        detector.process(_gradient_task(hijacking), _server_ctx(tmp_path, "t2w"))
    assert json.loads((tmp_path / "job1" / f"t2w_{ALARM_FILE}").read_text())["site"] == "t2w"
    task = _gradient_task(honest)
    assert detector.process(task, _server_ctx(tmp_path, "flair")) is task


def test_other_payloads_pass(tmp_path):
    detector = GradientAnomalyDetector(threshold=1e-3)
    constant = {0: torch.ones(1, 2, 4, 4, 4)}
    activations = TensorMessage(KIND_ACTIVATIONS, 1, ["P1"], constant).to_shareable("float32")[0]
    assert detector.process(activations, _ctx(tmp_path)) is activations
    plain = make_reply("OK")
    assert detector.process(plain, _ctx(tmp_path)) is plain
    other = DXO("WEIGHTS", data={"w": torch.ones(3).numpy()}).to_shareable()
    assert detector.process(other, _ctx(tmp_path)) is other
    no_gradient = _gradient_task({})  # the first task of a run: a batch to compute, nothing to step on
    assert detector.process(no_gradient, _ctx(tmp_path)) is no_gradient
    with pytest.raises(ValueError, match="threshold"):
        GradientAnomalyDetector(threshold=0)
