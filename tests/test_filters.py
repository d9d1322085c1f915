"""Privacy filters on tiny tensors, and NoPeek, without a federation."""

import math

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply

from split_unet.filters import (ActivationClipNoise, ActivationQuantization, GradientProtection, LevelBlocking,
                                clip_per_sample, gaussian_epsilon)
from split_unet.filters.base import TensorMessageFilter
from split_unet.protocol.wire import KIND_ACTIVATIONS, KIND_REQUEST, KIND_SITE_INFO, TensorMessage, error_reply
from split_unet.training.nopeek import distance_correlation, spatial_nopeek_loss


def _ctx(site="flair"):
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    return fl_ctx


def _activations(tensors, patients=("P1", "P2"), codec="float32", kind=KIND_ACTIVATIONS, info=None):
    return TensorMessage(kind, 3, list(patients), tensors, info=info or {}).to_shareable(codec)[0]


def _decode(shareable, kind=KIND_ACTIVATIONS):
    return TensorMessage.from_shareable(shareable, kind, site="flair")


def test_clipping_bound_holds_per_sample():
    tensor = torch.randn(3, 4, 8, 8, 8) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1, 1, 1)
    clipped = clip_per_sample(tensor, 2.0)
    norms = clipped.flatten(1).norm(dim=1)
    assert (norms <= 2.0 + 1e-5).all()
    assert torch.allclose(clipped[0], tensor[0])  # below the bound: untouched


def test_noise_has_the_configured_scale_and_epsilon_grows_with_releases():
    noise_filter = ActivationClipNoise(clip_norm=1.0, noise_multiplier=0.5, seed=0)
    zeros = {0: torch.zeros(2, 4, 16, 16, 16)}
    out = _decode(noise_filter.process(_activations(zeros), _ctx())).tensors[0]
    assert out.std().item() == pytest.approx(0.5, rel=0.02)
    epsilons = [noise_filter.epsilon()]
    for _ in range(3):
        message = _decode(noise_filter.process(_activations(zeros), _ctx()))
        epsilons.append(message.info["dp_epsilon"])
    assert epsilons == sorted(epsilons) and epsilons[-1] > epsilons[1]
    assert gaussian_epsilon(0.5, 4, 1e-5) == pytest.approx(noise_filter.epsilon())
    assert gaussian_epsilon(2.0, 4, 1e-5) < gaussian_epsilon(0.5, 4, 1e-5)


def test_noise_drops_the_flags_of_windows_without_image():
    """Noised activations of all-zero windows differ from window to window: the flags would tell what they hide.
    The shipped defended scopes' level blocking keeps them."""
    info = {"empty_windows": [True, False], "cpu_seconds": 1.0}
    noised = _decode(ActivationClipNoise(seed=0).process(_activations({0: torch.zeros(2, 4, 4, 4, 4)}, info=info),
                                                         _ctx()))
    assert "empty_windows" not in noised.info and noised.info["cpu_seconds"] == 1.0
    for deterministic in (ActivationQuantization("int8"), LevelBlocking([1])):  # zero windows stay alike: kept
        kept = _decode(deterministic.process(_activations({0: torch.zeros(2, 4, 4, 4, 4),
                                                           1: torch.zeros(2, 8, 2, 2, 2)}, info=info), _ctx()))
        assert kept.info["empty_windows"] == [True, False]


def test_int8_quantisation_error_is_bounded_and_bytes_shrink():
    tensor = torch.randn(2, 4, 8, 8, 8)
    original = _activations({0: tensor})
    quantised = ActivationQuantization("int8").process(_activations({0: tensor}), _ctx())
    decoded = _decode(quantised)
    assert decoded.wire_bytes == _decode(original).wire_bytes // 4
    step = tensor.abs().amax(dim=(0, 2, 3, 4), keepdim=True) / 127
    assert ((decoded.tensors[0] - tensor).abs() <= step / 2 + 1e-6).all()


def test_level_blocking_declares_at_init_and_drops_the_level():
    blocking = LevelBlocking([0])
    info = blocking.process(DXO(KIND_SITE_INFO, data={"patient_ids": ["P1"]}).to_shareable(), _ctx())
    assert from_shareable(info).data["blocked_levels"] == [0]
    out = _decode(blocking.process(_activations({0: torch.ones(2, 4, 8, 8, 8), 1: torch.ones(2, 8, 4, 4, 4)}), _ctx()))
    assert sorted(out.tensors) == [1]


@pytest.mark.parametrize("mode", ["maxnorm", "noise"])
def test_gradient_protection(mode):
    gradient = torch.zeros(2, 4, 8, 8, 8)
    gradient[0] = 1e-3
    gradient[1, :, 2:4, 2:4, 2:4] = 1e-2
    protection = GradientProtection(mode=mode, noise_multiplier=2.0, seed=0)
    out = _decode(protection.process(_activations({0: gradient}, kind=KIND_REQUEST), _ctx()), KIND_REQUEST)
    norms = out.tensors[0].flatten(1).norm(dim=1)
    if mode == "maxnorm":
        assert norms[0].item() == pytest.approx(norms[1].item(), rel=0.1)
    else:
        added = out.tensors[0] - gradient
        rms = gradient.flatten(1).pow(2).mean(dim=1).sqrt()
        assert added[1].std().item() == pytest.approx(2.0 * rms[1].item(), rel=0.1)


