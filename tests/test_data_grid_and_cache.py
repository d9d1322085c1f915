"""Grids of three sides (e.g. BraTS's 240 x 240 x 155) through every data function, and sites that read headers at
init and volumes lazily into a bounded cache, ahead of use on one background thread."""

import gzip
import json
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from split_unet.data import (
    REGION_NAMES,
    ImageRef,
    SiteImages,
    SiteLabels,
    grid_shape,
    label_to_source,
    load_image,
    load_label,
    read_label,
    regions,
    site_data,
    write_nifti,
)
from split_unet.data import readers
from split_unet.data.check import check_sites
from split_unet.errors import DataError

pytestmark = pytest.mark.unit

# RAS (MSD) and the LPS-style affine of BraTS (x and y reversed), both with offsets, 1 mm voxels.
AFFINES = {"ras": np.array([[1.0, 0, 0, -20], [0, 1, 0, -30], [0, 0, 1, 5], [0, 0, 0, 1]]),
           "lps": np.array([[-1.0, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])}


def _label_map(shape, seed=0) -> np.ndarray:
    """Nested MSD labels: oedema (1) around a core (2) with an enhancing part (3), off centre so flips show."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).astype(np.float32)
    centre = np.array(shape) * np.array([0.4, 0.55, 0.6])
    radius = np.linalg.norm((grid - centre) / (np.array(shape) / 4), axis=-1)
    label = np.zeros(shape, np.uint8)
    label[radius < 1.0] = 1
    label[radius < 0.6] = 2
    label[(radius < 0.6) & (grid[..., 0] > centre[0])] = 3
    return label


def _dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _site(folder, files: dict, modality: str | None = "t1w"):
    """A site folder (``modality``) or the server's (None) listing ``files`` {patient: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    datalist = {"site": modality or "server", "patients": {pid: str(path) for pid, path in files.items()}}
    datalist.update({"modality": modality} if modality else {"convention": "msd"})
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder


def _images(tmp_path, n, shape=(20, 18, 14)) -> dict:
    rng = np.random.default_rng(0)
    return {f"P{i}": write_nifti(rng.random(shape, dtype=np.float32) + i, AFFINES["ras"], tmp_path / f"P{i}.nii.gz")
            for i in range(n)}


def test_grid_shape():
    assert grid_shape(64) == (64, 64, 64) and grid_shape([240, 240, 155]) == (240, 240, 155)
    assert grid_shape(np.int64(8)) == (8, 8, 8)
    for bad in (0, (1, 2), (240, 0, 155), True, (2.0, 2, 2)):
        with pytest.raises(ValueError, match="grid size"):
            grid_shape(bad)
    assert readers.max_source_voxels((300, 300, 200)) == 8 * 300 * 300 * 200 and readers.max_source_voxels() == 256**3


# Grids for a (40, 36, 30) source: the source's own shape, pad x / crop y / pad z, crop everything.
@pytest.mark.parametrize("orientation", sorted(AFFINES))
@pytest.mark.parametrize("grid", [(40, 36, 30), (44, 32, 34), (24, 20, 16)])
@pytest.mark.parametrize("spacing", [None, 1.0])
def test_label_round_trip_on_a_non_cube_grid(tmp_path, orientation, grid, spacing):
    source = _label_map((40, 36, 30))
    affine = AFFINES[orientation]
    path = write_nifti(source, affine, tmp_path / "seg.nii.gz")
    on_grid = load_label(path, grid, "msd", spacing)
    assert on_grid.shape == (3, *grid) and on_grid.dtype == np.float32
    assert load_label(path, grid, "msd", spacing, dtype=np.uint8).dtype == np.uint8
    # Labels from region masks: ET -> 3, TC \ ET -> 2, WT \ TC -> 1.
    label = on_grid.sum(0).astype(np.uint8)
    back = label_to_source(label, affine, source.shape, spacing)
    assert back.shape == source.shape
    # What the grid keeps of the source, mapped back the same way: the round trip is exact there, zero elsewhere.
    kept = label_to_source(np.ones(grid, np.uint8), affine, source.shape, spacing).astype(bool)
    assert kept.all() == all(g >= s for g, s in zip(grid, source.shape))
    np.testing.assert_array_equal(back, np.where(kept, source, 0))
    # And the grid itself is the source in RAS order (1 mm voxels either way), centred.
    if grid == source.shape:
        ras = source if orientation == "ras" else source[::-1, ::-1]
        np.testing.assert_array_equal(label, ras)


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_brats_shape_at_1mm_round_trips_exactly(tmp_path, orientation):
    shape = (240, 240, 155)
    source = _label_map(shape)
    affine = AFFINES[orientation]
    path = write_nifti(source, affine, tmp_path / "seg.nii.gz")
    truth, _ = read_label(path, "msd")
    masks = load_label(path, shape, "msd", spacing=1.0, dtype=np.uint8)
    assert masks.shape == (3, *shape)
    back = label_to_source(masks.sum(0, dtype=np.uint8), affine, shape, spacing=1.0)
    np.testing.assert_array_equal(back, truth)
    for region in range(len(REGION_NAMES)):
        assert _dice(regions(back, "msd")[region], regions(truth, "msd")[region]) == 1.0


def test_images_sites_and_check_on_a_non_cube_grid(tmp_path):
    grid = (24, 16, 16)
    files = _images(tmp_path, 2)
    seg = {pid: write_nifti(_label_map((20, 18, 14)), AFFINES["ras"], tmp_path / f"seg_{pid}.nii.gz") for pid in files}
    images = SiteImages(_site(tmp_path / "sites" / "t1w", files), grid, 1.0)
    labels = SiteLabels(_site(tmp_path / "sites" / "server", seg, modality=None), list(grid), 1.0)
    assert images.batch(["P0", "P1"]).shape == (2, 1, *grid) and labels.batch(["P1"]).shape == (1, 3, *grid)
    np.testing.assert_array_equal(images.get("P0"), load_image(ImageRef(files["P0"]), grid, 1.0))
    loaded, problems, coverage = check_sites(tmp_path / "sites", grid, 1.0)
    assert loaded == {"server": 2, "t1w": 2} and problems == []
    # The grid pads every axis but y (16 of 18 voxels): all label voxels kept, 16/18 of the brain.
    assert coverage["server"].share == 1.0 and coverage["t1w"].share == pytest.approx(16 / 18)


@pytest.fixture
def reads(monkeypatch):
    """Data reads per file: every volume a site loads goes through ``readers.read_volume``."""
    counts: dict[str, int] = {}
    real = readers.read_volume

    def counted(ref, **kwargs):
        counts[ref.path.stem.split(".")[0]] = counts.get(ref.path.stem.split(".")[0], 0) + 1
        return real(ref, **kwargs)

    monkeypatch.setattr(readers, "read_volume", counted)
    return counts


def test_init_and_check_read_headers_only(tmp_path, monkeypatch):
    files = _images(tmp_path, 6)
    site = SiteImages(_site(tmp_path / "t1w", files), (16, 16, 16))

    def no_data(*args, **kwargs):
        raise AssertionError("volume data read")

    monkeypatch.setattr(readers, "read_volume", no_data)
    site.check()
    for pid in site.patient_ids:
        affine, shape = site.geometry(pid)
        assert shape == (20, 18, 14) and np.allclose(affine, AFFINES["ras"])
    assert site.cached_ids() == []
    # The geometry stays known without the files' headers (the server asks per validation step).
    monkeypatch.setattr(nib, "load", no_data)
    assert site.grid_spacing("P3") == (1.0, 1.0, 1.0)
    with pytest.raises(AssertionError, match="volume data read"):
        site.batch(["P0"])


def test_check_refuses_from_the_header(tmp_path):
    four_d = write_nifti(np.zeros((8, 8, 8, 2), np.float32), np.eye(4), tmp_path / "P1.nii.gz")
    site = SiteImages(_site(tmp_path / "t1w", {"P0": _images(tmp_path, 1)["P0"], "P1": four_d}), 16)
    with pytest.raises(DataError, match="expected a 3D volume") as info:
        site.check()
    assert (info.value.site, info.value.patient, info.value.field) == ("t1w", "P1", str(four_d))


def test_the_cache_holds_at_most_cache_cases(tmp_path, reads):
    files = _images(tmp_path, 5)
    site = SiteImages(_site(tmp_path / "t1w", files), 16, cache_cases=2)
    site.check()
    for pid in ["P0", "P1", "P0", "P2", "P3", "P0", "P4"]:
        site.get(pid)
        assert len(site.cached_ids()) <= 2
    # Least recently used goes first: P0 (used again) outlived P1 and P2.
    assert site.cached_ids() == ["P0", "P4"]
    assert reads == {"P0": 2, "P1": 1, "P2": 1, "P3": 1, "P4": 1}
    unbounded = SiteImages(_site(tmp_path / "all", files), 16)
    unbounded.batch(unbounded.patient_ids)
    assert unbounded.cached_ids() == unbounded.patient_ids


def test_volume_is_the_cached_array_read_only_and_labels_are_cached_as_uint8(tmp_path):
    seg = {"P0": write_nifti(_label_map((20, 18, 14)), AFFINES["lps"], tmp_path / "P0.nii.gz")}
    labels = SiteLabels(_site(tmp_path / "server", seg, modality=None), 16)
    cached = labels.volume("P0")
    assert cached.dtype == np.uint8 and cached.shape == (3, 16, 16, 16) and labels.volume("P0") is cached
    with pytest.raises(ValueError, match="read-only"):
        cached[0, 0, 0, 0] = 1
    as_float = labels.get("P0")
    assert as_float.dtype == np.float32 and as_float.flags.writeable
    np.testing.assert_array_equal(as_float, cached)
    np.testing.assert_array_equal(labels.batch(["P0"])[0], load_label(seg["P0"], 16, "msd"))


def test_prefetch_then_batch_loads_each_case_once(tmp_path, reads, monkeypatch):
    files = _images(tmp_path, 4)
    site = SiteImages(_site(tmp_path / "t1w", files), 16, cache_cases=4)
    expected = SiteImages(_site(tmp_path / "ref", files), 16).batch(["P2", "P0"])
    reads.clear()
    # A slow loader, so the batch comes while the prefetch is still under way.
    real, threads = site_data.load_image, set()

    def slow(*args, **kwargs):
        threads.add(threading.current_thread().name)
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(site_data, "load_image", slow)
    site.prefetch(["P0", "P2", "P3"])
    site.prefetch(["P0"])  # already on its way: not queued again
    np.testing.assert_array_equal(site.batch(["P2", "P0"]), expected)
    site.batch(["P3", "P0"])
    assert reads == {"P0": 1, "P2": 1, "P3": 1}
    assert all(name.startswith("prefetch-t1w") for name in threads)
    site.prefetch(["P3"])  # cached: nothing to do
    with pytest.raises(DataError, match="unknown patient"):
        site.prefetch(["P1", "P9"])
    time.sleep(1.0)  # had P1 been queued, it would have loaded by now (0.2 s + a 20 x 18 x 14 volume)
    assert reads == {"P0": 1, "P2": 1, "P3": 1} and "P1" not in site.cached_ids()  # the refusal started nothing


def test_close_ends_the_prefetch_thread_and_drops_queued_loads(tmp_path, reads, monkeypatch):
    files = _images(tmp_path, 3)
    site = SiteImages(_site(tmp_path / "t1w", files), 16)
    real = site_data.load_image

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(site_data, "load_image", slow)
    reads.clear()
    site.prefetch(["P0", "P1", "P2"])
    site.close()  # waits for the load under way, drops the rest
    assert not any(t.name.startswith("prefetch-t1w") for t in threading.enumerate())
    assert reads.get("P2", 0) == 0
    site.batch(["P2"])  # a dropped prefetch is loaded by the batch itself
    assert reads["P2"] == 1


def _truncated(path):
    """A gzip NIfTI cut in its data: the header is intact (and claims no more than gzip could hold)."""
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with gzip.open(path) as stream:
        stream.read(348)  # the header still reads
    return path


@pytest.mark.parametrize("prefetched", [False, True])
def test_a_corrupt_file_passes_check_and_fails_at_batch_naming_the_patient(tmp_path, prefetched):
    files = _images(tmp_path, 3, shape=(40, 40, 40))
    _truncated(files["P1"])
    site = SiteImages(_site(tmp_path / "t1w", files), 16, cache_cases=2)
    site.check()
    if prefetched:
        site.prefetch(["P0", "P1"])
    assert site.batch(["P0"]).shape == (1, 1, 16, 16, 16)
    for _ in range(2):  # the same error again: nothing bad was cached
        with pytest.raises(DataError, match="cannot read NIfTI") as info:
            site.batch(["P2", "P1"])
        assert (info.value.site, info.value.patient, info.value.field) == ("t1w", "P1", str(files["P1"]))
    assert "P1" not in site.cached_ids()
