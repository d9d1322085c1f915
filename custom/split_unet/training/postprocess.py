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
from monai.metrics import compute_dice

from .metrics import REGION_NAMES, lesion_wise, logits_to_masks

#: Sizes (grid voxels) tried by default: none, then from a few mm^3 at 1 mm to a small lesion at 2-4 mm, and 8 ml at
#: 1 mm (a 1 mm model trained on patches leaves specks of a few ml; real whole tumours are tens of ml).
MIN_COMPONENT_CANDIDATES = (0, 8, 32, 128, 512, 2048, 8192)


def choose_min_component_voxels(logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                                spacings: Sequence[Sequence[float]],
                                candidates: Sequence[int] = MIN_COMPONENT_CANDIDATES,
                                ) -> tuple[tuple[int, int, int], dict[str, dict[int, float]]]:
    """The size per region (WT, TC, ET) whose post-processed masks score best on these (training) patients, and
    every candidate's score per region.

    Args:
        logits: per patient ``(1, 3, *S)`` logits on the grid.
        targets: per patient ``(1, 3, *S)`` region masks on the grid.
        spacings: per patient the grid's voxel size (mm).
        candidates: sizes in grid voxels.

    One size per region, as nnU-Net chooses its post-processing per class: a size that clears a whole-tumour
    speck also removes a true enhancing rim of that size. The regions are chosen in turn, WT, TC, then ET, each with
    the earlier ones at their chosen size (the masks nest: a WT component removed takes the TC and ET inside it).
    A region's score is the mean of its global and lesion-wise Dice (the BraTS ranking uses the lesion-wise one,
    which false lesions pull down; the global one guards against removing true tumour), as ``RegionMetrics`` scores
    it; only the region being chosen is scored (its mask depends on its own size and the earlier regions' only).
    Ties go to the smaller size (the least that is removed).
    """
    if not (len(logits) == len(targets) == len(spacings)) or not logits:
        raise ValueError("one logits, target and spacing per patient, at least one patient")
    chosen, scores = [0, 0, 0], {}
    for index, region in enumerate(REGION_NAMES):
        scores[region] = {}
        for size in sorted(set(int(c) for c in candidates)):
            sizes = [*chosen[:index], size, *chosen[index + 1:]]
            dice, lesion = [], []
            for patient_logits, target, spacing in zip(logits, targets, spacings):
                pred = logits_to_masks(patient_logits, min_component_voxels=sizes)[:, index:index + 1].cpu()
                truth = target[:, index:index + 1].float().cpu()
                dice.extend(compute_dice(pred, truth, include_background=True, ignore_empty=False)[:, 0].tolist())
                lesion.extend(lesion_wise(p[0], t[0], spacing, with_hd95=False)["dice"]
                              for p, t in zip(pred.numpy().astype(bool), truth.numpy().astype(bool)))
            scores[region][size] = float(np.mean([np.mean(dice), np.mean(lesion)]))
        best = max(scores[region].values())
        chosen[index] = min(size for size, score in scores[region].items() if score == best)
    return tuple(chosen), scores
