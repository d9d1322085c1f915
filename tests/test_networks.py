"""Shapes and composition of the Split-U-Net parts, in 2D and 3D."""

import pytest
import torch

from split_unet.networks import (FusionDecoder, ModalityEncoder, NetworkConfig, SplitUNet, build_decoder,
                                 build_encoder, build_split_unet)


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
