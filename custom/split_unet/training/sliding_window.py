"""Sliding-window inference where the party that blends (the server) holds no image.

MONAI's ``sliding_window_inference`` chooses the windows, their Gaussian weights and the blending; it runs here on
a placeholder of the grid's shape that holds no data (a zero-stride view of one zero; MONAI copies only a batch of
windows out of it, and pads it, at the grid's size, only where the grid is smaller than a window) and, with
``with_coord=True``, hands each batch of windows' coordinates to a predictor that asks the sites for those windows. The sites cut them
with ``patches.cut_patch``, whose zeros outside the grid equal MONAI's constant-0 padding, so the result equals
MONAI's on the images themselves.

A window with no image at any party (every modality 0 throughout: outside the head, or beyond the grid) is answered
as background (``EMPTY_WINDOW_LOGIT``) without running the network: a network of bias-free convolutions and
instance norm gives such a window the same logit at every voxel, an answer no training patch ever supervised (a
label-sampled 1 mm model put it within 0.01 of the threshold and marked empty space as whole tumour). nnU-Net
likewise predicts only inside the nonzero region and fills the rest with background.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from .patches import Corner


#: ``flip_averaged_logits`` keeps its probabilities within [PROBABILITY_EPS, 1 - PROBABILITY_EPS].
PROBABILITY_EPS = 1e-6
#: The background logit of an empty window: the most certain background ``flip_averaged_logits`` can express.
EMPTY_WINDOW_LOGIT = math.log(PROBABILITY_EPS / (1 - PROBABILITY_EPS))


def empty_window_flags(windows: np.ndarray) -> list[bool]:
    """(N, C, *roi) windows -> for each, whether it holds no image: 0 in every channel throughout."""
    return [not window.any() for window in windows]


def logits_of_windows(empty: Sequence[bool], predict: Callable[[list[int]], torch.Tensor], out_channels: int,
                      roi: Sequence[int]) -> torch.Tensor:
    """Logits (len(empty), out_channels, *roi) of a batch of windows: ``predict(indices)`` answers the windows not
    ``empty`` (in that order), the empty ones are background (``EMPTY_WINDOW_LOGIT``)."""
    keep = [i for i, is_empty in enumerate(empty) if not is_empty]
    if len(keep) == len(empty):
        return predict(keep)
    if not keep:
        return torch.full((len(empty), out_channels, *roi), EMPTY_WINDOW_LOGIT)
    answered = predict(keep)
    logits = torch.full((len(empty), *answered.shape[1:]), EMPTY_WINDOW_LOGIT, dtype=answered.dtype,
                        device=answered.device)
    logits[keep] = answered
    return logits


def _pad_before(grid_shape: Sequence[int], roi: Sequence[int]) -> list[int]:
    """The padding MONAI puts before each axis when the grid is smaller than the window (half, rounded down)."""
    return [max(r - g, 0) // 2 for g, r in zip(grid_shape, roi)]


def sliding_window_logits(grid_shape: tuple[int, int, int], roi: tuple[int, int, int],
                          predict: Callable[..., torch.Tensor], sw_batch_size: int, overlap: float,
                          batch: int = 1, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Blended logits (batch, out_channels, *grid_shape) of MONAI's Gaussian sliding window over the grid.

    ``predict(corners)`` receives the windows of one MONAI batch (at most ``sw_batch_size``) as corners in the
    grid's frame (negative, or reaching beyond the grid, where the grid is smaller than ``roi``) and returns their
    logits (len(corners), out_channels, *roi). With ``batch`` > 1 patients MONAI's batches may mix patients:
    ``predict(corners, rows=rows)`` is then called, ``rows[i]`` being the patient of window i.

    ``device``: where the blending runs and the result lies (the logits are moved there as float32).
    """
    pad_before = _pad_before(grid_shape, roi)
    placeholder = torch.zeros((), device=device).expand(batch, 1, *grid_shape)

    def windows(_: torch.Tensor, window_slices: list[list[slice]]) -> torch.Tensor:
        # window_slices[i]: [patient slice, channel slice, *spatial slices in the padded frame]
        corners: list[Corner] = [tuple(s.start - p for s, p in zip(slices[2:], pad_before)) for slices in window_slices]
        if batch == 1:
            logits = predict(corners)
        else:
            logits = predict(corners, rows=[slices[0].start for slices in window_slices])
        return logits.to(device=device, dtype=torch.float32)

    return sliding_window_inference(placeholder, roi, sw_batch_size, windows, overlap, mode="gaussian",
                                    with_coord=True)


#: The spatial flips of test-time augmentation (axes of a (B, C, X, Y, Z) tensor): none, each axis, all three.
FLIPS = ((), (2,), (3,), (4,), (2, 3, 4))


def flip_averaged_logits(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                         flips: Sequence[Sequence[int]] = FLIPS) -> torch.Tensor:
    """Test-time augmentation by mirroring, as nnU-Net's: ``predict`` on each flip of ``images`` (B, C, *S), each
    result flipped back, the sigmoid probabilities averaged; returned as logits (``logits_to_masks`` reads them).

    The flips are deterministic, so no MONAI ``TestTimeAugmentation`` (random transforms, for uncertainty) is
    needed. Each flip costs one more full prediction (sliding window included)."""
    if not flips:
        raise ValueError("at least one flip (the identity is ())")
    total = None
    for axes in flips:
        axes = list(axes)
        flipped = torch.flip(images, axes) if axes else images
        logits = predict(flipped).float()
        probabilities = torch.sigmoid(torch.flip(logits, axes) if axes else logits)
        total = probabilities if total is None else total + probabilities
    return torch.logit(total / len(flips), eps=PROBABILITY_EPS)
