"""Readers (MSD and BraTS layouts), content-independent geometry, partition and per-site loading."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from split_unet.data import (
    MODALITIES,
    ImageRef,
    SiteImages,
    SiteLabels,
    find_cases,
    generate_dataset,
    generate_patient,
    load_case,
    load_image,
    load_label,
    partition_dataset,
    regions,
    split_patients,
)
from split_unet.errors import DataError

SIZE = 32
MSD_TO_BRATS = np.array([0, 2, 1, 4], dtype=np.uint8)  # oedema 1->2, non-enhancing 2->1 (NCR), enhancing 3->4
BRATS_SUFFIX = {"flair": "flair", "t1w": "t1", "t1gd": "t1ce", "t2w": "t2"}
# BraTS 2023+: <id>/<id>-{t2f,t1n,t1c,t2w,seg}.nii.gz, labels 1 NETC, 2 SNFH (oedema), 3 ET.
MSD_TO_BRATS2023 = np.array([0, 2, 1, 3], dtype=np.uint8)
BRATS2023_SUFFIX = {"flair": "t2f", "t1w": "t1n", "t1gd": "t1c", "t2w": "t2w"}


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("msd"), 3, size=SIZE, seed=1, progress=False)


@pytest.fixture(scope="module")
def brats(msd, tmp_path_factory):
    """The same patients in the BraTS 2021 layout: one 3D file per modality, BraTS label values."""
    root = tmp_path_factory.mktemp("brats")
    for case in find_cases(msd):
        image, label = nib.load(case.images["flair"].path), nib.load(case.label)
        pid = case.patient_id.replace("BRATS_", "BraTS2021_00")
        (root / pid).mkdir()
        for modality, suffix in BRATS_SUFFIX.items():
            data = image.get_fdata(dtype=np.float32)[..., MODALITIES.index(modality)]
            nib.save(nib.Nifti1Image(data, image.affine), root / pid / f"{pid}_{suffix}.nii.gz")
        seg = MSD_TO_BRATS[np.asarray(label.dataobj)]
        nib.save(nib.Nifti1Image(seg, label.affine), root / pid / f"{pid}_seg.nii.gz")
    return root


@pytest.fixture(scope="module")
def brats2023(msd, tmp_path_factory):
    """The same patients in the BraTS 2023 layout; the last one without seg, as in a validation release."""
    root = tmp_path_factory.mktemp("brats2023")
    cases = find_cases(msd)
    for number, case in enumerate(cases):
        image, label = nib.load(case.images["flair"].path), nib.load(case.label)
        pid = f"BraTS-GLI-{number:05d}-000"
        (root / pid).mkdir()
        for modality, suffix in BRATS2023_SUFFIX.items():
            data = image.get_fdata(dtype=np.float32)[..., MODALITIES.index(modality)]
            nib.save(nib.Nifti1Image(data, image.affine), root / pid / f"{pid}-{suffix}.nii.gz")
        if number < len(cases) - 1:
            seg = MSD_TO_BRATS2023[np.asarray(label.dataobj)]
            nib.save(nib.Nifti1Image(seg, label.affine), root / pid / f"{pid}-seg.nii.gz")
    (root / "._BraTS-GLI-00000-000").write_bytes(b"macOS junk")  # a file, not a case folder
    return root


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_msd_cases_and_load_case(msd):
    cases = find_cases(msd)
    case = cases[0]
    assert case.patient_id == "BRATS_001" and case.convention == "msd"
    assert case.images["t1gd"] == ImageRef(msd / "imagesTr" / "BRATS_001.nii.gz", 2)
    loaded = load_case(case, SIZE)
    assert loaded["image"].shape == (4, SIZE, SIZE, SIZE) and loaded["image"].dtype == np.float32
    assert loaded["label"].shape == (3, SIZE, SIZE, SIZE) and loaded["label"].dtype == np.float32
    # z-scored over the brain, background stays 0
    brain = loaded["image"][0] != 0
    np.testing.assert_allclose(loaded["image"][:, brain].mean(1), 0.0, atol=1e-4)
    np.testing.assert_allclose(loaded["image"][:, brain].std(1), 1.0, atol=1e-3)
    label = np.asarray(nib.load(case.label).dataobj)
    np.testing.assert_array_equal(loaded["label"], regions(label).astype(np.float32))


def test_brats_layout_matches_msd(msd, brats):
    cases = find_cases(brats)
    assert [c.patient_id for c in cases] == ["BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"]
    assert cases[0].convention == "brats" and sorted(cases[0].images) == sorted(MODALITIES)
    for msd_case, brats_case in zip(find_cases(msd), cases):
        a, b = load_case(msd_case, SIZE), load_case(brats_case, SIZE)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_orientation_lps_equals_ras(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((20, 24, 28), dtype=np.float32) + 1.0
    label = rng.integers(0, 4, (20, 24, 28)).astype(np.uint8)
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    # LPS twin: x and y stored reversed, affine flipped so every voxel keeps its world position.
    lps = ras @ np.array([[-1, 0, 0, 19], [0, -1, 0, 23], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    assert nib.aff2axcodes(lps) == ("L", "P", "S")
    for name, array in (("img", data), ("seg", label)):
        _save(tmp_path / f"{name}_ras.nii.gz", array, ras)
        _save(tmp_path / f"{name}_lps.nii.gz", np.ascontiguousarray(array[::-1, ::-1]), lps)
    for spacing in (None, 2.5):
        np.testing.assert_array_equal(load_image(ImageRef(tmp_path / "img_ras.nii.gz"), SIZE, spacing),
                                      load_image(ImageRef(tmp_path / "img_lps.nii.gz"), SIZE, spacing))
        np.testing.assert_array_equal(load_label(tmp_path / "seg_ras.nii.gz", SIZE, "msd", spacing),
                                      load_label(tmp_path / "seg_lps.nii.gz", SIZE, "msd", spacing))


def test_same_bits_for_any_thread_count(tmp_path):
    """Sites and the centralized trainer may run with different torch thread counts."""
    image, _ = generate_patient(0, 64, seed=0)  # big enough for torch to split its reductions across threads
    path = _save(tmp_path / "image.nii.gz", image, np.eye(4))
    refs = [ImageRef(path, channel) for channel in range(len(MODALITIES))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [load_image(ref, 64) for ref in refs]
        torch.set_num_threads(max(2, threads))
        for ref, expected in zip(refs, single):
            np.testing.assert_array_equal(load_image(ref, 64), expected)
    finally:
        torch.set_num_threads(threads)


def test_crop_pad_and_spacing(tmp_path):
    label = np.zeros((40, 20, 32), dtype=np.uint8)
    label[4:36, :, :] = 1  # cropping 4 voxels from each side of x keeps exactly this slab
    label[20, 10, 16] = 3
    path = _save(tmp_path / "seg.nii.gz", label, np.eye(4))
    masks = load_label(path, SIZE, "msd")
    assert masks.shape == (3, SIZE, SIZE, SIZE)
    wt = masks[0]
    assert (wt[:, :6] == 0).all() and (wt[:, -6:] == 0).all()  # y padded 6 + 6 with background
    assert (wt[:, 6:26] == 1).all()  # x cropped 4 + 4: the slab fills it
    assert masks[2].sum() == 1 and masks[2][16, 16, 16] == 1  # centre stays at the centre
    # Resampling 1 mm -> 2 mm: nearest neighbour keeps 0/1 masks and halves the extent.
    coarse = load_label(path, SIZE, "msd", spacing=2.0)
    assert set(np.unique(coarse)) == {0.0, 1.0} and coarse[0].sum() == 16 * 10 * 16


def test_partition_then_sites_equal_load_case(msd, tmp_path):
    folders = partition_dataset(msd, tmp_path / "split", progress=False)
    assert set(folders) == {*MODALITIES, "server"}
    cases = find_cases(msd)
    ids = [c.patient_id for c in cases]
    centralised = {c.patient_id: load_case(c, SIZE) for c in cases}
    for channel, modality in enumerate(MODALITIES):
        site = SiteImages(folders[modality], SIZE)
        assert site.modality == modality and site.site == modality and site.patient_ids == ids
        # The site folder holds its own modality only: 3D files and the datalist.
        files = sorted(p.relative_to(folders[modality]).as_posix() for p in folders[modality].rglob("*") if p.is_file())
        assert files == ["datalist.json", *(f"images/{pid}.nii.gz" for pid in ids)]
        assert nib.load(folders[modality] / "images" / f"{ids[0]}.nii.gz").shape == (SIZE,) * 3
        for pid in ids:
            np.testing.assert_array_equal(site.get(pid)[0], centralised[pid]["image"][channel])
        assert site.batch(ids[::-1]).shape == (3, 1, SIZE, SIZE, SIZE)
    labels = SiteLabels(folders["server"], SIZE)
    assert labels.convention == "msd" and len(labels) == 3
    server_list = json.loads((folders["server"] / "datalist.json").read_text())
    assert server_list["site"] == "server" and server_list["patients"][ids[0]] == f"labels/{ids[0]}.nii.gz"
    for pid in ids:
        np.testing.assert_array_equal(labels.get(pid), centralised[pid]["label"])
    np.testing.assert_array_equal(labels.batch(ids)[1], centralised[ids[1]]["label"])
    # Files are unchanged apart from the split: same geometry and values.
    source, part = nib.load(cases[0].images["t2w"].path), nib.load(folders["t2w"] / "images" / f"{ids[0]}.nii.gz")
    np.testing.assert_array_equal(part.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(part.dataobj), np.asarray(source.dataobj)[..., 3])
    assert nib.load(folders["server"] / "labels" / f"{ids[0]}.nii.gz").get_data_dtype() == np.uint8


def test_partition_brats_keeps_labels(brats, tmp_path):
    folders = partition_dataset(brats, tmp_path / "split", modalities=("t1gd",), progress=False)
    assert set(folders) == {"t1gd", "server"}
    labels = SiteLabels(folders["server"], SIZE)
    assert labels.convention == "brats"
    pid = labels.patient_ids[0]
    stored = np.asarray(nib.load(folders["server"] / "labels" / f"{pid}.nii.gz").dataobj)
    assert set(np.unique(stored)) <= {0, 1, 2, 4} and 4 in stored
    site = SiteImages(folders["t1gd"], SIZE)
    site.check()
    assert site.get(pid).shape == (1, SIZE, SIZE, SIZE)


def test_split_patients():
    ids = [f"P{i:02d}" for i in range(10)]
    train, val = split_patients(ids, val_fraction=0.3, seed=0)
    assert len(val) == 3 and sorted(train + val) == ids and not set(train) & set(val)
    assert split_patients(ids[::-1], 0.3, 0) == (train, val)  # input order does not matter
    assert split_patients(ids, 0.3, 1) != (train, val)
    assert len(split_patients(ids, seed=0, n_val=4)[1]) == 4
    assert split_patients(ids, 0.0, 0) == (ids, [])
    with pytest.raises(ValueError):
        split_patients(ids, seed=0, n_val=11)
    with pytest.raises(ValueError):
        split_patients(["a", "a"], 0.5, 0)


def test_brats2023_layout_found_and_equal_to_msd(msd, brats2023, tmp_path):
    cases = find_cases(brats2023)
    assert [c.patient_id for c in cases] == [f"BraTS-GLI-0000{i}-000" for i in range(3)]
    assert {c.convention for c in cases} == {"brats2023"} and sorted(cases[0].images) == sorted(MODALITIES)
    assert cases[-1].label is None  # validation-style folder: images only
    for msd_case, case in zip(find_cases(msd)[:2], cases[:2]):
        a, b = load_case(msd_case, SIZE), load_case(case, SIZE)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # The unlabelled case goes to the sites only; the server keeps the BraTS 2023 labels as they are.
    folders = partition_dataset(brats2023, tmp_path / "split", progress=False)
    labels = SiteLabels(folders["server"], SIZE)
    assert labels.convention == "brats2023" and labels.patient_ids == [c.patient_id for c in cases[:2]]
    stored = np.asarray(nib.load(folders["server"] / "labels" / f"{cases[0].patient_id}.nii.gz").dataobj)
    assert set(np.unique(stored)) <= {0, 1, 2, 3} and 3 in stored
    assert SiteImages(folders["t2w"], SIZE).patient_ids == [c.patient_id for c in cases]


def test_msd_test_images_are_unlabelled_cases(msd, tmp_path):
    root = tmp_path / "msd"
    shutil.copytree(msd, root)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "imagesTs").mkdir()
    shutil.move(root / "imagesTr" / "BRATS_003.nii.gz", root / "imagesTs" / "BRATS_003.nii.gz")
    meta["training"], meta["test"] = meta["training"][:2], ["./imagesTs/BRATS_003.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    cases = find_cases(root)
    assert [(c.patient_id, c.label is None) for c in cases] == [("BRATS_001", False), ("BRATS_002", False),
                                                                ("BRATS_003", True)]
    assert "label" not in load_case(cases[2], SIZE)
    folders = partition_dataset(root, tmp_path / "split", modalities=("flair",), progress=False)
    assert SiteImages(folders["flair"], SIZE).patient_ids == ["BRATS_001", "BRATS_002", "BRATS_003"]
    assert SiteLabels(folders["server"], SIZE).patient_ids == ["BRATS_001", "BRATS_002"]


def test_one_release_per_folder(brats, brats2023, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(brats, root)
    shutil.copytree(brats2023 / "BraTS-GLI-00000-000", root / "BraTS-GLI-00000-000")
    with pytest.raises(DataError, match="several releases"):
        find_cases(root)
