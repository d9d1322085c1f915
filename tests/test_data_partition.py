"""`split-unet partition`: the release's label convention in every datalist, also for a validation folder in which
no case is labelled; every case checked (files, label values, one voxel grid) and a refused data set leaving
nothing behind."""

import gzip
import json

import numpy as np
import pytest

from split_unet.cli import main
from split_unet.data import DATALIST, SERVER_SITE, SiteImages, SiteLabels, find_cases, generate_release, \
    partition_dataset, write_nifti
from split_unet.data.check import check_sites
from split_unet.errors import DataError

pytestmark = pytest.mark.unit

SHAPE = (12, 12, 8)
# BraTS's LPS-style affine (diag(-1, -1, 1) with offsets), as the releases store their int16 volumes.
LPS = np.array([[-1.0, 0, 0, 0], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
SUFFIXES = ("t2f", "t1n", "t1c", "t2w")  # flair, t1w, t1gd, t2w in BraTS 2023 names


def _brats2023(root, patients=2):
    """A small BraTS 2023 folder: int16 images and uint8 labels (1 NETC, 2 SNFH, 3 ET) under the LPS affine."""
    rng = np.random.default_rng(0)
    for index in range(patients):
        pid = f"BraTS-GLI-{index:05d}-000"
        for suffix in SUFFIXES:
            write_nifti(rng.integers(1, 500, SHAPE).astype(np.int16), LPS, root / pid / f"{pid}-{suffix}.nii.gz")
        seg = np.zeros(SHAPE, np.uint8)
        seg[3:9, 3:9, 2:6], seg[4:8, 4:8, 3:5], seg[5, 5, 4] = 2, 3, 1
        write_nifti(seg, LPS, root / pid / f"{pid}-seg.nii.gz")
    return root


@pytest.mark.parametrize("release, convention", [("brats2023", "brats2023"), ("brats2021", "brats"), ("msd", "msd")])
def test_validation_folder_without_any_label_keeps_its_convention(tmp_path, capsys, release, convention):
    data = generate_release(tmp_path / "data", release, n_patients=1, unlabelled=1, size=24)
    (case,) = find_cases(data)
    assert case.label is None and case.convention == convention

    assert main(["partition", "--data", str(data), "--out", str(tmp_path / "sites")]) == 0
    assert f"0 labels, {convention} label values" in capsys.readouterr().out
    server = json.loads((tmp_path / "sites" / SERVER_SITE / DATALIST).read_text())
    assert server == {"site": SERVER_SITE, "convention": convention, "patients": {}}
    for modality in ("flair", "t1w", "t1gd", "t2w"):
        datalist = json.loads((tmp_path / "sites" / modality / DATALIST).read_text())
        assert datalist["convention"] == convention and list(datalist["patients"]) == [case.patient_id]
        assert SiteImages(tmp_path / "sites" / modality, 24).patient_ids == [case.patient_id]
    labels = SiteLabels(tmp_path / "sites" / SERVER_SITE, 24)
    assert labels.convention == convention and labels.patient_ids == []

    loaded, problems, _ = check_sites(tmp_path / "sites", 24)
    assert problems == [] and loaded == {"flair": 1, "server": 0, "t1gd": 1, "t1w": 1, "t2w": 1}
    assert main(["check", "--sites", str(tmp_path / "sites"), "--size", "24"]) == 0
    assert f"label convention (server datalist): {convention}" in capsys.readouterr().out


def _label_value_5(case):
    seg = case / f"{case.name}-seg.nii.gz"
    data = np.zeros(SHAPE, np.uint8)
    data[4, 4, 4] = 5
    write_nifti(data, LPS, seg)
    return seg, "label values [5.0] are not brats2023 labels"


def _truncated(case):
    path = case / f"{case.name}-t1c.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 200]))  # the header intact, the data short
    return path, "cannot read NIfTI"


def _short_t2f(case):
    path = case / f"{case.name}-t2f.nii.gz"
    write_nifti(np.ones(SHAPE[:2] + (SHAPE[2] - 1,), np.int16), LPS, path)
    return path, f"shape (12, 12, 7) differs from (12, 12, 8) of {case.name}-t1n.nii.gz"


def _shifted_t2w(case):
    path = case / f"{case.name}-t2w.nii.gz"
    moved = LPS.copy()
    moved[2, 3] += 3.0
    write_nifti(np.ones(SHAPE, np.int16), moved, path)
    return path, f"differs from {case.name}-t2f.nii.gz's (both (12, 12, 8)): not co-registered"


def _misplaced_label(case):
    path = case / f"{case.name}-seg.nii.gz"
    write_nifti(np.zeros(SHAPE[::-1], np.uint8), LPS, path)
    return path, "shape (8, 12, 12) differs from (12, 12, 8)"


def _missing_t1c(case):
    path = case / f"{case.name}-t1c.nii.gz"
    path.unlink()
    return path, f"no t1gd image: expected the file {case.name}-t1c.nii.gz"


@pytest.mark.parametrize("spoil", [_label_value_5, _truncated, _short_t2f, _shifted_t2w, _misplaced_label,
                                   _missing_t1c])
def test_a_refused_partition_leaves_nothing(tmp_path, spoil):
    data = _brats2023(tmp_path / "data")
    case = data / "BraTS-GLI-00001-000"  # the last case: the first one is already written when it is refused
    path, message = spoil(case)
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError) as info:
        partition_dataset(data, tmp_path / "out" / "sites", progress=False)
    assert info.value.patient == case.name and info.value.field == str(path), str(info.value)
    assert message in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []  # neither the sites folder nor its temporary folder


def test_partition_moves_the_folder_into_place_and_never_writes_into_a_full_one(tmp_path):
    data = _brats2023(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    folders = partition_dataset(data, tmp_path / "empty", progress=False)  # an empty folder is taken
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty"]
    assert json.loads((folders[SERVER_SITE] / DATALIST).read_text())["patients"] == {
        "BraTS-GLI-00000-000": "labels/BraTS-GLI-00000-000.nii.gz",
        "BraTS-GLI-00001-000": "labels/BraTS-GLI-00001-000.nii.gz"}
    before = sorted(str(p) for p in (tmp_path / "empty").rglob("*"))
    with pytest.raises(DataError, match="exists and is not empty"):
        partition_dataset(data, tmp_path / "empty", progress=False)
    assert sorted(str(p) for p in (tmp_path / "empty").rglob("*")) == before
