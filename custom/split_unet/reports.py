"""Results as JSON a script can read, tables and figures a person can read."""

from __future__ import annotations

import numpy as np
from monai.transforms import ScaleIntensityRangePercentiles

from split_unet.data import REGION_NAMES


def make_summary(metrics: dict | None, *, epochs: int, steps: int, wall_seconds: float, config: dict,
                 **extra) -> dict:
    """The ``summary.json`` layout shared by split learning and centralized training."""
    if metrics is None:
        raise ValueError("no validation metrics: the run ended before its first validation")
    return {"dice": metrics["dice"], "hd95": metrics["hd95"], "hd95_unit": "mm",
            "lesion_dice": metrics["lesion_dice"], "lesion_hd95": metrics["lesion_hd95"], "lesions": metrics["lesions"],
            "validation_cases": metrics["cases"], "epochs": epochs, "steps": steps,
            "wall_seconds": round(wall_seconds, 2), "config": config, **extra}


def dice_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per run name -> summary (Dice and HD95 per region, global and, where the summary
    has them, lesion-wise as BraTS 2023 ranks them, with the false lesions found; wall time)."""
    lesion_columns = any("lesion_dice" in summary for summary in rows.values())
    columns = [f"Dice {r}" for r in REGION_NAMES] + ["mean Dice"] + [f"HD95 {r} (mm)" for r in REGION_NAMES]
    if lesion_columns:
        columns += [f"lesion Dice {r}" for r in REGION_NAMES] + [f"lesion HD95 {r}" for r in REGION_NAMES]
        columns += ["false lesions WT"]
    lines = ["| run | " + " | ".join(columns) + " | minutes |", "|" + "---|" * (len(columns) + 2)]
    for name, summary in rows.items():
        dice, hd = summary["dice"], summary["hd95"]
        cells = [f"{dice[r]:.3f}" for r in REGION_NAMES] + [f"{dice['mean']:.3f}"]
        cells += [f"{hd[r]:.1f}" for r in REGION_NAMES]
        if lesion_columns and "lesion_dice" in summary:
            cells += [f"{summary['lesion_dice'][r]:.3f}" for r in REGION_NAMES]
            cells += [f"{summary['lesion_hd95'][r]:.1f}" for r in REGION_NAMES] + [str(summary["lesions"]["WT"]["fp"])]
        elif lesion_columns:
            cells += ["-"] * (2 * len(REGION_NAMES) + 1)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary['wall_seconds'] / 60:.1f} |")
    return "\n".join(lines)


LEAKAGE_METRICS = {"whitebox": "ssim", "unsplit": "ssim", "learned": "ssim", "surrogate": "ssim", "labels": "dice_wt"}


def leakage_table(runs: dict[str, dict]) -> str:
    """Markdown table of ``leakage.json`` documents, one per run name (e.g. the levels a run sent).

    One row per run and attack; one column per site with every recorded step in order: SSIM for the image
    reconstructions (its excess over the population prior, the atlas of unseen patients, in brackets where the
    study measured it), Dice against WT for the label attack (random mask of the same size in brackets).
    """
    sites = sorted({site for doc in runs.values() for attack in doc.get("attacks", {}).values() for site in attack})
    lines = ["| run | attack | metric | " + " | ".join(sites) + " |", "|" + "---|" * (len(sites) + 3)]
    for name, doc in runs.items():
        for attack, per_site in doc.get("attacks", {}).items():
            metric = LEAKAGE_METRICS[attack]
            cells = []
            for site in sites:
                entries = [per_site[site][step] for step in sorted(per_site.get(site, {}), key=int)]
                values = [f"{e[metric]:.2f}" + (f" ({e['random_' + metric]:.2f})" if attack == "labels" else
                                                f" ({e['excess_' + metric]:+.2f})" if "excess_" + metric in e else "")
                          for e in entries]
                cells.append(" -> ".join(values) or "-")
            lines.append(f"| {name} | {attack} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Overlay colours (RGB); a voxel takes the colour of the innermost region that holds it (ET in TC in WT).
REGION_COLOURS = {"WT": (0, 200, 0), "TC": (230, 40, 40), "ET": (255, 220, 0)}
OVERLAY_ALPHA = 0.5  # over an image; without one the colours are opaque


def overlay_figure(truth: np.ndarray, prediction: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """Two panels side by side, truth | prediction, of one slice: region masks in colour over the image in grey.

    Args:
        truth, prediction: region masks ``(3, H, W)`` in ``REGION_NAMES`` order (bool or 0/1), e.g. the middle
            axial slice ``masks[:, :, :, masks.shape[-1] // 2]`` of a ``(3, X, Y, Z)`` volume.
        image: the slice ``(H, W)`` under the masks, scaled by its 1st and 99th percentiles; None (the server,
            which holds no image): black, and opaque colours.
    Returns:
        ``(H, 2 W + 1, 3)`` uint8 RGB, a grey column between the panels; rows follow the first array axis.

    By hand because MONAI's ``blend_images`` takes its colours from matplotlib, which a site or server install
    does not have; the image's scaling is MONAI's.
    """
    truth, prediction = np.asarray(truth, dtype=bool), np.asarray(prediction, dtype=bool)
    if truth.shape != prediction.shape or truth.ndim != 3 or truth.shape[0] != len(REGION_NAMES):
        raise ValueError(f"truth and prediction must be ({len(REGION_NAMES)}, H, W) region masks, got "
                         f"{truth.shape} and {prediction.shape}")
    alpha = OVERLAY_ALPHA
    if image is None:
        grey, alpha = np.zeros(truth.shape[1:]), 1.0
    elif np.shape(image) != truth.shape[1:]:
        raise ValueError(f"image {np.shape(image)} and masks {truth.shape[1:]} differ in size")
    else:
        grey = np.asarray(ScaleIntensityRangePercentiles(1, 99, 0.0, 1.0, clip=True)(np.asarray(image)[None]))[0]
    panels = []
    for masks in (truth, prediction):
        panel = np.repeat(grey[..., None] * 255.0, 3, axis=-1)
        colour = np.zeros_like(panel)
        for name, mask in zip(REGION_NAMES, masks):
            colour[mask] = REGION_COLOURS[name]
        inside = masks.any(axis=0)
        panel[inside] = (1 - alpha) * panel[inside] + alpha * colour[inside]
        panels.append(panel)
    separator = np.full((truth.shape[1], 1, 3), 128.0)
    return np.concatenate([panels[0], separator, panels[1]], axis=1).round().astype(np.uint8)
