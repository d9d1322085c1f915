"""Split inference: the inverse of the common grid, and train-then-segment in the NVFlare simulator."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from split_unet.data import (REGION_NAMES, generate_release, label_from_regions, label_to_source, load_label,
                             partition_dataset, regions)
from split_unet.errors import ProtocolError
from split_unet.cli import build_parser
from split_unet.launch.inference import infer_in_simulator
from split_unet.protocol.names import ENCODER_FILE
from split_unet.protocol.inference import check_labelled
from split_unet.protocol.rounds import check_one_grid


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
    train_ws, summary = trained_tiny
    # The training names its patients (to choose the post-processing on training patients only).
    named = summary["patients"]
    assert sorted(named["training"] + named["validation"]) == [f"BRATS_00{i}" for i in range(1, 9)]
    assert len(named["validation"]) == summary["config"]["val_patients"]
    result = infer_in_simulator(train_ws, sites, tmp_path / "infer", site_configs=project_root / "site_configs",
                                progress=None)
    assert "error" not in result, result.get("error")
    assert result["postprocessing"] == {"min_component_voxels": 0}  # the training's, not chosen
    # What the user is told and both inference.json files name the folder the files are in.
    assert result["segmentations"] == str((tmp_path / "infer" / "segmentations").resolve())
    for written in (tmp_path / "infer" / "inference.json", tmp_path / "infer" / "segmentations" / "inference.json"):
        assert json.loads(written.read_text()) == result
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
    job = json.loads((tmp_path / "infer" / "job" / "split_unet_infer" / "app_flair" / "config" /
                      "config_fed_client.json").read_text())
    assert job["executors"][0]["executor"]["args"]["encoder_path"] == f"local/{ENCODER_FILE}"


def test_a_validation_folder_is_segmented_with_its_release_label_values(project_root, trained_tiny, tmp_path):
    # A BraTS 2021 validation release: no case has a label; the networks see the centre of its 1 mm volumes. The
    # training's transport (its summary) carries over to its inference job: here as if it had pushed.
    data = generate_release(tmp_path / "brats2021", "brats2021", n_patients=1, unlabelled=1, size=24)
    partition_dataset(data, tmp_path / "sites", progress=False)
    train_ws, summary = trained_tiny
    pushed = tmp_path / "trained_push"
    pushed.mkdir()
    (pushed / "summary.json").write_text(json.dumps({**summary, "config": {**summary["config"], "transport": "push"}}))
    result = infer_in_simulator(pushed, tmp_path / "sites", tmp_path / "infer",
                                site_configs=project_root / "site_configs", progress=None)
    assert "error" not in result, result.get("error")
    assert result["convention"] == "brats" and result["label_values"] == {"oedema": 2, "non_enhancing": 1,
                                                                           "enhancing": 4}
    (pid,) = result["patients"]
    written = nib.load(tmp_path / "infer" / "segmentations" / result["patients"][pid]["segmentation"])
    source = nib.load(tmp_path / "sites" / "flair" / "images" / f"{pid}.nii.gz")
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2, 4}
    server = json.loads((tmp_path / "infer" / "job" / "split_unet_infer" / "app_server" / "config" /
                         "config_fed_server.json").read_text())
    (controller,) = [c for c in server["components"] + server["workflows"] if "Inference" in c.get("path", "")]
    assert controller["args"]["transport"] == "push"


def test_inference_without_the_server_datalist_fails_with_its_reason(project_root, tiny_data, trained_tiny, tmp_path):
    # Without the server's datalist nothing says which label values the data uses: no silent default.
    sites = tmp_path / "sites"
    shutil.copytree(tiny_data[1], sites, ignore=shutil.ignore_patterns("server"))
    train_ws, _ = trained_tiny
    result = infer_in_simulator(train_ws, sites, tmp_path / "infer", site_configs=project_root / "site_configs",
                                progress=None)
    assert "no datalist.json in the server's data folder" in result["error"], result
    assert "label convention" in result["error"]
    assert not (tmp_path / "infer" / "inference.json").exists()


def test_the_grid_check_blames_the_site_that_differs_from_the_others():
    # The sites report every patient's source grid once, at init; the server writes each segmentation in the one
    # grid all parties share (the training's setup and the inference's use the same check).
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    grids = {site: ((240, 240, 150) if site == "flair" else (240, 240, 155), affine)  # the first site is the odd one
             for site in ("flair", "t1w", "t1gd", "t2w")}
    with pytest.raises(ProtocolError) as info:
        check_one_grid(grids, "P1")
    assert info.value.site == "flair" and info.value.patient == "P1"
    assert "shape (240, 240, 150) differs from (240, 240, 155) of site 't1w'" in str(info.value)
    agreeing = {site: ((240, 240, 155), affine) for site in grids}
    shape, found_affine = check_one_grid(agreeing, "P2")
    assert tuple(shape) == (240, 240, 155) and np.array_equal(found_affine, affine)


@pytest.mark.unit
def test_the_post_processing_is_chosen_on_named_labelled_patients_only(capsys):
    # Named: choosing on every patient would choose on the ones scored too. Labelled: the server scores each size.
    with pytest.raises(ProtocolError, match="1 of the 2 have no label at the server, e.g. NEW_001"):
        check_labelled(["BRATS_001", "NEW_001"], ["BRATS_001", "BRATS_002"])
    check_labelled(["BRATS_002"], ["BRATS_001", "BRATS_002"])
    parser = build_parser()
    base = ["infer", "--sites", "s", "--workspace", "w", "--train-workspace", "t", "--choose-postprocessing"]
    for extra in ([], ["--patients", "BRATS_001", "--min-component-voxels", "8"]):
        args = parser.parse_args(base + extra)
        assert args.func(args) == 2
        assert "--choose-postprocessing needs --patients" in capsys.readouterr().err
