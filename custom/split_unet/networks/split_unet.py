"""The Split-U-Net: modality encoders at the sites, a fusing decoder at the label holder.

Plain PyTorch on MONAI blocks (``ResidualUnit``, ``Convolution``), after ``monai.networks.nets.UNet``.
MONAI's UNet nests its levels recursively and cannot hand out the per-level encoder features that a
site must send, so the encoder and decoder are written as flat level lists here.

Shapes use ``S`` for the spatial shape (``spatial_dims`` axes) and ``S_l = S / prod(strides[:l])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn
from torch.utils.checkpoint import checkpoint

FUSIONS = ("concat", "mean")


def _check_levels(channels: Sequence[int], strides: Sequence[int], levels: Sequence[int] | None) -> tuple[int, ...]:
    """Validate the level layout; return the sorted levels that are exchanged (default: all)."""
    if len(channels) < 2:
        raise ValueError(f"channels needs at least two levels, got {tuple(channels)}")
    if len(strides) != len(channels) - 1:
        raise ValueError(f"strides needs len(channels) - 1 = {len(channels) - 1} entries, got {tuple(strides)}")
    depth = len(channels)
    sent = tuple(range(depth)) if levels is None else tuple(sorted(set(int(level) for level in levels)))
    if any(level < 0 or level >= depth for level in sent):
        raise ValueError(f"levels {sent} out of range for a {depth}-level network")
    if depth - 1 not in sent:
        raise ValueError(f"the bottleneck level {depth - 1} must be sent, got levels {sent}")
    return sent


def sent_widths(channels: Sequence[int], levels: Sequence[int], full_res_channels: int | None = None,
                full_res_bits: int | None = None) -> tuple[int, ...]:
    """Validate a narrowed full-resolution level (see ``ModalityEncoder``); return the channels of each level as
    sent: ``channels``, with level 0 narrowed to ``full_res_channels``."""
    if full_res_bits is not None and full_res_channels is None:
        raise ValueError("full_res_bits quantises the narrowed full-resolution level: set full_res_channels too")
    if full_res_bits is not None and not 1 <= full_res_bits <= 8:
        raise ValueError(f"full_res_bits must be between 1 and 8, got {full_res_bits}")
    if full_res_channels is None:
        return tuple(channels)
    if not 1 <= full_res_channels <= channels[0]:
        raise ValueError(f"full_res_channels must be between 1 and channels[0] = {channels[0]}, got {full_res_channels}")
    if 0 not in levels:
        raise ValueError(f"full_res_channels narrows level 0, which levels {tuple(levels)} do not send")
    return (int(full_res_channels), *channels[1:])


class QuantisedProjection(nn.Module):
    """A narrow, quantised copy of a level's features: what a site sends instead of the full-resolution level.

    A 1x1 convolution to ``out_channels``, a sigmoid into [0, 1], and (with ``bits``) rounding to the ``2**bits``
    values ``k / (2**bits - 1)``: few channels with few values each carry the boundaries the decoder needs at full
    resolution and far less of the image. Learned end to end: the rounding passes the gradient straight through
    (``torch.fake_quantize_per_tensor_affine``, the straight-through estimator of quantisation-aware training).

    ``forward(x)``: (B, in_channels, *S) -> (B, out_channels, *S), values in [0, 1] (on the grid with ``bits``).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, bits: int | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.project = Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 whatever autocast gave the convolution: the rounding grid is exact there, and the wire casts anyway.
        y = torch.sigmoid(self.project(x).float())
        if self.bits is None:
            return y
        top = 2 ** self.bits - 1
        return torch.fake_quantize_per_tensor_affine(y, 1.0 / top, 0, 0, top)


