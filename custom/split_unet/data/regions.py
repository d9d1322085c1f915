"""Modality names and the nested tumour regions (WT, TC, ET) of MSD Task01, BraTS 2021 and BraTS 2023+ labels."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["MODALITIES", "REGION_NAMES", "CONVENTIONS", "regions", "nest_regions", "label_from_regions"]

#: MSD Task01 channel order; the modalities are also the names of the sites that hold them.
MODALITIES: tuple[str, ...] = ("flair", "t1w", "t1gd", "t2w")

#: Region channels, outermost first: whole tumour, tumour core, enhancing tumour.
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")

#: Label value of (oedema, non-enhancing core, enhancing tumour) per label convention.
#: msd: 1 oedema, 2 non-enhancing tumour, 3 enhancing; brats (2017-2021): 1 NCR, 2 ED, 4 ET;
#: brats2023 (2023+): 1 NETC, 2 SNFH (oedema), 3 ET.
CONVENTIONS: dict[str, tuple[int, int, int]] = {"msd": (1, 2, 3), "brats": (2, 1, 4), "brats2023": (2, 1, 3)}

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _label_values(convention: str) -> tuple[int, int, int]:
    try:
        return CONVENTIONS[convention]
    except KeyError:
        raise ValueError(f"unknown label convention {convention!r}; expected one of {sorted(CONVENTIONS)}") from None


def regions(label: ArrayT, convention: str = "msd") -> ArrayT:
    """Nested region masks of a label map.

    Args:
        label: integer label map, any shape ``S`` (numpy array or torch tensor).
        convention: a key of ``CONVENTIONS``: ``"msd"`` (1 oedema, 2 non-enhancing, 3 enhancing), ``"brats"``
            (2021: 1 NCR, 2 ED, 4 ET) or ``"brats2023"`` (1 NETC, 2 SNFH, 3 ET).

    Returns:
        Boolean masks of shape ``(3, *S)`` in ``REGION_NAMES`` order (WT = any tumour label,
        TC = core labels, ET = enhancing label), the same kind (numpy/torch) as ``label``.

    Raises:
        ValueError: unknown convention.
    """
    _, core, enhancing = _label_values(convention)
    et = label == enhancing
    tc = (label == core) | et
    wt = label > 0
    stack = torch.stack if isinstance(label, torch.Tensor) else np.stack
    return stack([wt, tc, et])


def nest_regions(masks: ArrayT, axis: int = 0) -> ArrayT:
    """Region masks made nested as the regions are by definition: ET inside TC inside WT.

    Each region is thresholded on its own (one sigmoid per region), so a voxel can be ET without being WT. BraTS
    post-processing keeps ET only inside TC and TC only inside WT; the label map written and the masks scored
    are then the same thing (``regions(label_from_regions(m)) == nest_regions(m)``).

    Args:
        masks: region masks in ``REGION_NAMES`` order (bool or 0/1) along ``axis``: 0 for ``(3, *S)``, 1 for a
            batch ``(B, 3, *S)``.
        axis: the region axis.

    Returns:
        Masks of the same shape, kind and dtype.
    """
    wt, tc, et = masks.unbind(axis) if isinstance(masks, torch.Tensor) else np.moveaxis(masks, axis, 0)
    tc = tc * wt
    stack = torch.stack if isinstance(masks, torch.Tensor) else np.stack
    return stack([wt, tc, et * tc], axis)


def label_from_regions(masks: ArrayT, convention: str = "msd") -> ArrayT:
    """Inverse of :func:`regions` on nested masks: the label map of :func:`nest_regions` of ``masks``.

    Args:
        masks: region masks of shape ``(3, *S)`` in ``REGION_NAMES`` order (bool, or 0/1 values).
        convention: a key of ``CONVENTIONS``.

    Returns:
        ``uint8`` label map of shape ``S``, the same kind (numpy/torch) as ``masks``.

    Raises:
        ValueError: unknown convention or a first axis other than 3.
    """
    values = _label_values(convention)
    if masks.shape[0] != len(REGION_NAMES):
        raise ValueError(f"expected {len(REGION_NAMES)} region channels on the first axis, "
                         f"got shape {tuple(masks.shape)}")
    if isinstance(masks, torch.Tensor):
        label = torch.zeros(masks.shape[1:], dtype=torch.uint8, device=masks.device)
    else:
        label = np.zeros(masks.shape[1:], dtype=np.uint8)
    for mask, value in zip(nest_regions(masks != 0), values):  # WT, then TC, then ET: inner regions win
        label[mask] = value
    return label
