"""`split-unet check`: every bad file named before a job starts; a re-oriented but co-registered file is fine."""

import json
import shutil

import nibabel as nib
import numpy as np

from split_unet.cli import main
from split_unet.data.check import check_sites

from helpers import TINY_SIZE


def test_check_names_corrupt_and_misregistered_files(tiny_data, tmp_path, capsys):
    sites = tmp_path / "sites"
    shutil.copytree(tiny_data[1], sites)
    loaded, problems, coverage = check_sites(sites, TINY_SIZE)
    assert (loaded, problems) == ({"flair": 8, "server": 8, "t1gd": 8, "t1w": 8, "t2w": 8}, [])
    assert all(c.share == 1.0 and c.total > 0 for c in coverage.values())  # the phantom cube is the grid

    # Re-oriented (LAS, data flipped to match): the same grid in the world, no problem.
    path = sites / "t1w" / "images" / "BRATS_001.nii.gz"
    image = nib.load(path)
    flipped = nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(),
                              image.affine @ nib.orientations.inv_ornt_aff([[0, -1], [1, 1], [2, 1]], image.shape))
    nib.save(flipped, path)
    assert check_sites(sites, TINY_SIZE)[1] == []

    # Truncated at one site, another shape at another, shifted at a third.
    truncated = sites / "flair" / "images" / "BRATS_002.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:300])
    reshaped = sites / "t2w" / "images" / "BRATS_003.nii.gz"
    image = nib.load(reshaped)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-2], image.affine), reshaped)
    shifted = sites / "t1gd" / "images" / "BRATS_004.nii.gz"
    image = nib.load(shifted)
    moved = image.affine.copy()
    moved[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), moved), shifted)

    loaded, problems, _ = check_sites(sites, TINY_SIZE)
    found = {(p.site, p.patient): p for p in problems}
    assert set(found) == {("flair", "BRATS_002"), ("t2w", "BRATS_003"), ("t1gd", "BRATS_004")}
    assert loaded["flair"] == 7 and "BRATS_002.nii.gz" in found["flair", "BRATS_002"].field
    assert "shape" in found["t2w", "BRATS_003"].message and found["t2w", "BRATS_003"].field == str(reshaped)
    assert "not co-registered" in found["t1gd", "BRATS_004"].message

    assert main(["check", "--sites", str(sites), "--size", str(TINY_SIZE)]) == 1
    output = capsys.readouterr().out
    assert "site 'flair', patient 'BRATS_002'" in output and "3 problems" in output


def test_check_blames_the_one_volume_of_another_shape_and_names_the_reference(tiny_data, tmp_path, capsys):
    sites = tmp_path / "sites"
    shutil.copytree(tiny_data[1], sites)
    odd = sites / "flair" / "images" / "BRATS_001.nii.gz"  # the first site: not the reference the others are blamed by
    image = nib.load(odd)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., :-2], image.affine), odd)
    _, problems, _ = check_sites(sites, TINY_SIZE)
    assert [(p.site, p.patient, p.field) for p in problems] == [("flair", "BRATS_001", str(odd))]
    assert problems[0].message == ("shape (32, 32, 30) differs from (32, 32, 32) of site 'server' "
                                   "(server/labels/BRATS_001.nii.gz)")


def test_check_wants_the_sites_label_convention_to_be_the_servers(tiny_data, tmp_path):
    sites = tmp_path / "sites"
    shutil.copytree(tiny_data[1], sites)
    datalist_path = sites / "t2w" / "datalist.json"
    datalist = json.loads(datalist_path.read_text())
    assert datalist["convention"] == "msd"
    datalist_path.write_text(json.dumps({**datalist, "convention": "brats2023"}))
    _, problems, _ = check_sites(sites, TINY_SIZE)
    assert [(p.site, p.field, p.message) for p in problems] == [
        ("t2w", f"{datalist_path}:convention", "label convention 'brats2023' differs from the server's 'msd'")]
