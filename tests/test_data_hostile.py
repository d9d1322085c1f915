"""Hostile data (``split_unet.data``): ids that are not plain names, NIfTI headers refused before any data is read
(allocating no more than 100 MB), degenerate affines and failing transforms, each a data error naming site, patient
and file."""

import gzip
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import TINY_SIZE
from hostile import MB

from split_unet import cli
from split_unet.data import SiteImages, partition_dataset, readers
from split_unet.data.check import check_sites
from split_unet.errors import DataError

pytestmark = pytest.mark.unit


def test_a_datalist_id_that_escapes_is_refused_and_check_lists_it(tiny_data, tmp_path):
    _, sites = tiny_data
    shutil.copytree(sites / "flair", tmp_path / "sites" / "flair")
    datalist_path = tmp_path / "sites" / "flair" / "datalist.json"
    datalist = json.loads(datalist_path.read_text())
    datalist["patients"]["../../../ESCAPED"] = datalist["patients"]["BRATS_001"]
    datalist_path.write_text(json.dumps(datalist))
    with pytest.raises(DataError, match=r"site 'flair', field '.*datalist.json:patients': patient id '../../../ESCAPED'"):
        SiteImages(tmp_path / "sites" / "flair", TINY_SIZE)
    _, problems, _ = check_sites(tmp_path / "sites", TINY_SIZE)
    assert [(p.site, "ESCAPED" in p.message) for p in problems] == [("flair", True)]


def test_partition_refuses_a_case_whose_id_is_not_a_plain_name(tiny_data, tmp_path):
    msd, _ = tiny_data
    # (A name starting with '.' is skipped as hidden, as the macOS '._' files of the real releases are.)
    case = tmp_path / "brats" / "bad$id"
    case.mkdir(parents=True)
    shutil.copyfile(msd / "labelsTr" / "BRATS_001.nii.gz", case / "bad$id_seg.nii.gz")
    with pytest.raises(DataError, match=r"patient id 'bad\$id' is not"):
        partition_dataset(tmp_path / "brats", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _nifti_bytes(shape, dtype=np.float32, srows=None, data: bytes = b"") -> bytes:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    header["qform_code"], header["sform_code"] = 0, 1
    for name, row in zip(("srow_x", "srow_y", "srow_z"), srows if srows is not None else np.eye(4)[:3]):
        header[name] = row
    return header.binaryblock + b"\0" * 4 + data


MEASURE = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    from pathlib import Path
    from split_unet.data.readers import ImageRef, load_image
    from split_unet.errors import DataError
    tracemalloc.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_image(ImageRef(Path(sys.argv[1])), int(sys.argv[2]), site="flair", patient="P1")
        error = None
    except DataError as err:
        error = str(err)
    peak = tracemalloc.get_traced_memory()[1]
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"error": error, "traced_peak": peak, "rss_growth": grown}))
""")


def _measured_read(path: Path, grid: int) -> dict:
    """Read ``path`` for a ``grid``^3 job in a fresh process (its imports done first): the error, the peak of
    Python/numpy allocations (tracemalloc) and the growth of the peak resident memory (ru_maxrss)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(grid)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _zeros_volume_gz(path: Path, side: int) -> None:
    """A real, valid ``side``^3 uint8 volume of zeros, written in chunks (the test never holds it in memory)."""
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(_nifti_bytes((side,) * 3, np.uint8))
        chunk = bytes(2**22)
        for _ in range(side**3 // len(chunk)):
            out.write(chunk)


@pytest.mark.parametrize("name, grid, expected", [
    ("claims_1024_cubed.nii.gz", 32, "more than the 16777216 allowed"),
    ("claims_200_cubed.nii", 32, "header declares 32000352 bytes, but the file has 352"),
    ("claims_250_cubed.nii.gz", 32, "more than a"),
    ("real_512_cubed.nii.gz", 32, "has 134217728 voxels, more than the 16777216 allowed"),
])
def test_a_hostile_header_is_refused_before_its_data_is_read(tmp_path, name, grid, expected, record_property):
    path = tmp_path / name
    if name.startswith("claims_1024"):
        path.write_bytes(gzip.compress(_nifti_bytes((1024,) * 3)))
    elif name.startswith("claims_200"):
        path.write_bytes(_nifti_bytes((200,) * 3))
    elif name.startswith("claims_250"):
        path.write_bytes(gzip.compress(_nifti_bytes((250,) * 3)))
    else:
        _zeros_volume_gz(path, 512)
    measured = _measured_read(path, grid)
    record_property("allocation", measured)
    print(name, path.stat().st_size, "bytes:", measured)
    assert measured["error"] is not None and expected in measured["error"], measured
    assert f"site 'flair', patient 'P1', field '{path}'" in measured["error"]
    assert measured["traced_peak"] < 100 * MB and measured["rss_growth"] < 100 * MB, measured


def test_the_bound_admits_real_brain_geometry():
    assert 240 * 240 * 155 <= readers.max_source_voxels(32) < 512**3
    assert readers.max_source_voxels(512) == 8 * 512**3


def _write(path: Path, content: bytes) -> None:
    path.write_bytes(gzip.compress(content))


def test_zero_dimension_singular_or_nan_affine_are_data_errors_and_check_lists_them_all(tiny_data, tmp_path,
                                                                                        capsys):
    _, sites = tiny_data
    shutil.copytree(sites / "flair", tmp_path / "sites" / "flair")
    images = tmp_path / "sites" / "flair" / "images"
    volume = bytes(TINY_SIZE**3 * 4)
    _write(images / "BRATS_001.nii.gz", _nifti_bytes((TINY_SIZE, 0, TINY_SIZE)))
    _write(images / "BRATS_002.nii.gz", _nifti_bytes((TINY_SIZE,) * 3, srows=np.diag([1.0, 1.0, 0.0, 1.0])[:3],
                                                     data=volume))
    nan_rows = np.eye(4)[:3].copy()
    nan_rows[1, 1] = np.nan
    _write(images / "BRATS_003.nii.gz", _nifti_bytes((TINY_SIZE,) * 3, srows=nan_rows, data=volume))
    code = cli.main(["check", "--sites", str(tmp_path / "sites"), "--size", str(TINY_SIZE)])
    out = capsys.readouterr().out
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 3, out
    for patient, message in (("BRATS_001", "every dimension must be at least 1"),
                             ("BRATS_002", "affine must be finite and invertible"),
                             ("BRATS_003", "affine must be finite and invertible")):
        line = next(p for p in problems if f"patient '{patient}'" in p)
        assert f"site 'flair', patient '{patient}', field '{images / (patient + '.nii.gz')}'" in line and message in line


def test_a_transform_failure_is_a_data_error_naming_site_patient_and_file(tiny_data, monkeypatch):
    _, sites = tiny_data
    path = sites / "flair" / "images" / "BRATS_001.nii.gz"

    def broken(*args):
        raise RuntimeError("applying transform <monai.transforms.spatial.array.Spacing object>")
    monkeypatch.setattr(readers, "_grid_transform", lambda *args: broken)
    with pytest.raises(DataError, match=f"site 'flair', patient 'BRATS_001', field '{re.escape(str(path))}'"):
        readers.load_image(readers.ImageRef(path), TINY_SIZE, site="flair", patient="BRATS_001")

