"""Real brain MRI in its own geometry (240 x 240 x 155 at 1 mm, RAS 4D MSD and LPS int16 BraTS files): a label
pushed onto the common grid and back lands where it was, for every size / spacing, padding and cropping."""

import json

import nibabel as nib
import numpy as np
import pytest

from split_unet.cli import main
from split_unet.data import (
    RELEASE_SHAPE,
    REGION_NAMES,
    ImageRef,
    SiteImages,
    SiteLabels,
    find_cases,
    generate_release,
    label_from_regions,
    label_to_source,
    partition_dataset,
    read_label,
    read_volume,
    regions,
)

pytestmark = pytest.mark.unit

# (size, spacing): pad z only (155 slices), pad every axis, crop x and y, crop every axis, coarser grids.
GRIDS = [(240, None), (240, 1.0), (256, 1.0), (200, 1.0), (144, 1.0), (160, 1.5), (128, 1.875)]


@pytest.fixture(scope="module", params=["msd", "brats2021"])
def release(request, tmp_path_factory):
    """One labelled real-geometry case of a release, partitioned: (server labels, one site's images, case)."""
    root = tmp_path_factory.mktemp(request.param)
    generate_release(root / "data", request.param, n_patients=1, seed=3)
    folders = partition_dataset(root / "data", root / "sites", modalities=("t1gd",), progress=False)
    return folders, find_cases(root / "data")[0]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _kept(shape, affine, size, spacing) -> np.ndarray:
    """Source voxels inside the grid's field of view (the crop keeps them)."""
    return label_to_source(np.ones((size,) * 3, np.uint8), affine, shape, spacing).astype(bool)


@pytest.mark.parametrize("size, spacing", GRIDS)
def test_label_round_trip_in_source_space(release, size, spacing):
    folders, case = release
    source, image = read_label(case.label, case.convention)
    assert source.shape == RELEASE_SHAPE and nib.aff2axcodes(image.affine) == (
        ("R", "A", "S") if case.convention == "msd" else ("L", "P", "S"))
    # The geometry the site reports (its own 3D file: a channel of the 4D MSD file, or the int16 BraTS file).
    site = SiteImages(folders["t1gd"], size, spacing)
    affine, shape = site.geometry(case.patient_id)
    labels = SiteLabels(folders["server"], size, spacing)
    back = label_to_source(label_from_regions(labels.get(case.patient_id), case.convention), affine, shape, spacing)
    assert back.shape == source.shape and set(np.unique(back)) <= {0, *np.unique(source)}
    truth, written = regions(source, case.convention), regions(back, case.convention)
    if spacing in (None, 1.0):
        # Same voxel size: the round trip is exact, apart from what the crop cuts away.
        kept = np.ones(shape, bool)
        if size < max(RELEASE_SHAPE):
            kept = _kept(shape, affine, size, spacing)
            assert not kept.all()
        np.testing.assert_array_equal(back, np.where(kept, source, 0))
        for region in range(len(REGION_NAMES)):
            if truth[region][~kept].sum() == 0:  # nothing of this region cropped away
                assert _dice(written[region], truth[region]) == 1.0
        return
    # Coarser grid: nearest neighbour down then up moves each boundary by up to half a grid voxel, on average a
    # quarter: for a blob of volume V and surface A the Dice loss is about A * spacing / 4 / (2 V).
    for region, name in enumerate(REGION_NAMES):
        surface = np.logical_xor(truth[region], np.roll(truth[region], 1, 0)).sum() * 3  # ~ area in mm^2
        expected_loss = surface * spacing / 4 / (2 * truth[region].sum())
        dice = _dice(written[region], truth[region])
        assert dice >= 1 - 2 * expected_loss, (name, dice, expected_loss)
        # No shift: the centres of mass agree to within half a grid voxel (the old inverse moved them 42 mm).
        shift = np.abs(np.argwhere(written[region]).mean(0) - np.argwhere(truth[region]).mean(0))
        assert (shift < spacing / 2).all(), (name, shift)


def test_check_reports_what_the_grid_keeps(release, tmp_path, capsys):
    folders, _ = release
    sites = folders["server"].parent
    # 64 voxels without spacing: the central 64 mm of a 240 x 240 x 155 mm volume.
    assert main(["check", "--sites", str(sites), "--size", "64", "--json", str(tmp_path / "small.json")]) == 0
    output = capsys.readouterr().out
    small = json.loads((tmp_path / "small.json").read_text())["coverage"]
    assert small["t1gd"]["share"] < 0.5 and "warning: site 't1gd'" in output and "brain voxels" in output
    assert "overall" in output and "label voxels" in output
    # 160 voxels of 1.5 mm cover 240 mm: everything is kept, no warning.
    assert main(["check", "--sites", str(sites), "--size", "160", "--spacing", "1.5",
                 "--json", str(tmp_path / "large.json")]) == 0
    large = json.loads((tmp_path / "large.json").read_text())["coverage"]
    assert large["t1gd"]["share"] == large["server"]["share"] == 1.0 and "warning" not in capsys.readouterr().out


def test_the_release_trains_at_1mm_on_its_own_grid(release):
    """Native resolution: the grid is the release's own 240 x 240 x 155 at 1 mm, given as three sides."""
    folders, case = release
    images = SiteImages(folders["t1gd"], RELEASE_SHAPE, 1.0, cache_cases=1)
    labels = SiteLabels(folders["server"], list(RELEASE_SHAPE), 1.0, cache_cases=1)
    images.check()
    labels.check()
    image = images.volume(case.patient_id)
    assert image.shape == (1, *RELEASE_SHAPE) and image.dtype == np.float32
    # The whole brain is on the grid: as many non-zero voxels as in the source file, none on the x and y faces.
    # (The phantom's brain, MNI152's ~153 mm before each patient's scaling, may reach the first and last of the
    # 155 slices: the phantom cuts it there, not the grid.)
    brain = image[0] != 0
    source, _ = read_volume(ImageRef(images.path(case.patient_id)))
    assert brain.sum() == np.count_nonzero(source) > 0.1 * brain.size
    for axis in range(2):
        assert not brain.take([0, -1], axis=axis).any()
    masks = labels.volume(case.patient_id)
    assert masks.shape == (3, *RELEASE_SHAPE) and masks.dtype == np.uint8
    assert all(masks[region].any() for region in range(len(REGION_NAMES)))
    assert brain[masks[0] == 1].all()  # the tumour lies in the brain