@pytest.mark.parametrize("payload", [
    Shareable(), make_reply(ReturnCode.OK), error_reply("disk full"),
    DXO(DataKind.WEIGHTS, data={"w": np.ones(3)}).to_shareable(),
    DXO(KIND_SITE_INFO, data={"patient_ids": ["P1"]}).to_shareable(),
])
@pytest.mark.parametrize("make_filter", [lambda: ActivationClipNoise(seed=0), lambda: ActivationQuantization("int8"),
                                         lambda: GradientProtection(seed=0), lambda: LevelBlocking([0])])
def test_filters_pass_what_they_do_not_understand(payload, make_filter):
    before = repr(dict(payload))
    filter_ = make_filter()
    result = filter_.process(payload, _ctx())
    if isinstance(filter_, LevelBlocking) and "DXO" in payload and from_shareable(payload).data_kind == KIND_SITE_INFO:
        return  # the one payload level blocking amends by design (tested above)
    assert result is payload and repr(dict(result)) == before


def test_filters_that_change_a_message_are_recorded_in_its_filter_history():
    # A site's chain: level blocking, then clipping and noise; the server's gradient protection on the way back.
    message = _activations({0: torch.ones(2, 4, 8, 8, 8), 1: torch.ones(2, 8, 4, 4, 4)})
    for filter_ in (LevelBlocking([0]), ActivationClipNoise(seed=0)):
        message = filter_.process(message, _ctx())
    assert from_shareable(message).get_filter_history() == ["LevelBlocking", "ActivationClipNoise"]
    assert sorted(_decode(message).tensors) == [1]
    gradients = GradientProtection(seed=0).process(_activations({1: torch.ones(2, 8, 4, 4, 4)}, kind=KIND_REQUEST),
                                                   _ctx())
    assert from_shareable(gradients).get_filter_history() == ["GradientProtection"]
    info = LevelBlocking([0]).process(DXO(KIND_SITE_INFO, data={"patient_ids": ["P1"]}).to_shareable(), _ctx())
    assert from_shareable(info).get_filter_history() == ["LevelBlocking"]
    # A filter that leaves the message as it is does not claim it.
    untouched = LevelBlocking([0]).process(_activations({1: torch.ones(2, 8, 4, 4, 4)}), _ctx())
    assert from_shareable(untouched).get_filter_history() is None


def test_distance_correlation_separates_dependence_from_independence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, generator=g)
    assert distance_correlation(x, torch.cat([x * 3, x.pow(2)], dim=1)).item() > 0.9
    assert distance_correlation(x, torch.randn(200, 2, generator=g)).item() < 0.2


def test_nopeek_loss_is_differentiable_and_lower_for_unrelated_features():
    images = torch.randn(2, 1, 8, 8, 8)
    related = {0: images.repeat(1, 4, 1, 1, 1).requires_grad_(), 1: torch.nn.functional.avg_pool3d(images, 2)}
    unrelated = {0: torch.randn(2, 4, 8, 8, 8), 1: torch.randn(2, 1, 4, 4, 4)}
    g = torch.Generator().manual_seed(0)
    loss = spatial_nopeek_loss(images, related, positions=64, generator=g)
    loss.backward()
    assert related[0].grad is not None and math.isfinite(loss.item())
    assert spatial_nopeek_loss(images, unrelated, positions=64, generator=g) < loss


def test_a_filter_keeps_the_compression_its_message_arrived_in():
    tensor = torch.zeros(2, 4, 8, 8, 8)
    tensor[..., 2:6, 2:6, 2:6] = 1.0
    compressed = TensorMessage(KIND_ACTIVATIONS, 3, ["P1", "P2"], {0: tensor}).to_shareable("float16",
                                                                                           compression="zstd")[0]
    for filter_ in (ActivationQuantization("int8"), LevelBlocking([1])):
        out = filter_.process(compressed, _ctx())
        encoding = from_shareable(out).meta["encodings"]["0"]
        assert encoding["compression"] == "zstd" and torch.equal(_decode(out).tensors[0], tensor)
    plain = ActivationQuantization("int8").process(_activations({0: tensor}), _ctx())
    assert "compression" not in from_shareable(plain).meta["encodings"]["0"]


def test_a_filter_without_transform_is_refused_at_construction():
    class Forgetful(TensorMessageFilter):
        kinds = (KIND_ACTIVATIONS,)

    with pytest.raises(TypeError, match="abstract method 'transform'|abstract method transform"):
        Forgetful()
