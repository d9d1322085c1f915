"""Post-processing chosen on training patients: the smallest connected component a segmentation keeps.

Patch-trained networks see little background context and leave specks far from the tumour; BraTS's lesion-wise
scores count each as a false lesion. ``logits_to_masks(min_component_voxels=...)`` removes them with MONAI's
``RemoveSmallObjects``; the size is a hyperparameter and is chosen here on training patients only, never on the
patients it is scored on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .metrics import RegionMetrics, logits_to_masks

#: Sizes (grid voxels) tried by default: none, then from a few mm^3 at 1 mm to a small lesion at 2-4 mm, and 8 ml at
#: 1 mm (a 1 mm model trained on patches leaves specks of a few ml; real whole tumours are tens of ml).
MIN_COMPONENT_CANDIDATES = (0, 8, 32, 128, 512, 2048, 8192)


def choose_min_component_voxels(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                                spacings: Sequence[Sequence[float]],
                                candidates: Sequence[int] = MIN_COMPONENT_CANDIDATES) -> tuple[int, dict[int, float]]:
    """The candidate size whose post-processed masks score best on these (training) patients, and every
    candidate's score.

    Args:
        logits: per patient ``(1, 3, *S)`` logits on the grid.
        targets: per patient ``(1, 3, *S)`` region masks on the grid.
        spacings: per patient the grid's voxel size (mm).
        candidates: sizes in grid voxels.

    The score is the mean of global and lesion-wise Dice over the three regions (the BraTS ranking uses the
    lesion-wise one, which false lesions pull down; the global one guards against removing true tumour). Ties go
    to the smaller size (the least that is removed).
    """
    if not (len(logits) == len(targets) == len(spacings)) or not logits:
        raise ValueError("one logits, target and spacing per patient, at least one patient")
    scores = {}
    for size in sorted(set(int(c) for c in candidates)):
        metrics = RegionMetrics(with_hd95=False)
        for patient_logits, target, spacing in zip(logits, targets, spacings):
            metrics.update(logits_to_masks(patient_logits, min_component_voxels=size), target, [spacing])
        aggregate = metrics.aggregate()
        scores[size] = float(np.mean([aggregate["dice"]["mean"], aggregate["lesion_dice"]["mean"]]))
    best = max(scores.values())
    return min(size for size, score in scores.items() if score == best), scores
