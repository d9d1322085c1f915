"""Region masks (WT, TC, ET) for MSD and BraTS label conventions."""

import numpy as np
import pytest
import torch

from split_unet.data import MODALITIES, REGION_NAMES, label_from_regions, nest_regions, regions

# Background, then oedema, non-enhancing core, enhancing tumour in each convention.
MSD = np.array([[0, 1], [2, 3]], dtype=np.uint8)
BRATS = np.array([[0, 2], [1, 4]], dtype=np.uint8)
BRATS2023 = np.array([[0, 2], [1, 3]], dtype=np.uint8)  # 1 NETC, 2 SNFH (oedema), 3 ET
EXPECTED = np.array([
    [[0, 1], [1, 1]],  # WT: any tumour label
    [[0, 0], [1, 1]],  # TC: core labels
    [[0, 0], [0, 1]],  # ET: enhancing only
], dtype=bool)


def test_names():
    assert MODALITIES == ("flair", "t1w", "t1gd", "t2w")
    assert REGION_NAMES == ("WT", "TC", "ET")


@pytest.mark.parametrize("label, convention", [(MSD, "msd"), (BRATS, "brats"), (BRATS2023, "brats2023")])
def test_regions_numpy_and_torch(label, convention):
    masks = regions(label, convention)
    assert isinstance(masks, np.ndarray) and masks.dtype == bool and masks.shape == (3, 2, 2)
    np.testing.assert_array_equal(masks, EXPECTED)

    masks_t = regions(torch.from_numpy(label), convention)
    assert isinstance(masks_t, torch.Tensor) and masks_t.dtype == torch.bool
    np.testing.assert_array_equal(masks_t.numpy(), EXPECTED)


def test_msd_is_not_brats():
    # MSD label 2 (non-enhancing core) is oedema in BraTS: only WT agrees.
    msd, brats = regions(MSD, "msd"), regions(MSD, "brats")
    np.testing.assert_array_equal(msd[0], brats[0])
    assert not np.array_equal(msd[1], brats[1])


@pytest.mark.parametrize("label, convention", [(MSD, "msd"), (BRATS, "brats"), (BRATS2023, "brats2023")])
def test_round_trip(label, convention):
    rng = np.random.default_rng(0)
    values = np.array([0, *np.unique(label[label > 0])], dtype=np.uint8)
    volume = rng.choice(values, size=(5, 6, 7)).astype(np.uint8)
    back = label_from_regions(regions(volume, convention), convention)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, volume)
    # Float 0/1 masks (as load_label returns) and torch tensors work as well.
    back_t = label_from_regions(torch.from_numpy(regions(volume, convention).astype(np.float32)), convention)
    assert back_t.dtype == torch.uint8
    np.testing.assert_array_equal(back_t.numpy(), volume)


def test_bad_arguments():
    with pytest.raises(ValueError, match="convention"):
        regions(MSD, "brats2019")
    with pytest.raises(ValueError, match="convention"):
        label_from_regions(EXPECTED, "nope")
    with pytest.raises(ValueError, match="3 region channels"):
        label_from_regions(EXPECTED[:2])


def test_written_map_is_the_nested_masks():
    """Regions thresholded one by one need not nest; the label map written is the nested masks, not ET outside WT."""
    masks = np.zeros((3, 1, 4), dtype=bool)
    masks[0] = [[1, 1, 0, 0]]  # WT
    masks[1] = [[0, 1, 1, 0]]  # TC: one voxel outside WT
    masks[2] = [[1, 1, 1, 1]]  # ET: everywhere
    nested = nest_regions(masks)
    np.testing.assert_array_equal(nested, [[[1, 1, 0, 0]], [[0, 1, 0, 0]], [[0, 1, 0, 0]]])
    for convention in ("msd", "brats", "brats2023"):
        label = label_from_regions(masks, convention)
        np.testing.assert_array_equal(regions(label, convention), nested)
    # A batch of torch masks (B, 3, *S), as the networks give them.
    batch = torch.from_numpy(np.stack([masks, masks])).float()
    np.testing.assert_array_equal(nest_regions(batch, axis=1).numpy(), np.stack([nested, nested]).astype(np.float32))
