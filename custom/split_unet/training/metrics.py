"""Dice and HD95 per tumour region (WT, TC, ET) as BraTS reports them: global and lesion-wise, HD95 in mm."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import _get_neighbour_code_to_normals_table
from monai.transforms import RemoveSmallObjects
from scipy.ndimage import binary_dilation, correlate, distance_transform_edt, generate_binary_structure, label

from split_unet.data import REGION_NAMES, nest_regions
from split_unet.networks import SplitUNet

from .parties import present_inputs

#: HD95 (mm) when one side is empty (a missed region or lesion, or a false one): the BraTS 2023 value.
MISSING_HD95_MM = 374.0
#: BraTS 2023 GLI lesion-wise settings: ground-truth lesions dilated by 3 voxels (18-connected structure) to
#: match predicted components and to merge nearby lesions; lesions of at most 50 mm^3 are not scored.
LESION_DILATION = 3
LESION_MIN_MM3 = 50.0
_CONNECTED = generate_binary_structure(3, 3)  # 26-connectivity, as cc3d.connected_components(connectivity=26)
_DILATION = generate_binary_structure(3, 2)
# Bit of each voxel of a 2x2x2 neighbourhood in its code (MONAI's and DeepMind's encoding).
_NEIGHBOUR_CODE_KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])


def logits_to_masks(logits: torch.Tensor, threshold: float = 0.5,
                    min_component_voxels: int | Sequence[int] = 0) -> torch.Tensor:
    """(B, 3, *S) logits -> (B, 3, *S) float masks: each region its own sigmoid, then nested (ET in TC in WT).

    Args:
        min_component_voxels: post-processing: connected components (26-connected) smaller than this are
            removed from each region before nesting; one size, or one per region (WT, TC, ET); 0: none.
    """
    masks = (torch.sigmoid(logits) > threshold).float()
    sizes = [min_component_voxels] * 3 if isinstance(min_component_voxels, int) else list(min_component_voxels)
    if any(sizes):
        # One region at a time: MONAI hands a (C, *S) mask to scikit-image whole, which labels it as one 4D image,
        # so a region's component would count (and merge with) the other regions' voxels beside it.
        removers = [RemoveSmallObjects(size, connectivity=3) if size > 0 else None for size in sizes]
        with warnings.catch_warnings():
            # MONAI 1.6 hands its size to scikit-image 0.26 as ``min_size``, which warns that it is deprecated for
            # ``max_size``; the meaning (smaller than the size is removed) is unchanged in both versions.
            warnings.filterwarnings("ignore", message="Parameter `min_size` is deprecated", category=FutureWarning)
            masks = torch.stack([torch.cat([region[None] if remove is None else torch.as_tensor(remove(region[None]))
                                            for region, remove in zip(mask, removers)])
                                 for mask in masks.cpu()]).to(masks.device)
    return nest_regions(masks, axis=1)


def _surface_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Area (mm^2) of the surface through each of the 256 2x2x2 neighbourhood codes, in float64.

    MONAI's table of marching-cubes normals (multiples of 1/8, exact in float32) scaled by the voxel faces, as
    DeepMind's ``surface_distance`` computes it; MONAI's own area table is float32, whose rounding moves the
    95th percentile across ties of the cumulative area (measured: 8.37 instead of 8.31 mm on a 1 mm fixture).
    """
    normals = _get_neighbour_code_to_normals_table().numpy().astype(np.float64)  # (256, 4, 3)
    x, y, z = (float(s) for s in spacing)
    return np.linalg.norm(normals * np.array([y * z, x * z, x * y]), axis=-1).sum(axis=-1)


