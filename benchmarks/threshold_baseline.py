"""Best single-channel threshold Dice on the phantom: how far a trivial rule gets, per region.

Generates the phantom (MSD layout, timed), loads it as training does (:func:`split_unet.data.load_case`:
RAS, crop/pad, z-score over the brain), then for each region and modality searches one global threshold,
both directions (``x > t`` and ``x < t``, inside the brain), maximising the mean per-patient Dice.

    python benchmarks/threshold_baseline.py --patients 64 --size 64 --seed 0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from split_unet.data import MODALITIES, REGION_NAMES, anatomy, find_cases, generate_dataset, load_case

THRESHOLDS = np.linspace(-4.0, 6.0, 401)


def threshold_dice(values: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of ``values > t`` and ``values < t`` against ``truth`` for every t in THRESHOLDS.

    Args:
        values: (N,) intensities of the brain voxels of one patient and modality.
        truth: (N,) bool region mask of the same voxels.

    Returns:
        (2, T): Dice for "above" and "below"; 1 where prediction and truth are both empty (BraTS convention).
    """
    every, positive = np.sort(values), np.sort(values[truth])
    n_truth = truth.sum()
    above_pred = len(every) - np.searchsorted(every, THRESHOLDS, side="right")
    above_tp = len(positive) - np.searchsorted(positive, THRESHOLDS, side="right")
    below_pred = np.searchsorted(every, THRESHOLDS, side="left")
    below_tp = np.searchsorted(positive, THRESHOLDS, side="left")
    pred, tp = np.stack([above_pred, below_pred]), np.stack([above_tp, below_tp])
    denominator = pred + n_truth
    return np.where(denominator > 0, 2.0 * tp / np.maximum(denominator, 1), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="where to write the phantom (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "phantom"
        start = time.perf_counter()
        anatomy(args.size)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        generate_dataset(data_dir, args.patients, args.size, args.seed, progress=False)
        elapsed = time.perf_counter() - start
        print(f"phantom {args.patients} x {args.size}^3, seed {args.seed}: anatomy {setup:.1f} s (cached after), "
              f"{elapsed:.1f} s = {elapsed / args.patients:.3f} s/patient (generate + write NIfTI)")

        dice = np.zeros((len(REGION_NAMES), len(MODALITIES), 2, len(THRESHOLDS)))
        cases = find_cases(data_dir)
        for case in cases:
            loaded = load_case(case, args.size)
            brain = (loaded["image"] != 0).any(0)
            for r in range(len(REGION_NAMES)):
                truth = loaded["label"][r][brain] > 0
                for m in range(len(MODALITIES)):
                    dice[r, m] += threshold_dice(loaded["image"][m][brain], truth)
        dice /= len(cases)

    print(f"\nbest single-channel threshold Dice (mean over {len(cases)} patients)")
    print("region " + "".join(f"{m:>16}" for m in MODALITIES) + "    best")
    for r, region in enumerate(REGION_NAMES):
        cells = []
        for m in range(len(MODALITIES)):
            direction, t = np.unravel_index(dice[r, m].argmax(), dice[r, m].shape)
            cells.append(f"{dice[r, m, direction, t]:.3f} {'><'[direction]}{THRESHOLDS[t]:+.2f}")
        print(f"{region:<6} " + "".join(f"{cell:>16}" for cell in cells) + f"   {dice[r].max():.3f}")


if __name__ == "__main__":
    main()
