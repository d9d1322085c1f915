"""Post-processing chosen on training patients (the smallest component kept) and flip test-time augmentation."""

import numpy as np
import pytest
import torch

from split_unet.training import TrainConfig
from split_unet.training.metrics import RegionMetrics, logits_to_masks
from split_unet.training.postprocess import choose_min_component_voxels
from split_unet.training.sliding_window import FLIPS, flip_averaged_logits

pytestmark = pytest.mark.unit
SHAPE = (24, 24, 24)


def _patient(specks: int, speck_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (1, 3, *SHAPE) that find a 6^3 tumour (all three regions) and add ``specks`` false cubes."""
    truth = torch.zeros(1, 3, *SHAPE)
    truth[..., 9:15, 9:15, 9:15] = 1
    predicted = truth.clone()
    for k in range(specks):
        corner = 1 + 5 * k
        predicted[..., corner:corner + speck_side, 1:1 + speck_side, 20:20 + speck_side] = 1
    return predicted * 20 - 10, truth


def test_the_size_that_removes_the_specks_but_not_the_tumour_is_chosen():
    patients = [_patient(3, 2), _patient(2, 2)]  # specks of 8 voxels, a tumour of 216
    logits, targets = [p[0] for p in patients], [p[1] for p in patients]
    sizes, scores = choose_min_component_voxels(logits, targets, [(1.0, 1.0, 1.0)] * 2, candidates=(0, 9, 100, 300))
    # WT: 0 keeps the specks, 300 also removes the tumour; a tie of 9 and 100: the smaller size wins. The TC and ET
    # specks lie inside the WT ones and go with them (the masks nest): those regions need no size of their own.
    assert sizes == (9, 0, 0)
    assert scores["WT"][9] == pytest.approx(1.0) and scores["WT"][100] == scores["WT"][9]
    assert scores["WT"][0] < scores["WT"][9] and scores["WT"][300] < scores["WT"][9]
    for region in ("TC", "ET"):
        assert scores[region][0] == pytest.approx(1.0) and scores[region][300] < scores[region][0]


def test_each_region_gets_its_own_size():
    # Whole-tumour specks of 64 voxels beside a true enhancing rim of 27: one size cannot remove the first and keep
    # the second; one per region can.
    truth = torch.zeros(1, 3, *SHAPE)
    truth[:, 0, 4:12, 4:12, 4:12] = 1  # WT 512 voxels
    truth[:, 1, 5:10, 5:10, 5:10] = 1  # TC 125
    truth[:, 2, 6:9, 6:9, 6:9] = 1  # ET 27
    predicted = truth.clone()
    predicted[:, 0, 16:20, 16:20, 16:20] = 1  # a false WT lesion of 64 voxels
    logits = predicted * 20 - 10
    sizes, scores = choose_min_component_voxels([logits], [truth], [(1.0, 1.0, 1.0)], candidates=(0, 30, 100, 600))
    assert sizes == (100, 0, 0)
    # Each candidate is scored as RegionMetrics scores its region, with the earlier regions at their chosen sizes.
    for region, index, tried in (("WT", 0, (30, 0, 0)), ("ET", 2, (100, 0, 30))):
        metrics = RegionMetrics(with_hd95=False)
        metrics.update(logits_to_masks(logits, min_component_voxels=tried), truth)
        aggregate = metrics.aggregate()
        expected = (aggregate["dice"][region] + aggregate["lesion_dice"][region]) / 2
        assert scores[region][tried[index]] == pytest.approx(expected, abs=1e-6)
    masks = logits_to_masks(logits, min_component_voxels=sizes)
    assert torch.equal(masks, truth)
    assert logits_to_masks(logits, min_component_voxels=100)[:, 2].sum() == 0  # one size loses the rim


def test_nothing_to_remove_keeps_zero_and_mismatched_inputs_are_refused():
    logits, target = _patient(0, 2)
    assert choose_min_component_voxels([logits], [target], [(1.0, 1.0, 1.0)], candidates=(0, 9))[0] == (0, 0, 0)
    with pytest.raises(ValueError, match="one logits, target and spacing"):
        choose_min_component_voxels([logits], [], [(1.0, 1.0, 1.0)])


@pytest.mark.parametrize("value, kept", [(0, 0), (512, 512), ([0, 8, 8], (0, 8, 8))])
def test_the_config_takes_one_size_or_one_per_region(value, kept):
    assert TrainConfig(min_component_voxels=value).min_component_voxels == kept
    assert TrainConfig.from_dict(TrainConfig(min_component_voxels=value).to_dict()).min_component_voxels == kept


@pytest.mark.parametrize("value", [-1, [1, 2], [1, 2, -3], True, "8", [1.5, 2, 3]])
def test_the_config_refuses_other_sizes(value):
    with pytest.raises(ValueError, match="min_component_voxels must be an integer >= 0 or three of them"):
        TrainConfig(min_component_voxels=value)


def test_flip_averaging_maps_each_prediction_back_before_averaging_probabilities():
    fixed = torch.randn(1, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    images = torch.randn(1, 2, 4, 5, 6)
    seen = []

    def predict(x):  # a predictor that ignores its input: only the flipping back can change what it returns
        seen.append(x)
        return fixed

    averaged = flip_averaged_logits(predict, images)
    expected = torch.stack([torch.sigmoid(torch.flip(fixed, list(a)) if a else fixed) for a in FLIPS]).mean(0)
    assert torch.allclose(torch.sigmoid(averaged), expected, atol=1e-6)
    assert len(seen) == len(FLIPS) and torch.equal(seen[1], torch.flip(images, [2]))
    # a predictor that commutes with flips (voxel-wise) is left as it is
    voxelwise = flip_averaged_logits(lambda x: x[:, :1].repeat(1, 3, 1, 1, 1), images)
    assert torch.allclose(voxelwise, images[:, :1].repeat(1, 3, 1, 1, 1), atol=1e-4)


def test_scores_without_hd95_have_the_same_dice_and_no_surface_distances():
    from split_unet.training.metrics import RegionMetrics

    logits, target = _patient(2, 2)
    full, fast = RegionMetrics(), RegionMetrics(with_hd95=False)
    for metrics in (full, fast):
        metrics.update(logits_to_masks(logits), target)
    full, fast = full.aggregate(), fast.aggregate()
    assert fast["dice"] == full["dice"] and fast["lesion_dice"] == full["lesion_dice"]
    assert fast["lesions"] == full["lesions"] and "hd95" not in fast and "lesion_hd95" not in fast
