"""Network configuration shared by the server, the sites and centralized training.

The server's job config is the single source of the architecture: it sends this configuration to
every site, so encoders and decoder cannot disagree. Each part is initialised from its own seed, so a
site's encoder is the same whether it is built alone at the site or inside ``SplitUNet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from .split_unet import FusionDecoder, ModalityEncoder, SplitUNet, sent_widths


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of the Split-U-Net; see ``ModalityEncoder`` / ``FusionDecoder`` for the fields."""

    spatial_dims: int = 3
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    out_channels: int = 3
    levels: tuple[int, ...] | None = None
    fusion: str = "concat"
    num_res_units: int = 1
    norm: str = "instance"
    act: str = "prelu"
    dropout: float = 0.0
    full_res_channels: int | None = None
    full_res_bits: int | None = None

    def __post_init__(self):
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(sorted(int(level) for level in self.levels)))
        self.sent_channels  # refuses a narrowed full-resolution level the network cannot send

    @property
    def sent_levels(self) -> tuple[int, ...]:
        return self.levels if self.levels is not None else tuple(range(len(self.channels)))

    @property
    def sent_channels(self) -> tuple[int, ...]:
        """Channels of each level as a site sends it (level 0 narrowed by ``full_res_channels``)."""
        return sent_widths(self.channels, self.sent_levels, self.full_res_channels, self.full_res_bits)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict | None) -> "NetworkConfig":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown network settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def layer_args(self) -> dict:
        """The arguments every part (encoder, decoder) shares."""
        return dict(channels=self.channels, strides=self.strides, levels=self.levels,
                    num_res_units=self.num_res_units, norm=self.norm, act=self.act, dropout=self.dropout,
                    full_res_channels=self.full_res_channels)

    def encoder_args(self) -> dict:
        """``ModalityEncoder``'s arguments after ``spatial_dims`` and ``in_channels``."""
        return dict(self.layer_args(), full_res_bits=self.full_res_bits)


def part_seed(seed: int, part: int, *stream: int) -> int:
    """Independent, stable seed for one part (0 = decoder, k + 1 = encoder k); ``stream``: a further part
    belonging to that one (encoder k's own inversion decoder: ``(k + 1, 1)``)."""
    return int(np.random.SeedSequence([seed, part, *stream]).generate_state(1)[0])


def build_encoder(config: NetworkConfig, index: int, seed: int, in_channels: int = 1) -> ModalityEncoder:
    """Encoder ``index`` (the site's position in the server's site list), initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(seed, index + 1))
        return ModalityEncoder(config.spatial_dims, in_channels, **config.encoder_args())


def build_decoder(config: NetworkConfig, num_inputs: int, seed: int) -> FusionDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(seed, 0))
        return FusionDecoder(config.spatial_dims, num_inputs, out_channels=config.out_channels,
                             fusion=config.fusion, **config.layer_args())


def build_inversion_decoder(config: NetworkConfig, index: int, seed: int, in_channels: int = 1) -> FusionDecoder:
    """Site ``index``'s own inversion decoder: sent features ``{level: (B, sent_channels[level], *S_level)}`` -> the site's
    images (B, in_channels, *S).

    The layout of the server's decoder with one input and the image as output: the learned inversion attack
    uses the same layout, so the site trains against the decoder an attacker would train.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(seed, index + 1, 1))
        return FusionDecoder(config.spatial_dims, 1, out_channels=in_channels, fusion="mean", **config.layer_args())


def build_split_unet(config: NetworkConfig, in_channels: Sequence[int], seed: int) -> SplitUNet:
    """The composed network whose parts equal ``build_encoder(config, k, seed)`` and ``build_decoder``."""
    encoders = [build_encoder(config, k, seed, c) for k, c in enumerate(in_channels)]
    return SplitUNet(config.spatial_dims, in_channels, encoders=encoders,
                     decoder=build_decoder(config, len(in_channels), seed), channels=config.channels,
                     strides=config.strides, levels=config.levels)
