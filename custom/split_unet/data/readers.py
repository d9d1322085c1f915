"""Readers for MSD Task01, BraTS 2021 and BraTS 2023+ folders: case discovery, NIfTI reading and preprocessing.

Spatial preprocessing depends only on each file's affine and shape, never on its content, so the
server (which holds only labels) and every site (one modality each) land on the same voxel grid:
channel first, RAS orientation, optional resampling to an isotropic spacing, centre crop/pad to the grid's shape
(a cube, or three sides such as BraTS's 240 x 240 x 155).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    Orientation,
    ResizeWithPadOrCrop,
    Spacing,
)
from monai.utils import convert_to_numpy

from split_unet.data.regions import CONVENTIONS, MODALITIES, regions
from split_unet.errors import DataError
from split_unet.ids import is_integer

__all__ = ["is_scanner_affine", "ImageRef", "Case", "GridSize", "find_cases", "check_header", "grid_shape", "max_source_voxels",
           "read_header", "read_volume", "read_label", "load_image", "load_label", "load_case", "label_to_source",
           "grid_spacing", "write_nifti", "ras_affine", "same_grid", "odd_grids", "grid_mismatch"]

#: The common grid's size: a cube side, or three sides (voxels).
GridSize = int | Sequence[int]

# BraTS file layouts: (name separator, file suffix -> modality name, label convention). BraTS 2021:
# <id>/<id>_{flair,t1,t1ce,t2,seg}.nii.gz; BraTS 2023+: <id>/<id>-{t2f,t1n,t1c,t2w,seg}.nii.gz (ET moved to 3).
_BRATS_LAYOUTS = (
    ("_", {"flair": "flair", "t1": "t1w", "t1ce": "t1gd", "t2": "t2w"}, "brats"),
    ("-", {"t2f": "flair", "t1n": "t1w", "t1c": "t1gd", "t2w": "t2w"}, "brats2023"),
)
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class ImageRef:
    """One modality of one case: a 3D NIfTI file, or one channel of a 4D (MSD) file."""

    path: Path
    channel: int | None = None


@dataclass(frozen=True)
class Case:
    """The files of one patient; ``images`` is keyed by modality (``MODALITIES``) and may be partial.

    ``expected`` names, per modality, what the release holds it in (a BraTS file name, an MSD ``dataset.json``
    entry), so that a missing modality is reported as the file a user has to look for.
    """

    patient_id: str
    images: dict[str, ImageRef]
    label: Path | None
    convention: str
    expected: dict[str, str] = field(default_factory=dict)

    def image(self, modality: str) -> ImageRef:
        """The modality's image; a DataError naming the file the release expects if the case lacks it."""
        if modality not in self.images:
            expected = self.expected.get(modality, modality)
            what = "no 4D channel is named so in" if self.convention == "msd" else "expected the file"
            raise DataError(f"no {modality} image: {what} {Path(expected).name}", patient=self.patient_id,
                            field=expected)
        return self.images[modality]