class ModalityEncoder(nn.Module):
    """One site's encoder: the contracting half of a U-Net on that site's modality.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for one MRI sequence, 4 for early fusion).
        channels: feature channels per level, finest first; the last level is the bottleneck.
        strides: downsampling stride between consecutive levels (``len(channels) - 1`` entries).
        levels: levels whose features leave the encoder (default: all); the bottleneck is required.
        num_res_units: residual units per block (as in MONAI's UNet; 0 = plain convolutions).
        norm, act, dropout: MONAI layer factories' arguments.
        full_res_channels: send the full-resolution level (level 0) through a ``QuantisedProjection`` to this many
            channels (default: the level as computed); the encoder's deeper levels still see the full features.
        full_res_bits: that projection's quantisation (``2**bits`` values per channel; default: not quantised).

    ``forward(x)``: ``x`` of shape (B, in_channels, *S) -> ``{level: (B, sent_channels[level], *S_level)}``
    for every sent level, in increasing level order (``sent_channels``: ``channels`` with level 0 narrowed).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        levels: Sequence[int] | None = None,
        num_res_units: int = 1,
        norm: tuple | str = "instance",
        act: tuple | str = "prelu",
        dropout: float = 0.0,
        full_res_channels: int | None = None,
        full_res_bits: int | None = None,
    ) -> None:
        super().__init__()
        self.levels = _check_levels(channels, strides, levels)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.channels = tuple(channels)
        self.sent_channels = sent_widths(channels, self.levels, full_res_channels, full_res_bits)
        self.full_res_channels = full_res_channels
        block_strides = (1, *strides)
        block_inputs = (in_channels, *channels[:-1])
        self.blocks = nn.ModuleList(
            _conv_block(spatial_dims, c_in, c_out, stride, num_res_units, norm, act, dropout)
            for c_in, c_out, stride in zip(block_inputs, channels, block_strides)
        )
        # Built after the blocks, so that they start from the same weights with or without it.
        self.full_res = (QuantisedProjection(spatial_dims, channels[0], full_res_channels, full_res_bits)
                         if full_res_channels is not None else None)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        features = {}
        for level, block in enumerate(self.blocks):
            x = block(x)
            if level in self.levels:
                features[level] = self.full_res(x) if level == 0 and self.full_res is not None else x
        return features


class FusionDecoder(nn.Module):
    """The label holder's half: fuses K encoders' features level by level and decodes to regions.

    Args:
        spatial_dims: 2 or 3.
        num_inputs: K, the number of encoders (sites) whose features are fused.
        channels, strides, levels, num_res_units, norm, act, dropout: as in ``ModalityEncoder``.
        out_channels: output channels (3 regions: WT, TC, ET).
        fusion: ``"concat"`` (concatenate the K features, then a 1x1 convolution back to the level's
            width) or ``"mean"`` (average them; no parameters).
        checkpointing: in training, keep only each level's inputs and recompute the rest in the backward
            pass (``torch.utils.checkpoint``): less memory at the label holder for about one more forward pass.
        full_res_channels: the width of the full-resolution level as the encoders send it (see
            ``ModalityEncoder``; default ``channels[0]``).

    ``forward(features, present=None)``: ``features`` is a list of K dicts ``{level: (B, sent_channels[level],
    *S_level)}`` -> logits (B, out_channels, *S). ``present`` (K booleans, at least one true) marks inputs
    that are missing (their dicts are ignored and may be empty): ``"mean"`` averages the present inputs;
    ``"concat"`` puts zeros in a missing input's place and scales the present ones by K / present, as
    inverted dropout does, so the fusing convolution sees inputs of the same expected size with or
    without absences. A model trained with modality dropout has learnt this exact input.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_inputs: int,
        channels: Sequence[int],
        strides: Sequence[int],
        out_channels: int = 3,
        levels: Sequence[int] | None = None,
        fusion: str = "concat",
        num_res_units: int = 1,
        norm: tuple | str = "instance",
        act: tuple | str = "prelu",
        dropout: float = 0.0,
        checkpointing: bool = False,
        full_res_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if num_inputs < 1:
            raise ValueError(f"num_inputs must be at least 1, got {num_inputs}")
        self.levels = _check_levels(channels, strides, levels)
        self.num_inputs = num_inputs
        self.fusion = fusion
        self.channels = tuple(channels)
        self.sent_channels = sent_widths(channels, self.levels, full_res_channels)
        # Width of each level after fusion: "concat" fuses back to the level's width, "mean" keeps the sent one.
        fused_channels = self.channels if fusion == "concat" else self.sent_channels
        self.fuse = nn.ModuleDict()
        if fusion == "concat":
            for level in self.levels:
                self.fuse[str(level)] = Convolution(
                    spatial_dims, num_inputs * self.sent_channels[level], channels[level], kernel_size=1,
                    norm=norm, act=act, dropout=dropout, bias=False,
                )
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in range(len(channels) - 2, -1, -1):
            self.up.append(
                Convolution(spatial_dims, channels[level + 1], channels[level], strides=strides[level],
                            kernel_size=3, norm=norm, act=act, dropout=dropout, is_transposed=True, bias=False)
            )
            block_in = channels[level] + (fused_channels[level] if level in self.levels else 0)
            self.blocks.append(_conv_block(spatial_dims, block_in, channels[level], 1, num_res_units, norm, act, dropout))
        self.head = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True)

    def fuse_level(self, level: int, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """(K tensors of (B, sent C_l, *S_l), None where an input is missing) -> (B, fused C_l, *S_l)."""
        if len(tensors) != self.num_inputs:
            raise ValueError(f"level {level}: expected features from {self.num_inputs} inputs, got {len(tensors)}")
        kept = [t for t in tensors if t is not None]
        if not kept:
            raise ValueError(f"level {level}: every input is missing")
        if self.fusion == "mean":
            return torch.stack(kept).mean(dim=0)
        if len(kept) < len(tensors):
            zeros, scale = torch.zeros_like(kept[0]), len(tensors) / len(kept)
            tensors = [zeros if t is None else t * scale for t in tensors]
        fuse = self.fuse[str(level)]
        return self._run(lambda *parts: fuse(torch.cat(parts, dim=1)), *tensors)

    def _run(self, function, *inputs: torch.Tensor) -> torch.Tensor:
        """``function(*inputs)``, checkpointed when asked to and a backward pass will follow."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(function, *inputs, use_reentrant=False)
        return function(*inputs)

    def forward(self, features: Sequence[dict[int, torch.Tensor]],
                present: Sequence[bool] | None = None) -> torch.Tensor:
        present = [True] * len(features) if present is None else list(present)
        if len(present) != len(features):
            raise ValueError(f"present has {len(present)} entries for {len(features)} inputs")
        fused = {level: self.fuse_level(level, [f[level] if p else None for f, p in zip(features, present)])
                 for level in self.levels}
        x = fused[len(self.channels) - 1]
        for up, block, level in zip(self.up, self.blocks, range(len(self.channels) - 2, -1, -1)):
            if level in fused:
                x = self._run(lambda low, skip, up=up, block=block: block(torch.cat([up(low), skip], dim=1)),
                              x, fused[level])
            else:
                x = self._run(lambda low, up=up, block=block: block(up(low)), x)
        return self.head(x)


class SplitUNet(nn.Module):
    """Encoders and decoder composed in one process: centralized training and the reference for tests.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels of each encoder, e.g. ``(1, 1, 1, 1)`` for late fusion of four
            modalities, ``(4,)`` for early fusion, ``(1,)`` for one modality.
        channels, strides, out_channels, levels, fusion, num_res_units, norm, act, dropout, full_res_channels,
            full_res_bits: as in ``ModalityEncoder`` and ``FusionDecoder``.

    ``forward(x, present=None)``: x of shape (B, sum(in_channels), *S), channels split among the encoders
    in order -> logits (B, out_channels, *S). ``present``: as in ``FusionDecoder``; a missing input's
    encoder does not run.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: Sequence[int],
        channels: Sequence[int],
        strides: Sequence[int],
        out_channels: int = 3,
        levels: Sequence[int] | None = None,
        fusion: str = "concat",
        num_res_units: int = 1,
        norm: tuple | str = "instance",
        act: tuple | str = "prelu",
        dropout: float = 0.0,
        full_res_channels: int | None = None,
        full_res_bits: int | None = None,
        encoders: Sequence[ModalityEncoder] | None = None,
        decoder: FusionDecoder | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        layer = dict(channels=channels, strides=strides, levels=levels, num_res_units=num_res_units,
                     norm=norm, act=act, dropout=dropout, full_res_channels=full_res_channels)
        self.encoders = nn.ModuleList(
            encoders if encoders is not None
            else [ModalityEncoder(spatial_dims, c, full_res_bits=full_res_bits, **layer) for c in self.in_channels]
        )
        self.decoder = decoder if decoder is not None else FusionDecoder(
            spatial_dims, len(self.in_channels), out_channels=out_channels, fusion=fusion, **layer
        )

    def forward(self, x: torch.Tensor, present: Sequence[bool] | None = None) -> torch.Tensor:
        inputs = torch.split(x, list(self.in_channels), dim=1)
        keep = [True] * len(inputs) if present is None else list(present)
        features = [encoder(part) if k else {} for encoder, part, k in zip(self.encoders, inputs, keep)]
        return self.decoder(features, present)


def _conv_block(spatial_dims: int, in_channels: int, out_channels: int, stride: int, num_res_units: int,
                norm, act, dropout: float) -> nn.Module:
    # No bias before a normalisation layer: it would be cancelled, and its near-zero gradient only feeds
    # noise into Adam's normalised update.
    if num_res_units > 0:
        return ResidualUnit(spatial_dims, in_channels, out_channels, strides=stride, subunits=num_res_units,
                            norm=norm, act=act, dropout=dropout, bias=False)
    return Convolution(spatial_dims, in_channels, out_channels, strides=stride, norm=norm, act=act, dropout=dropout,
                       bias=False)
