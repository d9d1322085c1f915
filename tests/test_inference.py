"""Split inference: the inverse of the common grid, and train-then-segment in the NVFlare simulator."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from split_unet.data import REGION_NAMES, label_from_regions, label_to_source, load_label, regions
from split_unet.launch.inference import infer_in_simulator
from split_unet.protocol.names import ENCODER_FILE



def test_label_to_source_inverts_the_grid_for_a_non_ras_affine(tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((30, 34, 28), np.uint8)
    label[10:20, 12:22, 8:18] = rng.choice([1, 2, 3], size=(10, 10, 10))
    affine = np.array([[-1.0, 0, 0, 40], [0, 0, 1.2, -10], [0, 1, 0, 5], [0, 0, 0, 1]])  # LAS-like, permuted
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), path)
    for size in (24, 40):  # crop and pad
        back = label_to_source(label_from_regions(load_label(path, size, "msd")), affine, label.shape)
        assert back.shape == label.shape and np.array_equal(back, label)


def test_train_then_segment_in_the_simulator(project_root, tiny_data, trained_tiny, tmp_path):
    # A new patient the sites hold and the server has no label for (as partition writes MSD imagesTs).
    sites = tmp_path / "sites"
    shutil.copytree(tiny_data[1], sites)
    for datalist_path in sites.glob("*/datalist.json"):
        if datalist_path.parent.name != "server":
            datalist = json.loads(datalist_path.read_text())
            folder = datalist_path.parent
            shutil.copy(folder / datalist["patients"]["BRATS_001"], folder / "images/NEW_001.nii.gz")
            datalist["patients"]["NEW_001"] = "images/NEW_001.nii.gz"
            datalist_path.write_text(json.dumps(datalist))
    train_ws, _ = trained_tiny
    result = infer_in_simulator(train_ws, sites, tmp_path / "infer", site_configs=project_root / "site_configs",
                                progress=None)
    assert "error" not in result, result.get("error")
    assert sorted(result["patients"]) == [f"BRATS_00{i}" for i in range(1, 9)] + ["NEW_001"]
    unlabelled = result["patients"].pop("NEW_001")
    assert "dice" not in unlabelled and (tmp_path / "infer" / "segmentations" / unlabelled["segmentation"]).is_file()
    assert set(result["dice"]) == {"WT", "TC", "ET", "mean"} and result["scored_cases"] == 8
    assert result["convention"] == "msd" and result["hd95_unit"] == "mm"
    assert set(result["lesion_dice"]) == {"WT", "TC", "ET", "mean"}
    assert set(result["lesions"]["WT"]) == {"tp", "fn", "fp"}
    for pid, entry in result["patients"].items():
        source = nib.load(sites / "server" / "labels" / f"{pid}.nii.gz")
        segmentation = nib.load(tmp_path / "infer" / "segmentations" / entry["segmentation"])
        assert segmentation.shape == source.shape and np.allclose(segmentation.affine, source.affine)
        written = np.asarray(segmentation.dataobj)
        assert set(np.unique(written)) <= {0, 1, 2, 3}
        # The scores are those of the file written, against the source label, in source space.
        truth, mine = regions(np.asarray(source.dataobj)), regions(written)
        for region, name in enumerate(REGION_NAMES):
            overlap, total = np.logical_and(truth[region], mine[region]).sum(), truth[region].sum() + mine[region].sum()
            assert entry["dice"][name] == pytest.approx(2 * overlap / total if total else 1.0, abs=1e-6)
    assert json.loads((tmp_path / "infer" / "inference.json").read_text())["dice"] == result["dice"]
    job = json.loads((tmp_path / "infer" / "job" / "split_unet_infer" / "app_flair" / "config" /
                      "config_fed_client.json").read_text())
    assert job["executors"][0]["executor"]["args"]["encoder_path"] == f"local/{ENCODER_FILE}"
