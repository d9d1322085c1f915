"""Shapes and composition of the Split-U-Net parts, in 2D and 3D."""

import pytest
import torch

from split_unet.networks import (FusionDecoder, ModalityEncoder, NetworkConfig, SplitUNet, build_decoder,
                                 build_encoder, build_split_unet)
from split_unet.protocol.rounds import activation_shapes
from split_unet.training import TrainConfig


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_encoder_returns_one_feature_map_per_level(spatial_dims, size):
    encoder = ModalityEncoder(spatial_dims, 1, channels=(4, 8, 16), strides=(2, 2))
    features = encoder(torch.randn(2, 1, *(size,) * spatial_dims))
    assert list(features) == [0, 1, 2]
    for level, channels in enumerate((4, 8, 16)):
        assert features[level].shape == (2, channels, *(size // 2**level,) * spatial_dims)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "mean"])
@pytest.mark.parametrize("levels", [None, (1, 2), (2,)])
def test_decoder_fuses_sites_to_region_logits(spatial_dims, fusion, levels):
    size = 16
    encoders = [ModalityEncoder(spatial_dims, 1, (4, 8, 16), (2, 2), levels=levels) for _ in range(3)]
    decoder = FusionDecoder(spatial_dims, 3, (4, 8, 16), (2, 2), out_channels=3, levels=levels, fusion=fusion)
    x = torch.randn(2, 1, *(size,) * spatial_dims)
    features = [encoder(x) for encoder in encoders]
    assert sorted(features[0]) == sorted(levels or (0, 1, 2))
    assert decoder(features).shape == (2, 3, *(size,) * spatial_dims)


def test_split_unet_early_and_single_inputs():
    late = SplitUNet(3, (1, 1, 1, 1), (4, 8), (2,))
    early = SplitUNet(3, (4,), (4, 8), (2,))
    x = torch.randn(1, 4, 8, 8, 8)
    assert late(x).shape == early(x).shape == (1, 3, 8, 8, 8)
    assert SplitUNet(3, (1,), (4, 8), (2,))(x[:, :1]).shape == (1, 3, 8, 8, 8)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="bottleneck"):
        ModalityEncoder(3, 1, (4, 8, 16), (2, 2), levels=(0, 1))
    with pytest.raises(ValueError, match="strides"):
        ModalityEncoder(3, 1, (4, 8, 16), (2,))
    with pytest.raises(ValueError, match="fusion"):
        FusionDecoder(3, 2, (4, 8), (2,), fusion="max")
    decoder = FusionDecoder(3, 2, (4, 8), (2,))
    with pytest.raises(ValueError, match="expected features from 2"):
        decoder([ModalityEncoder(3, 1, (4, 8), (2,))(torch.randn(1, 1, 8, 8, 8))])


def test_parts_built_alone_equal_the_composed_network():
    config = NetworkConfig(channels=(4, 8, 16), strides=(2, 2))
    composed = build_split_unet(config, (1, 1, 1, 1), seed=7)
    for k in range(4):
        alone = build_encoder(config, k, seed=7)
        for a, b in zip(alone.state_dict().values(), composed.encoders[k].state_dict().values()):
            assert torch.equal(a, b)
    for a, b in zip(build_decoder(config, 4, seed=7).state_dict().values(), composed.decoder.state_dict().values()):
        assert torch.equal(a, b)
    other = build_encoder(config, 0, seed=8)
    assert not all(torch.equal(a, b) for a, b in zip(other.state_dict().values(),
                                                      composed.encoders[0].state_dict().values()))


def test_network_config_round_trip_and_unknown_keys():
    config = NetworkConfig(channels=(4, 8), strides=(2,), levels=(1,))
    assert NetworkConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown network settings"):
        NetworkConfig.from_dict({"chanels": [4, 8]})


@pytest.mark.parametrize("fusion", ["concat", "mean"])
def test_narrow_quantised_full_resolution_level(fusion):
    """Level 0 leaves the encoder as ``full_res_channels`` channels on the ``2**bits`` grid in [0, 1]; the deeper
    levels are unchanged; the decoder takes that width, and the rounding passes the gradient to the encoder."""
    config = NetworkConfig(channels=(4, 8, 16), strides=(2, 2), full_res_channels=1, full_res_bits=2, fusion=fusion)
    encoder = build_encoder(config, 0, seed=3)
    plain = build_encoder(NetworkConfig(channels=(4, 8, 16), strides=(2, 2)), 0, seed=3)
    x = torch.randn(2, 1, 16, 16, 16)
    features = encoder(x)
    assert config.sent_channels == encoder.sent_channels == (1, 8, 16)
    assert features[0].shape == (2, 1, 16, 16, 16)
    grid = features[0] * 3
    assert torch.equal(grid, grid.round()) and grid.min() >= 0 and grid.max() <= 3
    assert len(grid.unique()) > 1  # a constant map would pass the grid check and carry nothing
    for level in (1, 2):  # the blocks start from the same weights as without the projection
        assert torch.equal(features[level], plain(x)[level])
    logits = build_decoder(config, 2, seed=3)([features, encoder(x)])
    assert logits.shape == (2, 3, 16, 16, 16)
    logits.sum().backward()
    assert encoder.full_res.project.conv.weight.grad.abs().sum() > 0
    assert NetworkConfig.from_dict(config.to_dict()) == config


def test_bad_full_resolution_narrowing_is_refused():
    with pytest.raises(ValueError, match="full_res_channels must be between 1 and channels"):
        NetworkConfig(channels=(4, 8), strides=(2,), full_res_channels=5)
    with pytest.raises(ValueError, match="do not send"):
        NetworkConfig(channels=(4, 8), strides=(2,), levels=(1,), full_res_channels=1)
    with pytest.raises(ValueError, match="set full_res_channels too"):
        NetworkConfig(channels=(4, 8), strides=(2,), full_res_bits=2)
    with pytest.raises(ValueError, match="between 1 and 8"):
        ModalityEncoder(3, 1, (4, 8), (2,), full_res_channels=1, full_res_bits=9)


def test_the_server_expects_the_narrowed_width_from_every_site():
    """The server checks every received level against ``activation_shapes``: level 0 at its sent width."""
    config = TrainConfig(size=16, network={"channels": [4, 8, 16], "strides": [2, 2], "full_res_channels": 1,
                                           "full_res_bits": 2})
    assert activation_shapes(config, 2) == {0: (2, 1, 16, 16, 16), 1: (2, 8, 8, 8, 8), 2: (2, 16, 4, 4, 4)}
