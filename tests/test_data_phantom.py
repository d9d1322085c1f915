"""Phantom generator: determinism, label content, modality contrasts, MSD layout."""

import json

import numpy as np
import pytest

from split_unet.data import MODALITIES, anatomy, find_cases, generate_dataset, generate_patient

SIZE = 32


@pytest.fixture(scope="module")
def patients():
    return [generate_patient(i, SIZE, seed=3) for i in range(4)]


def test_shapes_and_labels(patients):
    for image, label in patients:
        assert image.shape == (SIZE,) * 3 + (4,) and image.dtype == np.float32
        assert label.shape == (SIZE,) * 3 and label.dtype == np.uint8
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        assert (label > 0).sum() > 20 and np.isin(label, (2, 3)).sum() > 5  # a tumour with a core
        assert np.isfinite(image).all()
        # Skull-stripped: zero outside the brain in every channel, tumour inside it.
        brain = image[..., 0] != 0
        assert (image[~brain] == 0).all() and brain[label > 0].all()


def test_deterministic_per_patient(patients):
    again, label = generate_patient(2, SIZE, seed=3)
    np.testing.assert_array_equal(again, patients[2][0])
    np.testing.assert_array_equal(label, patients[2][1])
    other, _ = generate_patient(2, SIZE, seed=4)
    assert not np.array_equal(other, again)


def test_contrasts(patients):
    """Mean over patients of (lesion mean / normal-brain mean), per modality."""
    def ratio(channel, labels):
        values = [image[..., channel][np.isin(label, labels)].mean() / image[..., channel][
            (label == 0) & (image[..., channel] != 0)].mean() for image, label in patients]
        return float(np.mean(values))

    flair, t1w, t1gd, t2w = (MODALITIES.index(m) for m in ("flair", "t1w", "t1gd", "t2w"))
    assert ratio(flair, [1]) > 1.15  # oedema bright in FLAIR
    assert ratio(t2w, [1]) > 1.1  # and in T2
    assert ratio(t1w, [2]) < 0.92  # non-enhancing core dark in T1
    assert ratio(t1gd, [3]) > 1.1  # enhancing rim bright in T1gd (thin, so blurred at 32^3)
    assert ratio(t1gd, [3]) > ratio(t1w, [3]) + 0.2


def test_anatomy_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLIT_UNET_CACHE", str(tmp_path))
    anatomy.cache_clear()
    tissue, spacing = anatomy(SIZE)
    assert tissue.shape == (3, SIZE, SIZE, SIZE) and 4.0 < spacing < 7.0  # ~190 mm brain box over 32 voxels
    assert tissue.sum(0).max() <= 1.0 + 1e-5 and (tissue.sum(0) > 0.5).mean() > 0.2
    anatomy.cache_clear()
    cached, cached_spacing = anatomy(SIZE)  # from disk this time
    assert len(list(tmp_path.glob("*.npz"))) == 1
    np.testing.assert_array_equal(cached, tissue)
    assert cached_spacing == spacing


def test_dataset_layout_and_bytes(tmp_path, capsys):
    first = generate_dataset(tmp_path / "a", 2, size=SIZE, seed=5)
    assert "phantom 2/2" in capsys.readouterr().out
    longer = generate_dataset(tmp_path / "b", 3, size=SIZE, seed=5, progress=False)
    assert capsys.readouterr().out == ""
    for folder in ("imagesTr", "labelsTr"):
        for name in ("BRATS_001.nii.gz", "BRATS_002.nii.gz"):  # adding patients changes no earlier one
            assert (first / folder / name).read_bytes() == (longer / folder / name).read_bytes()

    meta = json.loads((longer / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["generator"]["seed"] == 5 and meta["generator"]["size"] == SIZE
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"]["3"] == "enhancing tumour"
    assert meta["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}

    cases = find_cases(longer)
    assert [c.patient_id for c in cases] == ["BRATS_001", "BRATS_002", "BRATS_003"]
    assert cases[0].convention == "msd" and [cases[0].images[m].channel for m in MODALITIES] == [0, 1, 2, 3]
