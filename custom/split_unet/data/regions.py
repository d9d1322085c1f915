"""Modality names and the nested tumour regions (WT, TC, ET) of MSD Task01 and BraTS labels."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["MODALITIES", "REGION_NAMES", "CONVENTIONS", "regions", "label_from_regions"]

#: MSD Task01 channel order; the modalities are also the names of the sites that hold them.
MODALITIES: tuple[str, ...] = ("flair", "t1w", "t1gd", "t2w")

#: Region channels, outermost first: whole tumour, tumour core, enhancing tumour.
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET")

#: Label value of (oedema, non-enhancing core, enhancing tumour) per label convention.
#: msd: 1 oedema, 2 non-enhancing tumour, 3 enhancing; brats (2017-2021): 1 NCR, 2 ED, 4 ET.
CONVENTIONS: dict[str, tuple[int, int, int]] = {"msd": (1, 2, 3), "brats": (2, 1, 4)}

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
        convention: ``"msd"`` (1 oedema, 2 non-enhancing, 3 enhancing) or ``"brats"`` (1 NCR, 2 ED, 4 ET).

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


def label_from_regions(masks: ArrayT, convention: str = "msd") -> ArrayT:
    """Inverse of :func:`regions`: paint WT, then TC, then ET, so inner regions win.

    Args:
        masks: region masks of shape ``(3, *S)`` in ``REGION_NAMES`` order (bool, or 0/1 values).
        convention: ``"msd"`` or ``"brats"``.

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
    for mask, value in zip(masks != 0, values):
        label[mask] = value
    return label
