"""Dice and HD95 per tumour region (WT, TC, ET) with MONAI's metrics."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance

from split_unet.data import REGION_NAMES
from split_unet.networks import SplitUNet

from .parties import present_inputs


def logits_to_masks(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, 3, *S) logits -> (B, 3, *S) float masks, each region its own sigmoid."""
    return (torch.sigmoid(logits) > threshold).float()


class RegionMetrics:
    """Accumulates Dice and HD95 per region over batches; ``aggregate()`` gives the summary dicts.

    Dice: MONAI ``DiceMetric(include_background=True)``; a region empty in both prediction and truth
    counts as 1. HD95: MONAI ``compute_hausdorff_distance(percentile=95, include_background=True)``
    in voxels; MONAI returns NaN when one side is empty, which would silently drop the worst cases from
    the mean, so (as in the BraTS evaluation) a miss or a false alarm scores the volume's diagonal and
    empty-vs-empty scores 0.
    """

    def __init__(self) -> None:
        self._dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        self._hd95: list[torch.Tensor] = []

    def update(self, masks: torch.Tensor, target: torch.Tensor) -> None:
        """masks, target: (B, 3, *S) binary."""
        masks, target = masks.detach().float().cpu(), target.detach().float().cpu()
        self._dice(masks, target)
        with warnings.catch_warnings():  # MONAI warns on empty masks; they are scored explicitly below
            warnings.simplefilter("ignore", UserWarning)
            hd = compute_hausdorff_distance(masks, target, include_background=True, percentile=95)
        pred_empty = masks.flatten(2).sum(-1) == 0
        true_empty = target.flatten(2).sum(-1) == 0
        diagonal = math.sqrt(sum(s * s for s in masks.shape[2:]))
        hd = torch.where(pred_empty & true_empty, torch.zeros_like(hd), hd)
        hd = torch.where(pred_empty ^ true_empty, torch.full_like(hd, diagonal), hd)
        self._hd95.append(hd)

    def aggregate(self) -> dict:
        """{"dice": {"WT","TC","ET","mean"}, "hd95": {"WT","TC","ET"}, "cases": n}."""
        dice = self._dice.get_buffer().mean(dim=0)
        hd95 = torch.cat(self._hd95).mean(dim=0)
        result = {
            "dice": {name: float(v) for name, v in zip(REGION_NAMES, dice)},
            "hd95": {name: float(v) for name, v in zip(REGION_NAMES, hd95)},
            "cases": int(self._dice.get_buffer().shape[0]),
        }
        result["dice"]["mean"] = float(dice.mean())
        return result


@torch.no_grad()
def dice_without_each_input(model: SplitUNet, images: torch.Tensor, target: torch.Tensor, names: Sequence[str],
                            batch_size: int = 2) -> dict[str, dict[str, float]]:
    """Dice per region with every input (key ``"none"``) and with each single input missing (key: its name).

    images: (N, sum(in_channels), *S); target: (N, 3, *S) region masks; names: one per encoder (modality).
    """
    if len(names) != len(model.encoders):
        raise ValueError(f"{len(names)} names for {len(model.encoders)} inputs")
    model.eval()
    cases = {"none": None, **{name: present_inputs(k, len(names)) for k, name in enumerate(names)}}
    results = {}
    for name, present in cases.items():
        metrics = RegionMetrics()
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size], present)
            metrics.update(logits_to_masks(logits), target[start:start + batch_size])
        results[name] = metrics.aggregate()["dice"]
    return results
