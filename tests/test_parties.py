"""Split learning in one process (no NVFlare): the parties reproduce SplitUNet training exactly."""

import pytest
import torch

from split_unet.errors import ProtocolError
from split_unet.networks import NetworkConfig, build_decoder, build_encoder, build_split_unet
from split_unet.training import (DecoderParty, EncoderParty, TrainConfig, amp_active, grad_scaler, make_optimizer,
                                 segmentation_loss)
from split_unet.training.nopeek import distance_correlation, spatial_nopeek_loss

CONFIG = NetworkConfig(channels=(4, 8, 16), strides=(2, 2))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 4, 16, 16, 16, generator=g)
    target = (torch.rand(2, 3, 16, 16, 16, generator=g) > 0.7).float()
    return images, target


def test_parties_match_the_composed_network_over_steps():
    device = torch.device("cpu")
    reference = build_split_unet(CONFIG, (1, 1, 1, 1), seed=3)
    optimizer = make_optimizer(reference.parameters(), 1e-2)
    sites = [EncoderParty(build_encoder(CONFIG, k, 3), 1e-2, device, site=f"s{k}") for k in range(4)]
    server = DecoderParty(build_decoder(CONFIG, 4, 3), 1e-2, device)
    loss_function = segmentation_loss()
    for step in range(3):
        images, target = _batch(step)
        loss = loss_function(reference(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        features = [site.forward(images[:, k:k + 1]) for k, site in enumerate(sites)]
        split_loss, gradients = server.train_step(features, target)
        for site, gradient in zip(sites, gradients):
            site.backward(gradient)
        assert split_loss == pytest.approx(float(loss.detach()), abs=1e-5)
    for k, site in enumerate(sites):
        for a, b in zip(site.encoder.parameters(), reference.encoders[k].parameters()):
            assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(server.decoder.parameters(), reference.decoder.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_encoder_party_refuses_out_of_protocol_gradients():
    site = EncoderParty(build_encoder(CONFIG, 0, 0), 1e-3, torch.device("cpu"), site="flair")
    with pytest.raises(ProtocolError, match="no activations are pending"):
        site.backward({0: torch.zeros(1)})
    features = site.forward(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ProtocolError, match="before the gradient"):
        site.forward(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ProtocolError, match="levels"):
        site.backward({0: torch.zeros_like(features[0])})
    bad = {level: torch.zeros_like(t) for level, t in features.items()}
    bad[1] = torch.zeros(1, 8, 4, 4, 4)
    before = [p.clone() for p in site.encoder.parameters()]
    with pytest.raises(ProtocolError, match="site 'flair'.*gradient\\[1\\]"):
        site.backward(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, site.encoder.parameters()))


def decoder_step(server: DecoderParty, features, target, present=None):
    """(loss, gradients sent to the sites, the decoder's accumulated gradients) of one step. The accumulated
    gradients, not Adam's step: Adam turns ~0 gradients' rounding into lr-sized moves."""
    loss, gradients = server.train_step(features, target, present)
    return loss, gradients, [p.grad.clone() for p in server.decoder.parameters()]


def assert_same_decoder_step(a, b):
    (loss_a, grads_a, params_a), (loss_b, grads_b, params_b) = a, b
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for site_a, site_b in zip(grads_a, grads_b):
        for level in site_a:
            assert torch.allclose(site_a[level], site_b[level], rtol=1e-4, atol=1e-8)
    for param_a, param_b in zip(params_a, params_b):
        assert torch.allclose(param_a, param_b, rtol=1e-4, atol=1e-7)


def test_decoder_micro_batches_take_the_same_step():
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 4, 16, 16, 16, generator=g)
    target = (torch.rand(4, 3, 16, 16, 16, generator=g) > 0.7).float()
    encoders = [build_encoder(CONFIG, k, 3) for k in range(4)]
    with torch.no_grad():
        features = [encoder(images[:, k:k + 1]) for k, encoder in enumerate(encoders)]
    features[1] = {}  # a site left out of the step (modality dropout) sends nothing
    results = []
    for micro_batches in (1, 3):  # 3 parts of 4 patients: unequal parts (2, 1, 1)
        server = DecoderParty(build_decoder(CONFIG, 4, 3), 1e-2, device, micro_batches=micro_batches)
        results.append(decoder_step(server, features, target, present=[True, False, True, True]))
    assert_same_decoder_step(*results)


def test_decoder_checkpointing_gives_the_same_gradients():
    g = torch.Generator().manual_seed(1)
    features = [{level: torch.randn(2, c, *(16 // 2 ** level,) * 3, generator=g)
                 for level, c in enumerate(CONFIG.channels)} for _ in range(4)]
    target = (torch.rand(2, 3, 16, 16, 16, generator=g) > 0.7).float()
    results = []
    for checkpointing in (False, True):
        server = DecoderParty(build_decoder(CONFIG, 4, 3), 1e-2, torch.device("cpu"), checkpointing=checkpointing)
        results.append(decoder_step(server, features, target))
    assert_same_decoder_step(*results)


def test_decoder_party_leaves_the_callers_features_alone():
    """The decoder's leaves are its own: features a caller passes twice (as an in-process run may) collect no
    gradient, so the second step's gradients are not added to the first's."""
    g = torch.Generator().manual_seed(2)
    features = [{level: torch.randn(2, c, *(16 // 2 ** level,) * 3, generator=g)
                 for level, c in enumerate(CONFIG.channels)} for _ in range(4)]
    target = (torch.rand(2, 3, 16, 16, 16, generator=g) > 0.7).float()
    first = decoder_step(DecoderParty(build_decoder(CONFIG, 4, 3), 1e-2, torch.device("cpu")), features, target)
    second = decoder_step(DecoderParty(build_decoder(CONFIG, 4, 3), 1e-2, torch.device("cpu")), features, target)
    assert all(t.grad is None and not t.requires_grad for site in features for t in site.values())
    for site_a, site_b in zip(first[1], second[1]):
        assert all(torch.equal(site_a[level], site_b[level]) for level in site_a)


def test_amp_changes_nothing_on_the_cpu():
    device = torch.device("cpu")
    assert not amp_active(device, True) and not grad_scaler(device, True).is_enabled()
    runs = []
    for amp in (False, True):
        sites = [EncoderParty(build_encoder(CONFIG, k, 3), 1e-2, device, nopeek_weight=0.1, amp=amp) for k in range(4)]
        server = DecoderParty(build_decoder(CONFIG, 4, 3), 1e-2, device, amp=amp)
        images, target = _batch()
        loss, gradients = server.train_step([site.forward(images[:, k:k + 1]) for k, site in enumerate(sites)], target)
        for site, gradient in zip(sites, gradients):
            site.backward(gradient)
        assert "scaler" not in server.state_dict() and "scaler" not in sites[0].state_dict()
        runs.append((loss, [p.detach().clone() for party in [server.decoder] + [s.encoder for s in sites]
                            for p in party.parameters()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
def test_amp_parties_on_cuda_follow_the_float32_step():
    """float16 autocast with loss scaling at both parties: float32 leaves each party, the step is taken and the
    loss stays within float16 rounding (~1e-3 relative over a few hundred summed terms) of float32's."""
    device = torch.device("cuda")
    images, target = _batch()
    losses = []
    for amp in (False, True):
        sites = [EncoderParty(build_encoder(CONFIG, k, 3), 1e-2, device, amp=amp) for k in range(4)]
        server = DecoderParty(build_decoder(CONFIG, 4, 3), 1e-2, device, amp=amp)
        features = [site.forward(images[:, k:k + 1]) for k, site in enumerate(sites)]
        assert all(t.dtype == torch.float32 for f in features for t in f.values())
        before = [p.detach().clone() for p in sites[0].encoder.parameters()]
        loss, gradients = server.train_step(features, target)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for g in gradients for t in g.values())
        for site, gradient in zip(sites, gradients):
            site.backward(gradient)
        assert any(not torch.equal(a, b) for a, b in zip(before, sites[0].encoder.parameters()))
        assert server.predict([s.infer(images[:, k:k + 1]) for k, s in enumerate(sites)]).dtype == torch.float32
        losses.append(loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)


def test_nopeek_decorrelates_only_the_levels_asked_for():
    """``nopeek_levels``: the site's NoPeek term is the one of those levels alone, from the same positions."""
    images, _ = _batch()
    images = images[:, :1]
    party = EncoderParty(build_encoder(CONFIG, 0, 3), 1e-2, torch.device("cpu"), nopeek_weight=1.0, seed=5,
                         nopeek_levels=[2])
    features = party.forward(images)
    party.backward({level: torch.zeros_like(t) for level, t in features.items()})
    expected = spatial_nopeek_loss(images, {2: features[2].detach()}, generator=torch.Generator().manual_seed(5))
    assert party.last_nopeek_loss == pytest.approx(float(expected), rel=1e-5)
    every = EncoderParty(build_encoder(CONFIG, 0, 3), 1e-2, torch.device("cpu"), nopeek_weight=1.0, seed=5)
    every.backward({level: torch.zeros_like(t) for level, t in every.forward(images).items()})
    assert every.last_nopeek_loss != pytest.approx(party.last_nopeek_loss, rel=1e-3)
    with pytest.raises(ValueError, match="nopeek_levels must be some of the sent levels"):
        TrainConfig(network={"levels": [1, 2, 3]}, nopeek_levels=[0])
    assert TrainConfig.from_dict(TrainConfig(nopeek_levels=[2, 1]).to_dict()).nopeek_levels == (1, 2)


def test_background_patches_warm_up_and_train_with_every_privacy_term_finite():
    """A skull-stripped volume cut into patches gives patches of pure background (zeros after z-scoring over the
    brain) and patches that hold a sliver of brain, whose NoPeek positions may all fall on background while the
    features vary (instance norm spreads the sliver): the warm-up and training steps keep everything finite."""
    background = torch.zeros(2, 1, 16, 16, 16)
    sliver = background.clone()
    sliver[:, :, :2, :2, :2] = torch.randn(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    site = EncoderParty(build_encoder(CONFIG, 0, 3), 1e-2, torch.device("cpu"), nopeek_weight=1.0, seed=2)
    assert site.warm_up([background, sliver, sliver]) == 3
    server = DecoderParty(build_decoder(CONFIG, 1, 3), 1e-2, torch.device("cpu"))
    for images in (background, sliver):
        features = site.forward(images)
        assert all(torch.isfinite(t).all() for t in features.values())
        _, (gradient,) = server.train_step([features], torch.zeros(2, 3, 16, 16, 16))
        site.backward(gradient)
        assert site.last_nopeek_loss is not None and torch.isfinite(torch.tensor(site.last_nopeek_loss))
    assert all(torch.isfinite(p).all() for p in site.encoder.parameters())
    # Distance correlation with a constant sample is 0 (Szekely et al.), and its gradient is finite both ways.
    for constant_x in (True, False):
        x = torch.zeros(64, 1) if constant_x else torch.randn(64, 1)
        y = torch.randn(64, 8) if constant_x else torch.zeros(64, 8)
        x.requires_grad_(), y.requires_grad_()
        value = distance_correlation(x, y)
        value.backward()
        assert value.item() == 0.0 and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
