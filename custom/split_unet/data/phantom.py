"""BraTS-like phantoms on real anatomy, written in the Medical Segmentation Decathlon Task01 layout.

The anatomy is nilearn's ICBM152 2009a template (shipped offline with nilearn): grey and white
matter maps, CSF as what the brain mask leaves over. Each patient gets its own deformation, a nested
tumour (non-enhancing core, enhancing rim, oedema that spreads along white matter) with mass effect,
and four MRI contrasts with per-patient jitter, texture, bias field, blur and noise.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Resample, Resize, SpatialPad
from monai.transforms.utils import create_grid, generate_spatial_bounding_box
from scipy.ndimage import distance_transform_edt, gaussian_filter, zoom
from scipy.spatial.transform import Rotation
from scipy.special import expit

from split_unet.data.readers import write_nifti
from split_unet.data.regions import MODALITIES
from split_unet.files import write_atomically

__all__ = ["generate_patient", "generate_dataset", "generate_release", "anatomy", "RELEASES", "RELEASE_SHAPE"]

# Bump when the anatomy preprocessing changes, so stale disk caches are not reused.
_ANATOMY_VERSION = 2
# Margin (template voxels, 1 mm) around the brain's bounding box before padding it to a cube.
_MARGIN_MM = 4

# Mean intensity per modality (rows, MODALITIES order) and tissue class (columns): CSF, grey matter,
# white matter, oedema, non-enhancing core, enhancing tumour.
_CLASS_MEANS = np.array([
    #  csf   gm    wm    oed   net   et
    [0.15, 0.60, 0.48, 0.80, 0.70, 0.74],  # FLAIR: CSF dark, oedema bright
    [0.25, 0.55, 0.75, 0.55, 0.40, 0.52],  # T1w: lesion dark
    [0.25, 0.55, 0.72, 0.55, 0.38, 0.98],  # T1gd: enhancing rim bright
    [1.00, 0.62, 0.45, 0.80, 0.86, 0.70],  # T2w: CSF and oedema bright
], dtype=np.float32)


def _cache_dir() -> Path | None:
    """Disk cache for the resampled anatomy: ``$SPLIT_UNET_CACHE`` (empty: none) or ~/.cache/split_unet."""
    value = os.environ.get("SPLIT_UNET_CACHE")
    if value == "":
        return None
    return Path(value) if value else Path.home() / ".cache" / "split_unet"


def _build_anatomy(size: int) -> tuple[np.ndarray, float]:
    """Tissue fractions of the ICBM152 template, cropped to the brain, padded to a cube, resampled."""
    # Imported here: nilearn is slow to import, and only the phantom needs it (the `phantom` extra; the command line
    # names the extra when it is missing).
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32) > 0
    # The GM/WM maps leak outside the brain mask; the mask wins, and CSF fills what is left inside.
    gm, wm = gm * brain, wm * brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    tissue = np.stack([csf, gm, wm])  # (3, 197, 233, 189), RAS, 1 mm

    start, end = generate_spatial_bounding_box(brain[None], margin=_MARGIN_MM, allow_smaller=True)
    tissue = tissue[(slice(None), *(slice(s, e) for s, e in zip(start, end)))]
    side = max(tissue.shape[1:])
    tissue = SpatialPad((side,) * 3)(tissue)
    # Shrinking: "area" averages the template voxels under each target voxel, i.e. partial-volume fractions.
    tissue = Resize((size,) * 3, mode="area" if size <= side else "trilinear")(tissue)
    return np.clip(np.asarray(tissue, dtype=np.float32), 0.0, 1.0), side / size


@functools.lru_cache(maxsize=4)
def anatomy(size: int) -> tuple[np.ndarray, float]:
    """ICBM152 tissue fractions (CSF, GM, WM) on a ``size``^3 cube around the brain.

    Cached in memory and, unless ``$SPLIT_UNET_CACHE`` is set to an empty string, on disk.

    Returns:
        ``(tissue, spacing)``: float32 array of shape ``(3, size, size, size)`` in RAS axis order whose
        channels sum to the brain fraction of each voxel, and the voxel spacing in mm.
    """
    cache = _cache_dir()
    path = cache / f"mni152_tissue_v{_ANATOMY_VERSION}_{size}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path) as stored:
            return stored["tissue"], float(stored["spacing"])
    tissue, spacing = _build_anatomy(size)
    if path is not None:
        try:  # concurrent sites may build the same cache file at once
            write_atomically(path, lambda file: np.savez(file, tissue=tissue, spacing=spacing))
        except OSError as err:
            warnings.warn(f"could not cache the phantom anatomy in {path.parent}: {err}", stacklevel=2)
    return tissue, spacing


@functools.lru_cache(maxsize=4)
def _tumour_sites(size: int) -> np.ndarray:
    """Voxel indices (K, 3) where a tumour may be centred: white matter, well inside the brain."""
    tissue, _ = anatomy(size)
    depth = distance_transform_edt(tissue.sum(0) > 0.5)
    sites = np.argwhere((tissue[2] > 0.8) & (depth > 0.15 * size))
    if len(sites) == 0:
        raise ValueError(f"size {size} is too coarse for the phantom: no voxel is deep white matter")
    return sites


def _smooth_noise(rng: np.random.Generator, channels: int, coarse: int, size: int) -> np.ndarray:
    """Smooth random fields, shape (channels, size, size, size), ~unit amplitude: coarse noise upsampled."""
    noise = rng.standard_normal((channels, coarse, coarse, coarse), dtype=np.float32)
    return np.asarray(Resize((size,) * 3, mode="trilinear", align_corners=True)(noise))


def generate_patient(index: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One phantom patient; it depends only on ``(seed, index)``.

    Args:
        index: patient number (0-based).
        size: edge length of the cubic volume in voxels.
        seed: dataset seed.

    Returns:
        ``(image, label)``: float32 ``(size, size, size, 4)`` in ``MODALITIES`` order (0 outside the brain)
        and uint8 ``(size, size, size)`` MSD label (0 background, 1 oedema, 2 non-enhancing, 3 enhancing).
    """
    rng = np.random.default_rng([seed, index])
    tissue, _ = anatomy(size)
    shape = (size,) * 3

    # Patient -> atlas coordinates (voxels, centred): rotation, anisotropic scale, shift, elastic field.
    grid = create_grid(shape, dtype=np.float32)  # (4, *shape), homogeneous
    affine = np.eye(4, dtype=np.float32)
    rotation = Rotation.from_euler("xyz", rng.uniform(-0.15, 0.15, 3)).as_matrix()
    affine[:3, :3] = rotation @ np.diag(rng.uniform(0.88, 1.12, 3))
    affine[:3, 3] = rng.uniform(-0.03, 0.03, 3) * size
    atlas = np.einsum("ij,j...->i...", affine, grid)
    atlas[:3] += 0.02 * size * _smooth_noise(rng, 3, 5, size)

    # Tumour: ellipsoid in atlas space around a deep white-matter voxel, radius R (voxels).
    sites = _tumour_sites(size)
    centre = sites[rng.integers(len(sites))] - (size - 1) / 2.0
    radius = rng.uniform(0.07, 0.14) * size
    shear = Rotation.random(random_state=rng).as_matrix() @ np.diag(1.0 / rng.uniform(0.75, 1.3, 3))
    offset = atlas[:3] - centre.reshape(3, 1, 1, 1).astype(np.float32)
    distance = np.linalg.norm(np.einsum("ij,j...->i...", shear.astype(np.float32), offset), axis=0) / radius

    # Mass effect: each voxel samples the atlas closer to the centre, i.e. tissue is pushed outwards.
    # A Gaussian push of at most 0.6 R over a width of 2 R keeps the warp monotonic along every ray.
    r = np.maximum(np.linalg.norm(offset, axis=0), 1e-3)
    push = rng.uniform(0.2, 0.6) * radius * np.exp(-((r / (2.0 * radius)) ** 2))
    atlas[:3] -= offset / r * push
    # MONAI's Resample takes centred voxel coordinates, like create_grid.
    tissue = np.asarray(Resample(mode="bilinear", padding_mode="zeros")(tissue, torch.from_numpy(atlas)))
    brain = tissue.sum(0)

    # Soft (partial-volume) tumour compartments; labels are where a compartment holds the majority.
    noise = _smooth_noise(rng, 4, max(4, size // 5), size)  # core, rim, oedema, texture
    edge = 0.5 / radius  # ~half a voxel, in units of R
    core_level = distance + 0.3 * noise[0]
    core = expit((1.0 - core_level) / edge)
    enhancing = rng.random() > 0.15
    inner = expit((rng.uniform(0.45, 0.8) + 0.15 * noise[1] - core_level) / edge) if enhancing else core
    extent = rng.uniform(1.5, 2.4)
    white = np.clip((tissue[2] / np.maximum(brain, 1e-6) - 0.3) / 0.4, 0.0, 1.0)
    allowed = np.maximum(white, expit((1.25 - distance) / edge))  # along white matter, or near the core
    oedema = (1.0 - core) * expit((extent - distance - 0.35 * noise[2]) / edge) * allowed

    inside = brain > 0.5
    label = np.zeros(shape, dtype=np.uint8)
    label[inside & (core + oedema > 0.5)] = 1
    label[inside & (core > 0.5)] = 3
    label[inside & (inner > 0.5)] = 2

    # Intensities: partial-volume mix of jittered class means; texture inside the tumour.
    weights = np.stack([*(tissue * (1.0 - core - oedema)), oedema * brain, inner * brain, (core - inner) * brain])
    texture = 1.0 + 0.12 * noise[3]
    weights[3:] *= texture
    means = _CLASS_MEANS * rng.normal(1.0, 0.07, _CLASS_MEANS.shape).astype(np.float32)
    image = np.einsum("mc,c...->m...", means, weights)
    # scipy, not MONAI's GaussianSmooth: torch's convolution result depends on the thread count, and the
    # phantom must be byte-identical on every machine.
    blur = rng.uniform(0.4, 0.8)
    image = gaussian_filter(image, sigma=(0.0, blur, blur, blur))
    image *= np.exp(rng.uniform(0.05, 0.2) * _smooth_noise(rng, 4, 3, size))  # bias field per modality
    image += rng.uniform(0.02, 0.05) * rng.standard_normal(image.shape, dtype=np.float32)
    image *= rng.uniform(300.0, 3000.0) * inside  # global gain; skull-stripped background is exactly 0
    return np.ascontiguousarray(np.moveaxis(image, 0, -1), dtype=np.float32), label


def generate_dataset(out_dir: str | os.PathLike, n_patients: int, size: int = 64, seed: int = 0,
                     progress: bool = True) -> Path:
    """Write ``n_patients`` phantoms in the MSD Task01 layout.

    Layout: ``imagesTr/BRATS_001.nii.gz`` (float32, ``(size, size, size, 4)``, channels FLAIR, T1w, T1gd,
    T2w), ``labelsTr/BRATS_001.nii.gz`` (uint8, ``(size, size, size)``) and ``dataset.json``. The affine is
    RAS with isotropic spacing so that the cube spans the template brain (~2.9 mm at size 64). The same
    seed gives byte-identical files (nibabel writes gzip with a fixed mtime).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    _, spacing = anatomy(size)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2.0  # centre of the cube at the origin
    training = []
    for index in range(n_patients):
        name = f"BRATS_{index + 1:03d}.nii.gz"
        image, label = generate_patient(index, size, seed)
        for data, folder in ((image, "imagesTr"), (label, "labelsTr")):
            write_nifti(data, affine, out / folder / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        if progress:
            print(f"phantom {index + 1}/{n_patients}", flush=True)
    description = {
        "name": "BRATS phantom",
        "description": "Synthetic gliomas on the ICBM152 2009a template (split_unet.data.phantom)",
        "reference": "Medical Segmentation Decathlon Task01 layout; anatomy from nilearn's MNI152 template",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": n_patients,
        "numTest": 0,
        "training": training,
        "test": [],
        "generator": {"size": size, "seed": seed, "spacing_mm": spacing},
    }
    (out / "dataset.json").write_text(json.dumps(description, indent=4) + "\n")
    return out


#: Layouts :func:`generate_release` writes, named after the releases whose on-disk conventions they copy.
RELEASES = ("msd", "brats2021", "brats2023")
#: Shape of every real MSD Task01 / BraTS 2021 / BraTS 2023 volume (1 mm isotropic).
RELEASE_SHAPE = (240, 240, 155)
# MSD label value -> BraTS 2021 (1 NCR, 2 ED, 4 ET) and BraTS 2023 (1 NETC, 2 SNFH, 3 ET) label value.
_MSD_TO = {"brats2021": np.array([0, 2, 1, 4], np.uint8), "brats2023": np.array([0, 2, 1, 3], np.uint8)}
_BRATS_FILES = {"brats2021": ("BraTS2021_{:05d}", "_", ("flair", "t1", "t1ce", "t2")),
                "brats2023": ("BraTS-GLI-{:05d}-000", "-", ("t2f", "t1n", "t1c", "t2w"))}  # MODALITIES order


def _to_release_grid(volume: np.ndarray, spacing: float, order: int) -> np.ndarray:
    """A phantom volume (cube of ``spacing`` mm voxels, RAS) at 1 mm, centred in ``RELEASE_SHAPE``."""
    resampled = zoom(volume, spacing, order=order, grid_mode=True, mode="grid-constant")
    out = np.zeros(RELEASE_SHAPE, volume.dtype)
    source, target = [], []
    for have, want in zip(resampled.shape, RELEASE_SHAPE):
        start = (have - want) // 2  # > 0: crop, < 0: pad
        source.append(slice(max(start, 0), max(start, 0) + min(have, want)))
        target.append(slice(max(-start, 0), max(-start, 0) + min(have, want)))
    out[tuple(target)] = resampled[tuple(source)]
    return out


def generate_release(out_dir: str | os.PathLike, release: str, n_patients: int, seed: int = 0,
                     unlabelled: int = 0, size: int = 64) -> Path:
    """Phantoms in the exact on-disk conventions of a real release, at its geometry (240 x 240 x 155, 1 mm).

    Each patient is :func:`generate_patient` at ``size`` (the template brain, ~189 mm), resampled to 1 mm and
    centred in the release's volume, so the brain and tumour sizes are realistic. Conventions copied:

    - ``msd`` (Task01): ``imagesTr/BRATS_001.nii.gz`` 4D float32 ``(240, 240, 155, 4)`` (FLAIR, T1w, t1gd,
      T2w), ``labelsTr`` uint8 (1 oedema, 2 non-enhancing, 3 enhancing), RAS affine, ``dataset.json`` with
      ``./imagesTr/...`` paths, macOS ``._`` junk files beside the volumes; unlabelled cases in ``imagesTs``.
    - ``brats2021``: ``BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz``, int16 images, LPS-style
      affine ``diag(-1, -1, 1)`` with offsets, labels 1 NCR, 2 ED, 4 ET.
    - ``brats2023``: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``, int16, the same
      affine, labels 1 NETC, 2 SNFH, 3 ET.

    The last ``unlabelled`` patients have no label (MSD ``imagesTs``; BraTS folders without ``seg``, as in the
    validation releases).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    if release not in RELEASES:
        raise ValueError(f"unknown release {release!r}; expected one of {list(RELEASES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, spacing = anatomy(size)
    # Voxel (i, j, k) of the RAS-ordered volume; BraTS stores x and y reversed under an LPS-style affine.
    ras = np.eye(4)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(RELEASE_SHAPE[:2]) - 1
    if release != "msd":
        ras[0, 3] = -(RELEASE_SHAPE[0] - 1)  # BraTS: [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0]]
    affine = ras if release == "msd" else ras @ flip
    training, test = [], []
    for index in range(n_patients):
        phantom, phantom_label = generate_patient(index, size, seed)
        image = np.stack([_to_release_grid(phantom[..., c], spacing, order=1) for c in range(len(MODALITIES))], -1)
        image[image < 0] = 0  # interpolation overshoot must not turn the background non-zero
        label = _to_release_grid(phantom_label, spacing, order=0)
        labelled = index < n_patients - unlabelled
        if release == "msd":
            name = f"BRATS_{index + 1:03d}.nii.gz"
            images, labels = ("imagesTr", "labelsTr") if labelled else ("imagesTs", None)
            write_nifti(image.astype(np.float32), affine, out / images / name)
            (out / images / f"._{name}").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble")
            if labels:
                write_nifti(label, affine, out / labels / name)
                training.append({"image": f"./{images}/{name}", "label": f"./{labels}/{name}"})
            else:
                test.append(f"./{images}/{name}")
            continue
        pattern, separator, suffixes = _BRATS_FILES[release]
        pid = pattern.format(index)
        stored = np.rint(image[::-1, ::-1]).astype(np.int16)  # LPS voxel order
        for channel, suffix in enumerate(suffixes):
            path = out / pid / f"{pid}{separator}{suffix}.nii.gz"
            write_nifti(np.ascontiguousarray(stored[..., channel]), affine, path)
        if labelled:
            seg = np.ascontiguousarray(_MSD_TO[release][label][::-1, ::-1])
            write_nifti(seg, affine, out / pid / f"{pid}{separator}seg.nii.gz")
    if release == "msd":
        description = {
            "name": "BRATS", "tensorImageSize": "4D",
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": len(training), "numTest": len(test), "training": training, "test": test,
            "generator": {"phantom size": size, "seed": seed},
        }
        (out / "dataset.json").write_text(json.dumps(description, indent=4) + "\n")
    return out
