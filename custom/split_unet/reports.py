"""Results as JSON a script can read and tables a person can read."""

from __future__ import annotations

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


LEAKAGE_METRICS = {"whitebox": "ssim", "unsplit": "ssim", "learned": "ssim", "labels": "dice_wt"}


def leakage_table(runs: dict[str, dict]) -> str:
    """Markdown table of ``leakage.json`` documents, one per run name (e.g. the levels a run sent).

    One row per run and attack; one column per site with ``first -> last`` recorded step: SSIM for the
    image reconstructions, Dice against WT for the label attack (random mask of the same size in brackets).
    """
    sites = sorted({site for doc in runs.values() for attack in doc.get("attacks", {}).values() for site in attack})
    lines = ["| run | attack | metric | " + " | ".join(sites) + " |", "|" + "---|" * (len(sites) + 3)]
    for name, doc in runs.items():
        for attack, per_site in doc.get("attacks", {}).items():
            metric = LEAKAGE_METRICS[attack]
            cells = []
            for site in sites:
                entries = [per_site[site][step] for step in sorted(per_site.get(site, {}), key=int)]
                values = [f"{e[metric]:.2f}" + (f" ({e['random_' + metric]:.2f})" if attack == "labels" else "")
                          for e in entries]
                cells.append(" -> ".join(values) or "-")
            lines.append(f"| {name} | {attack} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
