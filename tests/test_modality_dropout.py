"""Missing modalities: the fusion with absent inputs, the seeded dropout draw, the split step and the
Dice-with-one-modality-missing evaluation (plain PyTorch, 2D and tiny 3D)."""

import pytest
import torch

from split_unet.networks import (FusionDecoder, ModalityEncoder, NetworkConfig, build_decoder, build_encoder,
                                 build_split_unet)
from split_unet.training import (DecoderParty, EncoderParty, TrainConfig, dice_without_each_input, dropped_input,
                                 make_optimizer, segmentation_loss)

CHANNELS, STRIDES = (4, 8, 16), (2, 2)


def _features(k: int, seed: int = 0) -> list[dict[int, torch.Tensor]]:
    torch.manual_seed(seed)
    encoder = ModalityEncoder(2, 1, CHANNELS, STRIDES)
    with torch.no_grad():  # what arrives from the sites: plain tensors
        return [encoder(torch.randn(2, 1, 16, 16)) for _ in range(k)]


@pytest.mark.parametrize("fusion", ["concat", "mean"])
def test_all_present_is_the_default_path_exactly(fusion):
    decoder = FusionDecoder(2, 3, CHANNELS, STRIDES, fusion=fusion).eval()
    features = _features(3)
    assert torch.equal(decoder(features), decoder(features, [True, True, True]))


def test_mean_fusion_averages_the_present_inputs():
    decoder = FusionDecoder(2, 3, CHANNELS, STRIDES, fusion="mean").eval()
    features = _features(3)
    # The mean of three inputs whose third is the mean of the first two equals the mean of those two.
    stand_in = {level: (features[0][level] + features[1][level]) / 2 for level in features[0]}
    expected = decoder([features[0], features[1], stand_in])
    assert torch.allclose(decoder([features[0], features[1], {}], [True, True, False]), expected, atol=1e-6)


def test_concat_fusion_zero_fills_and_rescales_like_inverted_dropout():
    decoder = FusionDecoder(2, 4, CHANNELS, STRIDES, fusion="concat").eval()
    features = _features(4)
    present = [True, False, True, True]
    manual = [{level: t * 4 / 3 if p else torch.zeros_like(t) for level, t in f.items()}
              for f, p in zip(features, present)]
    assert torch.allclose(decoder([f if p else {} for f, p in zip(features, present)], present), decoder(manual),
                          atol=1e-6)
    with pytest.raises(ValueError, match="every input is missing"):
        decoder(features, [False] * 4)
    with pytest.raises(ValueError, match="present has 3 entries"):
        decoder(features, [True] * 3)


def test_missing_encoder_does_not_run_and_gets_no_gradient():
    config = NetworkConfig(spatial_dims=2, channels=CHANNELS, strides=STRIDES)
    model = build_split_unet(config, (1, 1, 1), seed=0)
    model(torch.randn(2, 3, 16, 16), [True, False, True]).sum().backward()
    assert all(p.grad is None for p in model.encoders[1].parameters())
    assert all(p.grad is not None for p in model.encoders[0].parameters())


def test_decoder_party_returns_no_gradient_for_the_absent_site():
    config = NetworkConfig(spatial_dims=2, channels=CHANNELS, strides=STRIDES)
    party = DecoderParty(build_decoder(config, 3, 0), 1e-3, torch.device("cpu"))
    features = _features(3)
    features[2] = {}
    loss, gradients = party.train_step(features, (torch.rand(2, 3, 16, 16) > 0.5).float(), [True, True, False])
    assert gradients[2] == {} and sorted(gradients[0]) == [0, 1, 2] and loss == loss


def test_dropout_draw_is_seeded_uniform_and_at_the_configured_rate():
    draws = [dropped_input(0.4, 4, seed=7, step=step) for step in range(1, 4001)]
    assert draws == [dropped_input(0.4, 4, seed=7, step=step) for step in range(1, 4001)]
    dropped = [d for d in draws if d is not None]
    assert abs(len(dropped) / len(draws) - 0.4) < 0.03
    assert all(abs(dropped.count(k) / len(dropped) - 0.25) < 0.04 for k in range(4))
    assert dropped_input(0.0, 4, 7, 1) is None and dropped_input(0.9, 1, 7, 1) is None
    with pytest.raises(ValueError, match="modality_dropout"):
        TrainConfig(modality_dropout=1.0)


def test_dice_without_each_input_reports_every_case():
    config = NetworkConfig(channels=CHANNELS, strides=STRIDES, fusion="mean")
    model = build_split_unet(config, (1, 1), seed=0)
    torch.manual_seed(0)
    images, target = torch.randn(3, 2, 16, 16, 16), (torch.rand(3, 3, 16, 16, 16) > 0.5).float()
    result = dice_without_each_input(model, images, target, ["flair", "t1w"])
    assert sorted(result) == ["flair", "none", "t1w"]
    assert all(sorted(dice) == ["ET", "TC", "WT", "mean"] and 0 <= dice["mean"] <= 1 for dice in result.values())
    # Without t1w the model is its flair half alone: the same Dice as a model whose t1w input copies flair's
    # features (mean fusion), i.e. the same flair channel twice.
    twins = build_split_unet(config, (1, 1), seed=0)
    twins.encoders[1].load_state_dict(model.encoders[0].state_dict())
    copied = dice_without_each_input(twins, images[:, [0, 0]], target, ["a", "b"])["none"]
    assert result["t1w"] == pytest.approx(copied)


def test_split_steps_with_a_site_left_out_equal_the_composed_network():
    """The left-out site neither runs nor steps; in the composed network its encoder gets no gradient and
    Adam skips it: the same training."""
    config = NetworkConfig(channels=CHANNELS, strides=STRIDES)
    device = torch.device("cpu")
    reference = build_split_unet(config, (1, 1, 1), seed=3)
    optimizer = make_optimizer(reference.parameters(), 1e-2)
    sites = [EncoderParty(build_encoder(config, k, 3), 1e-2, device) for k in range(3)]
    server = DecoderParty(build_decoder(config, 3, 3), 1e-2, device)
    generator = torch.Generator().manual_seed(0)
    for present in ([True, True, True], [True, False, True], [False, True, True]):
        images = torch.randn(2, 3, 16, 16, 16, generator=generator)
        target = (torch.rand(2, 3, 16, 16, 16, generator=generator) > 0.7).float()
        optimizer.zero_grad(set_to_none=True)
        segmentation_loss()(reference(images, present), target).backward()
        optimizer.step()
        features = [site.forward(images[:, k:k + 1]) if p else {} for k, (site, p) in enumerate(zip(sites, present))]
        _, gradients = server.train_step(features, target, present)
        for site, gradient, p in zip(sites, gradients, present):
            if p:
                site.backward(gradient)
    for k, site in enumerate(sites):
        for a, b in zip(site.encoder.parameters(), reference.encoders[k].parameters()):
            assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(server.decoder.parameters(), reference.decoder.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
