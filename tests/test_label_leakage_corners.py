"""Label leakage through the patch corners of label sampling: the best tumour map a site can make from them."""

import numpy as np
import pytest

from split_unet.leakage.corners import corner_label_leakage, patch_centres
from split_unet.training.patches import sample_patch_starts

pytestmark = pytest.mark.unit
GRID, PATCH = (48, 48, 40), (16, 16, 16)


def _tumour() -> np.ndarray:
    """A ball of radius 6 voxels off the grid's centre."""
    x, y, z = np.indices(GRID)
    return (x - 30) ** 2 + (y - 18) ** 2 + (z - 20) ** 2 <= 36


def _received(labelled: bool, steps: int = 40) -> list[tuple[int, int, int]]:
    """The corners a site receives for one patient over ``steps`` steps (patient 0 of a batch of 1)."""
    tumour = _tumour()
    return [corner for step in range(1, steps + 1)
            for corner in sample_patch_starts(GRID, PATCH, 0, step, 1, labels=[tumour] if labelled else None)]


def test_label_sampled_corners_map_the_tumour_and_uniform_ones_do_not():
    truth = _tumour()
    labelled = corner_label_leakage(_received(True), PATCH, truth)
    uniform = corner_label_leakage(_received(False), PATCH, truth)
    # ~20 of 40 centres lie in the ball: their density marks it (measured 0.83). Uniform centres mark nothing in
    # particular, but the best of the 76 maps, chosen with the truth, still overlaps a 1 % tumour by chance
    # (measured 0.30): the upper bound's chance level is not 0.
    assert labelled["dice"] > 0.7 and labelled["corners"] == 40
    assert uniform["dice"] < 0.4 < labelled["dice"] - uniform["dice"]


def test_centres_undo_the_samplers_half_patch_and_no_corners_leak_nothing():
    np.testing.assert_array_equal(patch_centres([(0, 2, -4)], PATCH), [[8, 10, 4]])
    assert corner_label_leakage([], PATCH, _tumour())["dice"] == 0.0