def _strip_nifti_suffix(name: str) -> str:
    for extension in _NIFTI_EXTENSIONS:
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def read_json(path: Path, *, site: str | None = None) -> dict[str, Any]:
    """A JSON object from ``path`` (a datalist or ``dataset.json``); DataError naming the file otherwise."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError("file not found", site=site, field=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read JSON: {err}", site=site, field=str(path)) from err
    if not isinstance(content, dict):
        raise DataError("expected a JSON object", site=site, field=str(path))
    return content


def _find_msd(root: Path) -> list[Case]:
    """Cases of an MSD Task01 ``dataset.json``: "training" (image and label), "test" (image only, imagesTs)."""
    meta_path = root / "dataset.json"
    meta = read_json(meta_path)
    names = meta.get("modality", {str(i): m for i, m in enumerate(MODALITIES)})
    try:
        channels = {str(names[str(i)]).lower(): i for i in range(len(names))}
    except (KeyError, TypeError):
        raise DataError("'modality' must map '0', '1', ... to modality names", field=f"{meta_path}:modality") from None
    unknown = sorted(set(channels) - set(MODALITIES))
    if unknown:
        raise DataError(f"unknown modalities {unknown}; expected {list(MODALITIES)}", field=f"{meta_path}:modality")
    entries = meta.get("training", [])
    if not isinstance(entries, list):
        raise DataError("'training' must be a list of cases", field=f"{meta_path}:training")
    tests = meta.get("test", [])
    if not (isinstance(tests, list) and all(isinstance(entry, str) for entry in tests)):
        raise DataError("'test' must be a list of image paths", field=f"{meta_path}:test")
    if not entries and not tests:  # a validation release lists its cases under 'test' only
        raise DataError("neither 'training' nor 'test' lists a case", field=str(meta_path))
    cases = []
    for entry in entries:
        if not (isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in ("image", "label"))):
            raise DataError(f"training entry {entry!r} needs 'image' and 'label' paths", field=f"{meta_path}:training")
    for entry in [*entries, *({"image": path} for path in tests)]:
        image = root / entry["image"]
        label = root / entry["label"] if "label" in entry else None
        patient = _strip_nifti_suffix(image.name)
        for path in (image, label):
            if path is not None and not path.is_file():
                raise DataError(f"file listed in {meta_path.name} not found", patient=patient, field=str(path))
        images = {modality: ImageRef(image, channel) for modality, channel in channels.items()}
        expected = {modality: f"{meta_path}:modality" for modality in MODALITIES}
        cases.append(Case(patient, images, label, "msd", expected))
    return cases


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for extension in _NIFTI_EXTENSIONS:
        if (path := folder / f"{stem}{extension}").is_file():
            return path
    return None


def _find_brats(root: Path) -> list[Case]:
    """One folder per case in the BraTS 2021 or 2023+ naming (see ``_BRATS_LAYOUTS``); ``seg`` may be absent."""
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for separator, suffixes, convention in _BRATS_LAYOUTS:
            images = {modality: ImageRef(path) for suffix, modality in suffixes.items()
                      if (path := _find_nifti(folder, f"{folder.name}{separator}{suffix}")) is not None}
            label = _find_nifti(folder, f"{folder.name}{separator}seg")
            if images or label:
                expected = {modality: str(folder / f"{folder.name}{separator}{suffix}.nii.gz")
                            for suffix, modality in suffixes.items()}
                cases.append(Case(folder.name, images, label, convention, expected))
                break
    return cases


def find_cases(root: str | Path) -> list[Case]:
    """Cases of an MSD Task01 folder (``dataset.json``), a BraTS 2021 or a BraTS 2023+ folder, sorted by id.

    Cases without a label (MSD ``imagesTs``, BraTS validation folders) have ``label=None``.

    Raises:
        DataError: ``root`` is missing or matches no layout, a file listed in ``dataset.json`` is missing,
            or the folder mixes label conventions.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("data folder not found", field=str(root))
    cases = _find_msd(root) if (root / "dataset.json").is_file() else _find_brats(root)
    if not cases:
        raise DataError(
            "neither an MSD Task01 folder (dataset.json, imagesTr, labelsTr), a BraTS 2021 folder "
            "(<id>/<id>_{flair,t1,t1ce,t2,seg}.nii.gz) nor a BraTS 2023+ folder "
            "(<id>/<id>-{t2f,t1n,t1c,t2w,seg}.nii.gz)", field=str(root))
    conventions = {case.convention: case.patient_id for case in cases}
    if len(conventions) > 1:
        raise DataError(f"cases of several releases (label conventions {sorted(conventions)}, e.g. "
                        f"{sorted(conventions.values())}): give one release per folder", field=str(root))
    return sorted(cases, key=lambda case: case.patient_id)