def _surfels(mask: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(border, area): the corners of ``mask``'s voxels (shape + 1 per axis) that its surface passes through, and
    the surface area there (mm^2)."""
    # One more voxel at the far end of each axis: scipy centres the 2x2x2 kernel on its second voxel, so the
    # correlation then has a code for every corner, from before the first voxel to after the last.
    codes = correlate(np.pad(mask.astype(np.uint8), ((0, 1),) * 3), _NEIGHBOUR_CODE_KERNEL, mode="constant", cval=0)
    return (codes != 0) & (codes != 255), table[codes]


def _robust_distance(distances: np.ndarray, areas: np.ndarray, percentile: float) -> float:
    """The distance below which ``percentile`` % of the surface area lies (the first to reach it)."""
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order]) / areas.sum()
    index = min(int(np.searchsorted(cumulative, percentile / 100.0)), len(order) - 1)
    return float(distances[order][index])


def _hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], percentile: float = 95.0) -> float:
    """HD95 in mm of two 3D masks as the BraTS 2023 evaluation computes it; ``MISSING_HD95_MM`` when one is empty,
    0 when both are.

    The BraTS 2023 code (``surface_distance.compute_robust_hausdorff`` of DeepMind's library) measures between
    surface elements on the voxel corners, each weighted by its area, and takes the larger of the two directed
    area-weighted percentiles. MONAI's ``compute_hausdorff_distance`` takes an unweighted percentile over the
    voxels of a binary-erosion edge: 0.5 mm more on good segmentations and up to 10 mm more on speckled ones,
    hence written here on MONAI's surface table and scipy's exact Euclidean distance transform.
    """
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return MISSING_HD95_MM
    union = pred | truth
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(union))
    table = _surface_area_table(spacing)
    (pred_border, pred_area), (truth_border, truth_area) = _surfels(pred[box], table), _surfels(truth[box], table)
    to_truth = distance_transform_edt(~truth_border, sampling=spacing)[pred_border]
    to_pred = distance_transform_edt(~pred_border, sampling=spacing)[truth_border]
    return max(_robust_distance(to_pred, truth_area[truth_border], percentile),
               _robust_distance(to_truth, pred_area[pred_border], percentile))


def lesion_wise(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                dilation: int = LESION_DILATION, min_volume_mm3: float = LESION_MIN_MM3,
                with_hd95: bool = True) -> dict:
    """BraTS 2023 lesion-wise Dice and HD95 of one region of one case.

    Follows ``get_lesion_wise_score`` / ``get_lesion_wise_results`` of the official BraTS 2023 metrics
    (github.com/rachitsaluja/BraTS-2023-Metrics, ``brats_metrics.py``) with scipy in place of cc3d: 26-connected
    components; ground-truth lesions are the truth inside each component of the truth dilated ``dilation`` times
    (so lesions that close count as one); a predicted component matches a lesion when it touches the lesion
    dilated likewise; each lesion scores the Dice and HD95 of its matched components (0 and 374 mm if none);
    every unmatched predicted component is a false lesion scored 0 / 374 mm; lesions of at most
    ``min_volume_mm3`` are left out (their matches are not false lesions). No lesion and no false one: 1 / 0.
    No library offers this (MONAI, panoptica's matching differs), hence written here.

    Returns:
        ``{"dice", "hd95", "tp", "fn", "fp"}``: the scores and the counts of scored lesions found and missed and
        of false lesions (``with_hd95`` False: "hd95" is None, its surface distances are not computed).
    """
    pred_cc, n_pred = label(pred, _CONNECTED)
    merged, n_lesions = label(binary_dilation(truth, _DILATION, iterations=dilation), _CONNECTED)
    merged[~truth] = 0
    voxel_mm3 = float(np.prod(spacing))
    dice, hd95, matched, found, missed = [], [], set(), 0, 0
    for lesion_id in range(1, n_lesions + 1):
        lesion = merged == lesion_id
        hits = np.unique(pred_cc[binary_dilation(lesion, _DILATION, iterations=dilation)])
        hits = hits[hits != 0]
        matched.update(hits.tolist())
        if lesion.sum() * voxel_mm3 <= min_volume_mm3:
            continue
        prediction = np.isin(pred_cc, hits)
        dice.append(2.0 * np.logical_and(prediction, lesion).sum() / (prediction.sum() + lesion.sum()))
        if with_hd95:
            hd95.append(_hd95(prediction, lesion, spacing))
        found, missed = found + (len(hits) > 0), missed + (len(hits) == 0)
    false = n_pred - len(matched)
    scored = len(dice) + false
    return {"dice": float(sum(dice) / scored) if scored else 1.0,
            "hd95": (float((sum(hd95) + false * MISSING_HD95_MM) / scored) if scored else 0.0) if with_hd95 else None,
            "tp": found, "fn": missed, "fp": false}


class RegionMetrics:
    """Accumulates per-region Dice and HD95 over batches, global and lesion-wise; ``aggregate()`` sums up.

    Global Dice: MONAI ``compute_dice(include_background=True)``; a region empty in both prediction and truth
    counts as 1. Global HD95: the BraTS 2023 evaluation's area-weighted surface HD95 (``_hd95``) in mm (each
    case's voxel size); as there, a miss or a false alarm scores 374 mm and empty-vs-empty 0. Lesion-wise: :func:`lesion_wise`.
    ``with_hd95`` False leaves both HD95s out (their surface distances cost most of the scoring at 1 mm).
    """

    def __init__(self, with_hd95: bool = True) -> None:
        self._cases: list[dict] = []
        self.with_hd95 = with_hd95

    def update(self, masks: torch.Tensor, target: torch.Tensor,
               spacing: Sequence[Sequence[float]] | None = None) -> list[dict]:
        """masks, target: (B, 3, *S) binary; spacing: per case, the grid's voxel size in mm (default 1 mm).

        Returns:
            Per case ``{"dice", "hd95", "lesion_dice", "lesion_hd95", "lesions"}``, each keyed by region.
        """
        masks, target = masks.detach().float().cpu(), target.detach().float().cpu()
        dice = compute_dice(masks, target, include_background=True, ignore_empty=False)
        cases = []
        for index, (pred, truth) in enumerate(zip(masks.numpy().astype(bool), target.numpy().astype(bool))):
            voxel = tuple(spacing[index]) if spacing is not None else (1.0, 1.0, 1.0)
            lesions = {name: lesion_wise(p, t, voxel, with_hd95=self.with_hd95)
                       for name, p, t in zip(REGION_NAMES, pred, truth)}
            region_dice = {name: float(d) for name, d in zip(REGION_NAMES, dice[index])}
            case = {
                "dice": {**region_dice, "mean": float(np.mean(list(region_dice.values())))},
                "lesion_dice": {name: lesions[name]["dice"] for name in REGION_NAMES},
                "lesions": {name: {k: lesions[name][k] for k in ("tp", "fn", "fp")} for name in REGION_NAMES},
            }
            if self.with_hd95:
                case["hd95"] = {name: _hd95(p, t, voxel) for name, p, t in zip(REGION_NAMES, pred, truth)}
                case["lesion_hd95"] = {name: lesions[name]["hd95"] for name in REGION_NAMES}
            cases.append(case)
        self._cases.extend(cases)
        return cases

    def aggregate(self) -> dict:
        """Means over cases: {"dice", "lesion_dice": {WT, TC, ET, mean}, "hd95", "lesion_hd95" (mm): {WT, TC, ET},
        "lesions": {region: summed tp/fn/fp}, "cases": n}."""
        result: dict = {"cases": len(self._cases)}
        keys = ("dice", "hd95", "lesion_dice", "lesion_hd95") if self.with_hd95 else ("dice", "lesion_dice")
        for key in keys:
            result[key] = {name: float(np.mean([case[key][name] for case in self._cases])) for name in REGION_NAMES}
        for key in ("dice", "lesion_dice"):
            result[key]["mean"] = float(np.mean([result[key][name] for name in REGION_NAMES]))
        result["lesions"] = {name: {k: int(sum(case["lesions"][name][k] for case in self._cases))
                                    for k in ("tp", "fn", "fp")} for name in REGION_NAMES}
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
