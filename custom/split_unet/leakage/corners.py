"""Label leakage through the patch corners a site receives (label sampling).

With label sampling the label holder centres a share of each patient's training patches on tumour voxels
(``training.patches.sample_patch_starts``) and sends every site the corners: the centres of those patches are
tumour voxels drawn uniformly, the others are uniform over the grid. A site that keeps the corners it received
for a patient can map the tumour without any label. ``corner_label_leakage`` measures the best such map: the
density of the received patch centres (Gaussian-smoothed counts, scipy), thresholded at the level, and smoothed
at the width, that give the highest Dice against the true whole tumour. Choosing them with the truth makes it an
upper bound on what a site can build (a site does not know the truth), as the white-box inversion is for images.
Uniform sampling sends corners that do not depend on the label: its map scores as chance
(``leakage.attacks.random_mask_like``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from .metrics import mask_dice

#: Smoothing widths (voxels) and density levels (fractions of the map's maximum) the best map is chosen from.
SIGMAS = (2.0, 4.0, 8.0, 16.0)
LEVELS = tuple(np.linspace(0.05, 0.95, 19))


def patch_centres(corners: Sequence[Sequence[int]], patch_shape: Sequence[int]) -> np.ndarray:
    """(n, 3) voxel centres of patches with these corners (the corner plus half the patch, as the sampler
    centres a patch on a tumour voxel: ``corner = centre - patch // 2`` before it is moved inside the grid)."""
    return np.asarray(corners, dtype=np.int64).reshape(-1, 3) + np.asarray(patch_shape, dtype=np.int64) // 2


def centre_density(corners: Sequence[Sequence[int]], patch_shape: Sequence[int], grid_shape: Sequence[int],
                   sigma: float) -> np.ndarray:
    """The received patch centres counted on the grid and smoothed by a Gaussian of ``sigma`` voxels."""
    counts = np.zeros(tuple(grid_shape), dtype=np.float32)
    centres = patch_centres(corners, patch_shape)
    centres = np.clip(centres, 0, np.asarray(grid_shape) - 1)
    np.add.at(counts, tuple(centres.T), 1.0)
    return gaussian_filter(counts, sigma, mode="constant")


def corner_label_leakage(corners: Sequence[Sequence[int]], patch_shape: Sequence[int], truth: np.ndarray,
                         sigmas: Sequence[float] = SIGMAS, levels: Sequence[float] = LEVELS) -> dict:
    """The best whole-tumour map a site can make from one patient's received corners, and its Dice.

    Args:
        corners: every patch corner the site received for the patient (grid voxels).
        patch_shape: the training patch.
        truth: the patient's true whole-tumour mask on the grid (only to score, and to pick the best map).

    Returns:
        ``{"dice", "sigma", "level", "voxels", "corners"}``; ``"dice"`` is 0 when no corner was received.
    """
    truth = np.asarray(truth, dtype=bool)
    best = {"dice": 0.0, "sigma": None, "level": None, "voxels": 0, "corners": len(corners)}
    if not len(corners):
        return best
    for sigma in sigmas:
        density = centre_density(corners, patch_shape, truth.shape, sigma)
        top = float(density.max())
        for level in levels:
            estimate = density > level * top
            dice = mask_dice(estimate[None], truth[None])
            if dice > best["dice"]:
                best.update(dice=dice, sigma=float(sigma), level=round(float(level), 3), voxels=int(estimate.sum()))
    return best