# A head at 1 mm fits in a 256 mm cube (MPRAGE matrices are 256 x 256 x 176, BraTS 240 x 240 x 155 = 8.9M
# voxels): 256^3 voxels, 64 MiB as float32, is the most a source volume may hold unless the job's own grid is
# larger, which may then be covered twice over along each axis (e.g. a 1 mm source for a 2 mm grid).
MAX_HEAD_VOXELS = 256**3
# Deflate (gzip) cannot compress better than 1032:1, so a .nii.gz file declaring more data than that is lying.
DEFLATE_MAX_RATIO = 1032


def is_scanner_affine(affine: np.ndarray) -> bool:
    """A 4x4 voxel-to-scanner matrix a grid can be built from: finite, its 3x3 part invertible."""
    affine = np.asarray(affine, dtype=np.float64)
    return affine.shape == (4, 4) and bool(np.isfinite(affine).all()) and np.linalg.matrix_rank(affine[:3, :3]) == 3


#: Two volumes lie on the same voxel grid if their affines, reoriented to RAS, agree to this (mm).
AFFINE_TOLERANCE_MM = 1e-3

#: A volume's voxel grid: its 3D shape and its affine.
Grid = tuple[Sequence[int], np.ndarray]


def ras_affine(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The affine the volume would have after reorientation to RAS (from the header alone)."""
    orientation = nib.orientations.io_orientation(affine)
    return affine @ nib.orientations.inv_ornt_aff(orientation, shape)


def same_grid(grid: Grid, other: Grid) -> bool:
    """The same shape and, reoriented to RAS, the same affine: one voxel grid, whatever the storage order."""
    (shape, affine), (other_shape, other_affine) = grid, other
    return tuple(shape) == tuple(other_shape) and np.allclose(
        ras_affine(affine, shape), ras_affine(other_affine, other_shape), atol=AFFINE_TOLERANCE_MM)


def odd_grids(grids: Mapping[str, Grid]) -> tuple[str, list[str]]:
    """The volume one patient's volumes are compared with, and those (in order) whose grid differs from it.

    The reference is a volume whose grid most of the others share (the first such on a tie), so that one odd file
    among five is blamed, not the four that agree.
    """
    names = list(grids)
    agreeing = {name: {other for other in names if same_grid(grids[name], grids[other])} for name in names}
    reference = max(names, key=lambda name: len(agreeing[name]))  # the first of the largest
    return reference, [name for name in names if name not in agreeing[reference]]


def grid_mismatch(grid: Grid, reference: Grid, reference_name: str) -> str:
    """How ``grid`` differs from ``reference``'s (named ``reference_name``), for an error message."""
    shape, reference_shape = tuple(int(n) for n in grid[0]), tuple(int(n) for n in reference[0])
    if shape != reference_shape:
        return f"shape {shape} differs from {reference_shape} of {reference_name}"
    return f"voxel grid (affine in RAS) differs from {reference_name}'s (both {shape}): not co-registered"


def grid_shape(size: GridSize) -> tuple[int, int, int]:
    """The grid's three sides: ``size`` repeated for a cube side, else the three sides given (each >= 1)."""
    shape = (size,) * 3 if isinstance(size, (int, np.integer)) else tuple(size)
    if len(shape) != 3 or not all(is_integer(n, numpy=True) and n > 0
                                  for n in shape):
        raise ValueError(f"a grid size is a positive integer or three of them, got {size!r}")
    return tuple(int(n) for n in shape)


def max_source_voxels(grid_size: GridSize | None = None) -> int:
    """The most voxels a source volume may have for a job whose grid is ``grid_size`` (None: no job)."""
    grid_voxels = 0 if grid_size is None else int(np.prod(grid_shape(grid_size), dtype=np.int64))
    return max(MAX_HEAD_VOXELS, 8 * grid_voxels)


def check_header(image: nib.Nifti1Image, path: Path, channel: int | None, max_voxels: int, *,
                 site: str | None = None, patient: str | None = None) -> None:
    """Refuse a volume from its header alone, before any data is read: dimensionality, every dimension >= 1,
    the voxel count against ``max_voxels``, the declared data size against the file's size (uncompressed:
    exactly enough bytes; gzip: within deflate's best ratio), and a finite, invertible affine."""
    def fail(message: str) -> DataError:
        return DataError(message, site=site, patient=patient, field=str(path))

    shape = image.shape
    if channel is None and len(shape) != 3:
        raise fail(f"expected a 3D volume, got shape {shape}")
    if channel is not None and not (len(shape) == 4 and 0 <= channel < shape[3]):
        raise fail(f"expected a 4D volume with channel {channel}, got shape {shape}")
    if channel is not None and shape[3] > len(MODALITIES):
        raise fail(f"a 4D volume holds at most {len(MODALITIES)} modalities, got shape {shape}")
    if min(shape) < 1:
        raise fail(f"every dimension must be at least 1, got shape {shape}")
    voxels = int(np.prod(shape[:3], dtype=np.int64))
    if voxels > max_voxels:
        raise fail(f"shape {shape} has {voxels} voxels, more than the {max_voxels} allowed for this grid")
    header = image.header
    offset = getattr(image.dataobj, "offset", header.get_data_offset())  # as on disk (image.header may reset it)
    declared = int(offset) + int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    data_file = Path(image.file_map["image"].filename or path)  # the .img of a NIfTI pair, else the file itself
    size = data_file.stat().st_size
    if data_file.name.endswith(".gz"):
        if declared > size * DEFLATE_MAX_RATIO:
            raise fail(f"header declares {declared} bytes, more than a {size}-byte gzip file can hold")
    elif declared > size:
        raise fail(f"header declares {declared} bytes, but the file has {size}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not is_scanner_affine(affine):
        raise fail("affine must be finite and invertible")


def read_header(ref: ImageRef, *, site: str | None = None, patient: str | None = None,
                grid_size: GridSize | None = None) -> nib.Nifti1Image:
    """The NIfTI image of one volume with its header checked (``check_header``, at most
    ``max_source_voxels(grid_size)`` voxels); no data is read.

    Raises:
        DataError: missing file, an unreadable or refused header.
    """
    path = Path(ref.path)
    if not path.is_file():
        raise DataError("file not found", site=site, patient=patient, field=str(path))
    try:
        image = nib.load(path)  # the header only: nibabel reads data on demand
        check_header(image, path, ref.channel, max_source_voxels(grid_size), site=site, patient=patient)
    except DataError:
        raise
    except Exception as err:  # nibabel, gzip and zlib raise a dozen exception types for damaged files
        raise DataError(f"cannot read NIfTI ({type(err).__name__}: {err})", site=site, patient=patient,
                        field=str(path)) from err
    return image


def read_volume(ref: ImageRef, *, site: str | None = None, patient: str | None = None,
                grid_size: GridSize | None = None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Raw data of one volume, as stored (scaled by the header), and its NIfTI image (for the geometry).

    The header is checked first (:func:`read_header`).

    Returns:
        ``(data, image)``: float32 array of the file's 3D shape ``(X, Y, Z)`` and the nibabel image.

    Raises:
        DataError: missing or unreadable file, a refused header, channel out of range, NaN/Inf values.
    """
    image = read_header(ref, site=site, patient=patient, grid_size=grid_size)
    path = Path(ref.path)
    try:
        proxy = image.dataobj if ref.channel is None else image.dataobj[..., ref.channel]
        data = np.array(proxy, dtype=np.float32)  # a writable copy: torch refuses read-only arrays
    except Exception as err:  # nibabel, gzip and zlib raise a dozen exception types for damaged files
        raise DataError(f"cannot read NIfTI ({type(err).__name__}: {err})", site=site, patient=patient,
                        field=str(path)) from err
    if not np.isfinite(data).all():
        raise DataError("volume contains NaN or Inf values", site=site, patient=patient, field=str(path))
    return data, image


def read_label(path: str | Path, convention: str, *, site: str | None = None, patient: str | None = None,
               grid_size: GridSize | None = None) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A label volume as uint8 ``(X, Y, Z)``, checked against the convention's label values.

    Raises:
        DataError: as :func:`read_volume`, or values that are not labels of ``convention``.
        ValueError: unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; expected one of {sorted(CONVENTIONS)}")
    data, image = read_volume(ImageRef(Path(path)), site=site, patient=patient, grid_size=grid_size)
    allowed = (0, *CONVENTIONS[convention])
    if not np.isin(data, allowed).all():
        bad = np.setdiff1d(np.unique(data), allowed)[:5].tolist()
        raise DataError(f"label values {bad} are not {convention} labels {list(allowed)}", site=site,
                        patient=patient, field=str(path))
    return data.astype(np.uint8), image


def _grid_transform(size: GridSize, spacing: float | None, mode: str) -> Compose:
    """Content-independent geometry of a channel-first volume: RAS, optional isotropic ``spacing``, crop/pad to
    the grid's shape."""
    geometry = [Orientation(axcodes="RAS", labels=None)]
    if spacing is not None:
        geometry.append(Spacing(pixdim=spacing, mode=mode, padding_mode="zeros", dtype=np.float32))
    geometry.append(ResizeWithPadOrCrop(grid_shape(size)))
    return Compose(geometry)


def _channel_first(data: np.ndarray | torch.Tensor, affine: np.ndarray) -> MetaTensor:
    """A 3D volume as a ``(1, X, Y, Z)`` MetaTensor with its source affine.

    The channel axis is added before the MetaTensor is made: MONAI 1.6.1 infers the number of spatial axes
    when a MetaTensor is created (2 for a bare 3D array) and ``EnsureChannelFirst`` does not update it, so its
    pads then left the affine's offset unchanged and every inverse through ``Spacing`` landed shifted by the
    padding (42 mm in z for 155 slices at 1 mm).
    """
    return MetaTensor(torch.as_tensor(data)[None], affine=torch.as_tensor(affine, dtype=torch.float64))


def _to_grid(data: np.ndarray, image: nib.Nifti1Image, size: GridSize, spacing: float | None, mode: str, *,
             site: str | None = None, patient: str | None = None) -> MetaTensor:
    """``data`` on the common grid: ``(1, *grid_shape(size))`` float32 tensor; a DataError naming the file if
    MONAI cannot transform it."""
    volume = _channel_first(torch.from_numpy(data), image.affine)
    try:
        return _grid_transform(size, spacing, mode)(volume)
    except Exception as err:  # MONAI wraps any failure of a transform in a RuntimeError
        grid = "x".join(map(str, grid_shape(size)))
        raise DataError(f"cannot bring the volume onto the {grid} grid ({type(err).__name__}: {str(err)[:200]})",
                        site=site, patient=patient, field=str(image.get_filename())) from err


def grid_spacing(affine: np.ndarray, spacing: float | None) -> tuple[float, float, float]:
    """Voxel size (mm) of the common grid along its (RAS) axes: ``spacing``, or the source's voxels reoriented."""
    if spacing is not None:
        return (float(spacing),) * 3
    sizes = nib.affines.voxel_sizes(affine)
    ras = np.empty(3)
    ras[nib.orientations.io_orientation(affine)[:, 0].astype(int)] = sizes  # voxel axis i becomes RAS axis ornt[i]
    return tuple(float(size) for size in ras)


def label_to_source(label: np.ndarray, affine: np.ndarray, shape: Sequence[int], spacing: float | None = None
                    ) -> np.ndarray:
    """Inverse of the common grid for a label map: back to the voxel grid of a source volume.

    The grid depends only on the source's affine and shape, so whoever knows them (the label holder, told by
    a site) can undo it without the image.

    Args:
        label: ``(X, Y, Z)`` label map on the common grid (its shape is the grid's).
        affine, shape: the source volume's affine (4x4) and 3D shape.
        spacing: the ``spacing`` the grid was made with.

    Returns:
        ``uint8`` label map of shape ``shape`` (nearest neighbour; zero where the grid cropped the source).
    """
    if label.ndim != 3:
        raise ValueError(f"expected a 3D label map on the grid, got shape {label.shape}")
    transform = _grid_transform(label.shape, spacing, mode="nearest")
    reference = transform(_channel_first(torch.zeros(tuple(shape)), affine))
    grid = MetaTensor(torch.as_tensor(label[None], dtype=torch.float32), affine=reference.affine,
                      applied_operations=reference.applied_operations)
    return np.rint(convert_to_numpy(transform.inverse(grid))[0]).astype(np.uint8)


def load_image(ref: ImageRef, size: GridSize, spacing: float | None = None, *, site: str | None = None,
               patient: str | None = None) -> np.ndarray:
    """One modality on the common grid, z-scored over its nonzero (brain) voxels.

    Returns:
        float32 array of shape ``(1, *grid_shape(size))``.

    Raises:
        DataError: see :func:`read_volume`.
    """
    data, image = read_volume(ref, site=site, patient=patient, grid_size=size)
    volume = convert_to_numpy(_to_grid(data, image, size, spacing, mode="bilinear", site=site, patient=patient),
                              dtype=np.float32)
    brain = volume[volume != 0].astype(np.float64)
    if brain.size == 0:
        return volume
    # Statistics from numpy: torch's parallel reductions vary in the last bit with the thread count, and a
    # site's volumes must equal load_case's bit for bit wherever each of them runs.
    normalize = NormalizeIntensity(subtrahend=[brain.mean()], divisor=[brain.std()], nonzero=True, channel_wise=True)
    return convert_to_numpy(normalize(volume), dtype=np.float32)


def write_nifti(data: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """``data`` as a NIfTI file with ``affine`` as both its qform and sform (scanner space, mm)."""
    path = Path(path)
    nifti = nib.Nifti1Image(data, affine)
    nifti.header.set_xyzt_units("mm", "sec")
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nifti, path)
    return path


def load_label(path: str | Path, size: GridSize, convention: str, spacing: float | None = None, *,
               site: str | None = None, patient: str | None = None, dtype: type = np.float32) -> np.ndarray:
    """Region masks (WT, TC, ET) of a label file on the common grid (nearest-neighbour resampling).

    Returns:
        array of ``dtype`` (uint8 keeps a cached label small) and shape ``(3, *grid_shape(size))``, values 0 and 1.

    Raises:
        DataError: see :func:`read_label`.
    """
    data, image = read_label(path, convention, site=site, patient=patient, grid_size=size)
    label = convert_to_numpy(_to_grid(data.astype(np.float32), image, size, spacing, mode="nearest", site=site,
                                      patient=patient)[0])
    return regions(np.rint(label).astype(np.uint8), convention).astype(dtype, copy=False)


def load_case(case: Case, size: GridSize, spacing: float | None = None) -> dict[str, np.ndarray]:
    """All modalities and the label of one case, as the sites and the server would load them.

    Returns:
        ``{"image": float32 (4, *grid) in MODALITIES order, "label": float32 (3, *grid)}`` (grid:
        ``grid_shape(size)``);
        ``"label"`` is left out when the case has none.

    Raises:
        DataError: a missing modality (``field`` is the file the release expects) or an unreadable file.
    """
    refs = [case.image(m) for m in MODALITIES]
    images = [load_image(ref, size, spacing, patient=case.patient_id)[0] for ref in refs]
    out = {"image": np.stack(images)}
    if case.label is not None:
        out["label"] = load_label(case.label, size, case.convention, spacing, patient=case.patient_id)
    return out
