"""Bad input gives a DataError that names the site, the patient and the file or field."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from split_unet.data import (
    ImageRef,
    SiteImages,
    SiteLabels,
    find_cases,
    load_case,
    load_image,
    load_label,
    partition_dataset,
)
from split_unet.errors import DataError

SIZE = 16


def _volume(path, shape=(12, 12, 12), value=1.0):
    nib.save(nib.Nifti1Image(np.full(shape, value, dtype=np.float32), np.eye(4)), path)
    return path


def _site(tmp_path, files, site="t1w"):
    """A site folder whose datalist lists ``files`` (patient -> relative path)."""
    folder = tmp_path / site
    (folder / "images").mkdir(parents=True)
    datalist = {"site": site, "modality": site, "patients": files}
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder


def _raises(call, *, patient, field, site=None):
    with pytest.raises(DataError) as info:
        call()
    error = info.value
    assert error.patient == patient and error.site == site
    assert str(field) in error.field and str(field) in str(error) and patient in str(error)
    if site is not None:
        assert site in str(error)
    return error


def test_missing_file(tmp_path):
    folder = _site(tmp_path, {"P1": "images/P1.nii.gz"})
    site = SiteImages(folder, SIZE)
    error = _raises(site.check, site="t1w", patient="P1", field=folder / "images" / "P1.nii.gz")
    assert "not found" in str(error)


def test_truncated_gzip(tmp_path):
    path = _volume(tmp_path / "P1.nii.gz", shape=(40, 40, 40))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    error = _raises(lambda: load_image(ImageRef(path), SIZE, site="flair", patient="P1"),
                    site="flair", patient="P1", field=path)
    assert "cannot read NIfTI" in str(error)


@pytest.mark.parametrize("name, content", [
    ("garbage.nii.gz", bytes(range(256)) * 8),
    ("garbage.nii", bytes(range(256)) * 8),
    ("bad_gzip_stream.nii.gz", gzip.compress(b"\0" * 400)[:30] + b"\xff" * 200),
])
def test_garbage_bytes(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    _raises(lambda: load_image(ImageRef(path), SIZE, site="t2w", patient="P7"), site="t2w", patient="P7", field=path)


def test_wrong_dimensionality(tmp_path):
    four_d = _volume(tmp_path / "four.nii.gz", shape=(8, 8, 8, 2))
    error = _raises(lambda: load_image(ImageRef(four_d), SIZE, patient="P2"), patient="P2", field=four_d)
    assert "expected a 3D volume" in str(error)
    _raises(lambda: load_image(ImageRef(four_d, channel=2), SIZE, patient="P2"), patient="P2", field=four_d)
    three_d = _volume(tmp_path / "three.nii.gz")
    _raises(lambda: load_image(ImageRef(three_d, channel=0), SIZE, patient="P2"), patient="P2", field=three_d)
    two_d = _volume(tmp_path / "two.nii.gz", shape=(8, 8))
    _raises(lambda: load_label(two_d, SIZE, "msd", site="server", patient="P2"), site="server", patient="P2",
            field=two_d)


def test_non_finite_values(tmp_path):
    path = _volume(tmp_path / "nan.nii.gz", value=np.nan)
    error = _raises(lambda: load_image(ImageRef(path), SIZE, patient="P3"), patient="P3", field=path)
    assert "NaN" in str(error)


def test_label_values_outside_convention(tmp_path):
    path = _volume(tmp_path / "seg.nii.gz", value=4.0)  # a BraTS label read as MSD
    error = _raises(lambda: load_label(path, SIZE, "msd", site="server", patient="P4"), site="server",
                    patient="P4", field=path)
    assert "[4.0]" in str(error) and "msd" in str(error)


def test_unknown_patient(tmp_path):
    folder = _site(tmp_path, {"P1": "images/P1.nii.gz"})
    _volume(folder / "images" / "P1.nii.gz")
    site = SiteImages(folder, SIZE)
    assert site.get("P1").shape == (1, SIZE, SIZE, SIZE)
    _raises(lambda: site.get("P9"), site="t1w", patient="P9", field="patient_id")
    _raises(lambda: site.batch(["P1", "P9"]), site="t1w", patient="P9", field="patient_id")


def test_missing_or_malformed_datalist(tmp_path):
    with pytest.raises(DataError) as info:
        SiteLabels(tmp_path / "server", SIZE, site="server")
    assert info.value.site == "server" and "datalist.json" in info.value.field
    assert "server" in str(info.value) and "not found" in str(info.value)

    folder = tmp_path / "flair"
    folder.mkdir()
    (folder / "datalist.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read JSON") as info:
        SiteImages(folder, SIZE)
    assert info.value.site == "flair"  # named after the folder until the datalist can name it
    (folder / "datalist.json").write_text(json.dumps({"site": "flair", "modality": "flair", "patients": ["P1"]}))
    with pytest.raises(DataError, match="'patients' must be a dict") as info:
        SiteImages(folder, SIZE)
    assert info.value.field.endswith("datalist.json:patients")
    (folder / "datalist.json").write_text(json.dumps({"site": "flair", "modality": "pet", "patients": {}}))
    with pytest.raises(DataError, match="unknown modality 'pet'"):
        SiteImages(folder, SIZE)


def test_layouts(tmp_path):
    with pytest.raises(DataError, match="neither an MSD"):
        find_cases(tmp_path)
    with pytest.raises(DataError, match="not found"):
        find_cases(tmp_path / "nowhere")
    # MSD: a file listed in dataset.json is missing.
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]}))
    error = _raises(lambda: find_cases(tmp_path), patient="BRATS_001", field=tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    assert "dataset.json" in str(error)


@pytest.mark.parametrize("pid, separator, present, t1gd", [
    ("BraTS2021_00001", "_", ("flair", "t1", "t2"), "t1ce"),
    ("BraTS-GLI-00001-000", "-", ("t2f", "t1n", "t2w"), "t1c"),
])
def test_brats_case_missing_modality_names_the_file(tmp_path, pid, separator, present, t1gd):
    case = tmp_path / pid
    case.mkdir()
    for suffix in present:
        _volume(case / f"{pid}{separator}{suffix}.nii.gz")
    _volume(case / f"{pid}{separator}seg.nii.gz", value=0.0)
    (found,) = find_cases(tmp_path)
    assert sorted(found.images) == ["flair", "t1w", "t2w"]
    expected = case / f"{pid}{separator}{t1gd}.nii.gz"  # the file the release names, not the modality
    error = _raises(lambda: partition_dataset(tmp_path, tmp_path / "out", progress=False), patient=pid,
                    field=expected)
    assert "t1gd" in str(error)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    _raises(lambda: load_case(found, SIZE), patient=pid, field=expected)
