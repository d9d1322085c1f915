"""The native path end to end in the simulator: BraTS 2023 files (int16, LPS, labels 1/2/3) at their own geometry,
240 x 240 x 155 at 1 mm, trained on small patches, segmented by sliding windows, written in the source geometry
with the source's label values and scored against the source labels in source space."""

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import maximum_filter

from split_unet.data import REGION_NAMES, generate_release, partition_dataset, regions
from split_unet.defence import UNDEFENDED_SCOPE
from split_unet.jobs import training_settings
from split_unet.launch.inference import infer_in_simulator
from split_unet.launch.simulation import run_simulation

from helpers import TINY_NETWORK

pytestmark = pytest.mark.simulator

# The files' own 1 mm voxels (no resampling), small patches and few, unblended windows (320 per patient, 160 per
# round trip) keep it to a CI budget; so does sending only levels 1 and 2 (a quarter of the bytes of all three):
# the geometry, labels and scores checked here do not depend on which levels travel.
TRAIN = {"size": [240, 240, 155], "patch_size": 32, "augment": True, "network": {**TINY_NETWORK, "levels": [1, 2]},
         "epochs": 1, "batch_size": 2, "val_fraction": 0.34, "sw_batch_size": 160, "sw_overlap": 0.0,
         "cache_cases": 2}


def test_brats2023_at_native_resolution_trains_segments_and_scores_in_source_space(project_root, tmp_path):
    release = generate_release(tmp_path / "brats2023", "brats2023", 3, seed=0, size=32)
    sites = tmp_path / "sites"
    partition_dataset(release, sites, progress=False)
    summary = run_simulation(sites, tmp_path / "train", training_settings(TRAIN, scope=UNDEFENDED_SCOPE),
                             site_configs=project_root / "site_configs", progress=None)
    assert "error" not in summary, summary.get("error")
    assert summary["steps"] == 1 and set(summary["dice"]) == {"WT", "TC", "ET", "mean"}

    result = infer_in_simulator(tmp_path / "train", sites, tmp_path / "infer",
                                site_configs=project_root / "site_configs", progress=None)
    assert "error" not in result, result.get("error")
    assert result["convention"] == "brats2023" and result["scored_cases"] == 3
    for pid, entry in result["patients"].items():
        source = nib.load(release / pid / f"{pid}-seg.nii.gz")
        written = nib.load(tmp_path / "infer" / "segmentations" / entry["segmentation"])
        assert written.shape == source.shape == (240, 240, 155)
        assert np.allclose(written.affine, source.affine)  # LPS as stored, not the RAS grid
        mine = np.asarray(written.dataobj)
        assert set(np.unique(mine)) <= {0, 1, 2, 3}
        # Every window holding a voxel with no image within 31 voxels along each axis holds no image at any site
        # (the grid is the files' voxels reoriented): it is answered as background, whatever the network says there.
        image = np.any([np.asarray(nib.load(release / pid / f"{pid}-{suffix}.nii.gz").dataobj) != 0
                        for suffix in ("t1n", "t1c", "t2w", "t2f")], axis=0)
        far_from_image = ~maximum_filter(image, size=63, mode="constant", cval=False)
        assert far_from_image.sum() > 100_000 and not mine[far_from_image].any()
        truth, mine = regions(np.asarray(source.dataobj), "brats2023"), regions(mine, "brats2023")
        for region, name in enumerate(REGION_NAMES):
            overlap, total = np.logical_and(truth[region], mine[region]).sum(), truth[region].sum() + mine[region].sum()
            assert entry["dice"][name] == pytest.approx(2 * overlap / total if total else 1.0, abs=1e-6)
