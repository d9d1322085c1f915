"""Patches the server chooses and the sites cut, seeded augmentation, and sliding-window logits from window corners."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from scipy.ndimage import binary_dilation, binary_erosion, generate_binary_structure

from helpers import background_where_empty

from split_unet.errors import ProtocolError
from split_unet.networks import NetworkConfig, build_split_unet
from split_unet.training.augment import (augment_image, intensity_augment, intensity_seed, site_seed,
                                         spatial_augment)
from split_unet.training.patches import check_patch_starts, cut_patch, sample_patch_starts, step_seeds
from split_unet.training.sliding_window import EMPTY_WINDOW_LOGIT, logits_of_windows, sliding_window_logits

pytestmark = pytest.mark.unit

GRID, PATCH = (20, 24, 13), (16, 16, 16)  # the last axis smaller than the patch


def test_uniform_corners_are_deterministic_in_range_and_per_patient():
    corners = sample_patch_starts(GRID, PATCH, seed=3, train_step=7, count=100)
    assert corners == sample_patch_starts(GRID, PATCH, seed=3, train_step=7, count=100)
    # patient k's corner depends on (seed, step, k) only: not on how many patients the step has
    assert corners[:5] == sample_patch_starts(GRID, PATCH, seed=3, train_step=7, count=5)
    assert corners != sample_patch_starts(GRID, PATCH, seed=3, train_step=8, count=100)
    assert corners != sample_patch_starts(GRID, PATCH, seed=4, train_step=7, count=100)
    starts = np.array(corners)
    # 100 uniform draws from 5 and 9 values reach both ends: a miss has probability (8/9)^100 < 1e-5
    assert starts.min(axis=0).tolist() == [0, 0, 0]
    assert starts.max(axis=0).tolist() == [4, 8, 0]  # G - P, and 0 where the grid is smaller than the patch


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_label_sampling_centres_the_asked_share_on_tumour(fraction):
    grid, patch, n = (32, 32, 32), (4, 4, 4), 2000
    mask = np.zeros(grid, dtype=np.uint8)
    mask[30, 30, 30] = 1  # one tumour voxel: a centred patch is clamped to the corner (28, 28, 28)
    corners = sample_patch_starts(grid, patch, 0, 1, n, labels=[mask] * n, positive_fraction=fraction)
    share = sum(c == (28, 28, 28) for c in corners) / n
    # A uniform corner is (28, 28, 28) with probability 29^-3 (4e-5). The positive count is Binomial(2000, f):
    # its standard deviation is at most 0.0112 of n, and 0.05 is over 4 of them (two-sided p < 2e-5).
    assert abs(share - fraction) < 0.05
    if fraction == 0.0:  # uniform patches are not the label's: the same as without labels
        assert len(set(corners)) > n // 2


def test_label_sampling_without_tumour_is_uniform_and_labels_must_fit():
    empty = np.zeros(GRID, dtype=bool)
    corners = sample_patch_starts(GRID, PATCH, 0, 1, 30, labels=[empty] * 30, positive_fraction=1.0)
    assert len(set(corners)) > 5 and all(0 <= c[0] <= 4 and 0 <= c[1] <= 8 and c[2] == 0 for c in corners)
    with pytest.raises(ValueError, match="shape"):
        sample_patch_starts(GRID, PATCH, 0, 1, 1, labels=[np.zeros((20, 24, 14))])
    with pytest.raises(ValueError, match="2 label masks for 3"):
        sample_patch_starts(GRID, PATCH, 0, 1, 3, labels=[empty, empty])


@pytest.mark.parametrize("start", [(0, 0, 0), (-3, 5, -15), (10, 20, 5), (-16, 0, 0), (3, 24, 2), (-5, -7, -2)])
def test_cut_patch_fills_zeros_outside_the_volume(start):
    volume = np.random.default_rng(0).normal(size=(2, *GRID)).astype(np.float32) + 5  # no zeros inside
    patch = cut_patch(volume, start, PATCH)
    margin = max(PATCH)  # the reference: the volume in a frame of zeros, sliced
    framed = np.pad(volume, [(0, 0)] + [(margin, margin)] * 3)
    expected = framed[(slice(None), *(slice(s + margin, s + margin + p) for s, p in zip(start, PATCH)))]
    assert patch.dtype == np.float32 and patch.shape == (2, *PATCH)
    np.testing.assert_array_equal(patch, expected)
    labels = (volume > 5).astype(np.uint8)
    assert cut_patch(labels, start, PATCH).dtype == np.uint8


def test_sites_accept_corners_whose_patch_overlaps_the_grid():
    extremes = [[-15, -15, -15], (19, 23, 12), [0, 0, 0]]
    assert check_patch_starts(extremes, GRID, PATCH, site="flair", field="corners", count=3) == [
        (-15, -15, -15), (19, 23, 12), (0, 0, 0)]
    accepted = check_patch_starts([[np.int64(1), 2, 3]], GRID, PATCH, site="flair", field="corners")
    assert accepted == [(1, 2, 3)] and type(accepted[0][0]) is int
    with pytest.raises(ProtocolError, match="2 patch corners for 3 patients"):
        check_patch_starts(extremes[:2], GRID, PATCH, site="flair", field="corners", count=3)


@pytest.mark.parametrize("starts,detail,field", [
    ({"a": 1}, "must be a list", "corners"),
    ([[0, 0]], "three integers", "corners[0]"),
    ([[0, 0, 0], [0, 0, 1.0]], "three integers", "corners[1]"),
    ([[0, True, 0]], "three integers", "corners[0]"),
    ([[-16, 0, 0]], "outside", "corners[0]"),
    ([[0, 24, 0]], "outside", "corners[0]"),
    ([[0, 0, 13]], "outside", "corners[0]"),
])
def test_sites_refuse_malformed_or_outside_corners(starts, detail, field):
    with pytest.raises(ProtocolError, match=detail) as refused:
        check_patch_starts(starts, GRID, PATCH, site="flair", field="corners")
    assert refused.value.site == "flair" and refused.value.field == field


def test_seeds_depend_on_seed_step_patient_and_site():
    assert step_seeds(0, 5, 4) == step_seeds(0, 5, 4) and step_seeds(0, 5, 2) == step_seeds(0, 5, 4)[:2]
    assert len(set(step_seeds(0, 5, 4) + step_seeds(0, 6, 4) + step_seeds(1, 5, 4))) == 12
    assert len({site_seed(0, site) for site in range(4)}) == 4
    per_site = {intensity_seed(0, site, 5, k) for site in range(4) for k in range(3)}
    assert len(per_site) == 12 and not per_site & set(step_seeds(0, 5, 3))


def _volume(shape=(4, 16, 16, 12)) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("seed", range(12))
def test_spatial_augmentation_is_the_same_for_one_channel_and_the_stack(seed):
    stack = _volume()
    moved = spatial_augment(stack, seed, "bilinear")
    assert moved.shape == stack.shape and moved.dtype == np.float32
    for c in range(len(stack)):
        np.testing.assert_array_equal(moved[c], spatial_augment(stack[c:c + 1], seed, "bilinear")[0])
    np.testing.assert_array_equal(moved, spatial_augment(torch.from_numpy(stack), seed, "bilinear"))


def test_spatial_augmentation_moves_the_label_with_the_image():
    """An image equal to the label, moved with "bilinear", and the label, moved with "nearest", agree except
    on the boundary of the moved label (where interpolation and the nearest voxel may round differently)."""
    grid = np.indices((16, 16, 12))
    inside = ((grid[0] - 6) ** 2 + (grid[1] - 9) ** 2 + (grid[2] - 5) ** 2 < 16)  # a ball, off-centre
    inside[1:4, 2:12, 3:5] = True  # and a slab: no flip or rotation leaves the shape as it was
    label, image = inside[None].astype(np.uint8), inside[None].astype(np.float32)
    connected = generate_binary_structure(3, 3)
    kinds = set()
    for seed in range(20):
        moved_label = spatial_augment(label, seed, "nearest")
        moved_image = spatial_augment(image, seed, "bilinear")[0] > 0.5
        assert moved_label.dtype == np.uint8 and set(np.unique(moved_label)) <= {0, 1}
        truth = moved_label[0].astype(bool)
        boundary = binary_dilation(truth, connected) & ~binary_erosion(truth, connected)
        assert not (moved_image != truth)[~boundary].any(), seed
        resampled = not np.isin(spatial_augment(image, seed, "bilinear"), [0, 1]).all()  # the affine interpolated
        kinds.add("affine" if resampled else "moved" if (truth != inside).any() else "unchanged")
    assert kinds == {"affine", "moved", "unchanged"}  # the 20 seeds cover each case


def test_intensity_augmentation_is_seeded_per_site():
    channel = _volume((1, 16, 16, 12))
    assert intensity_augment(channel, 11).shape == channel.shape
    np.testing.assert_array_equal(intensity_augment(channel, 11), intensity_augment(channel, 11))
    sites = [intensity_augment(channel, intensity_seed(0, site, 1, 0)) for site in range(4)]
    assert sum(not np.array_equal(a, b) for a in sites for b in sites) == 12  # every pair of sites differs


def test_augment_image_equals_each_site_augmenting_its_own_channel():
    stack, spatial = _volume(), step_seeds(0, 3, 1)[0]
    seeds = [intensity_seed(0, site, 3, 0) for site in range(4)]
    together = augment_image(stack, spatial, seeds)
    for site in range(4):
        np.testing.assert_array_equal(together[site:site + 1],
                                      augment_image(stack[site:site + 1], spatial, seeds[site:site + 1]))


@pytest.mark.parametrize("overlap,sw_batch_size,batch", [(0.25, 2, 1), (0.5, 1, 1), (0.5, 3, 2)])
def test_sliding_window_from_corners_equals_monai_on_the_images(overlap, sw_batch_size, batch):
    model = build_split_unet(NetworkConfig(channels=(4, 8, 16), strides=(2, 2)), (1, 1), seed=0).eval()
    images = torch.randn(batch, 2, *GRID, generator=torch.Generator().manual_seed(1))
    asked = []

    def predict(corners, rows=None):
        rows = rows or [0] * len(corners)
        asked.extend(corners)
        # as the sites would: each cuts its own modality, the server's composed model fuses them
        windows = [np.concatenate([cut_patch(images[r, m:m + 1].numpy(), c, PATCH) for m in range(2)])
                   for c, r in zip(corners, rows)]
        return model(torch.from_numpy(np.stack(windows)))

    with torch.no_grad():
        expected = sliding_window_inference(images, PATCH, sw_batch_size, model, overlap, mode="gaussian")
        logits = sliding_window_logits(GRID, PATCH, predict, sw_batch_size, overlap, batch=batch)
    assert logits.shape == (batch, 3, *GRID)
    assert any(c[2] < 0 for c in asked)  # the short axis was padded: windows start before the grid
    # the same windows, weights and blending: float32 rounding only (the result is identical here)
    assert float((logits - expected).abs().max()) <= 1e-5


def test_a_window_without_image_is_background_and_never_reaches_the_network():
    """The sliding window over images that are 0 on one side: the windows 0 in every channel are answered with
    ``EMPTY_WINDOW_LOGIT`` without the network; the result equals MONAI's sliding window of a predictor that does
    the same (``background_where_empty``), and the network's own answer on such a window is not background."""
    model = build_split_unet(NetworkConfig(channels=(4, 8, 16), strides=(2, 2)), (1, 1), seed=0).eval()
    images = torch.randn(1, 2, 40, 24, 13, generator=torch.Generator().manual_seed(1))
    images[:, :, 24:] = 0  # every window starting at x = 24 is empty in both channels
    seen = []

    def network(windows: torch.Tensor) -> torch.Tensor:
        seen.append(windows.flatten(1).any(1))
        return model(windows)

    def predict(corners):
        windows = np.stack([cut_patch(images[0].numpy(), corner, PATCH) for corner in corners])
        return logits_of_windows([not w.any() for w in windows], lambda keep: network(torch.from_numpy(windows[keep])),
                                 3, PATCH)

    with torch.no_grad():
        logits = sliding_window_logits((40, 24, 13), PATCH, predict, 2, 0.5)
        expected = sliding_window_inference(images, PATCH, 2, background_where_empty(model), 0.5, mode="gaussian")
        unsupervised = model(torch.zeros(1, 2, *PATCH))
    assert torch.cat(seen).all()  # the network saw only windows holding image
    assert float((logits - expected).abs().max()) <= 1e-5
    # covered by the empty windows only (x >= 32; windows start every 8): background, to the blending's rounding
    assert torch.allclose(logits[:, :, 32:], torch.tensor(EMPTY_WINDOW_LOGIT), rtol=1e-6, atol=0)
    assert unsupervised.flatten(2).std(2).max() < 1e-6  # without the rule: one unsupervised logit per region


def test_logits_of_windows_asks_only_for_windows_with_image():
    asked = []

    def predict(keep):
        asked.append(keep)
        return torch.ones(len(keep), 3, 2, 2, 2)

    logits = logits_of_windows([True, False, True, False], predict, 3, (2, 2, 2))
    assert asked == [[1, 3]]
    assert (logits[[1, 3]] == 1).all() and (logits[[0, 2]] == EMPTY_WINDOW_LOGIT).all()
    assert (logits_of_windows([True], predict, 3, (2, 2, 2)) == EMPTY_WINDOW_LOGIT).all() and len(asked) == 1
