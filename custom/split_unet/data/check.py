"""A data check before any job: every site's datalist and volumes, and one patient's geometry across sites.

Each site loads its volumes as training would (``SiteImages`` / ``SiteLabels``), so a corrupt, truncated or
unreadable file shows here, named, instead of mid-run. A patient's volumes must also describe the same grid at
every party (same shape and, after reorientation to RAS, the same affine): a site whose file has another shape
or position holds a volume that does not line up with the others', which no loader can fix. Finally, how much of
the data the common grid keeps: the share of brain (non-zero) voxels of each site and of label voxels at the
server that lie inside the grid's field of view (a small ``size`` without ``spacing`` keeps only the centre).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from split_unet.errors import DataError

from .partition import DATALIST, SERVER_SITE
from .readers import GridSize, ImageRef, grid_shape, label_to_source, read_volume
from .site_data import SiteImages, SiteLabels

AFFINE_TOLERANCE_MM = 1e-3
#: Below this share of brain or label voxels kept by the grid, ``split-unet check`` warns.
COVERAGE_WARNING = 0.99


@dataclass
class Problem:
    site: str
    patient: str | None
    field: str | None
    message: str


@dataclass
class Coverage:
    """Voxels of interest (brain: non-zero image voxels; server: label voxels) in the sources and on the grid."""

    kept: int = 0
    total: int = 0

    @property
    def share(self) -> float:
        return self.kept / self.total if self.total else 1.0

    def add(self, other: "Coverage") -> None:
        self.kept, self.total = self.kept + other.kept, self.total + other.total


class FieldOfView:
    """Which source voxels the common grid keeps, per source geometry (computed once per affine and shape)."""

    def __init__(self, size: GridSize, spacing: float | None):
        self.shape, self.spacing = grid_shape(size), spacing
        self._masks: dict[tuple, np.ndarray] = {}

    def coverage(self, data: np.ndarray, affine: np.ndarray) -> Coverage:
        key = (np.round(affine, 6).tobytes(), data.shape)
        if key not in self._masks:
            everything = np.ones(self.shape, np.uint8)  # the whole grid, mapped back to the source's voxels
            self._masks[key] = label_to_source(everything, affine, data.shape, self.spacing).astype(bool)
        interest = data != 0
        return Coverage(int(np.count_nonzero(interest & self._masks[key])), int(np.count_nonzero(interest)))


def check_sites(sites_dir: str | Path, size: GridSize = 64, spacing: float | None = None,
                sites: Sequence[str] | None = None) -> tuple[dict[str, int], list[Problem], dict[str, Coverage]]:
    """Check the site folders of ``sites_dir`` (or just ``sites``; ``server`` holds the labels) for the grid
    ``size`` (a cube side or three sides) and ``spacing``.

    Returns ``({site: volumes that loaded}, problems, {site: coverage})``; no exception for bad data, every
    problem is listed. Coverage counts brain voxels at a site, label voxels at the server.
    """
    sites_dir = Path(sites_dir)
    names = list(sites) if sites else sorted(p.parent.name for p in sites_dir.glob(f"*/{DATALIST}"))
    if not names:
        raise DataError(f"no site folders (with a {DATALIST}) found", field=str(sites_dir))
    loaded: dict[str, int] = {}
    coverage: dict[str, Coverage] = {}
    field_of_view = FieldOfView(size, spacing)
    problems: list[Problem] = []
    grids: dict[str, dict[str, tuple[tuple[int, ...], np.ndarray, Path]]] = {}  # patient -> site -> grid
    for name in names:
        try:
            kind = SiteLabels if name == SERVER_SITE else SiteImages
            volumes = kind(sites_dir / name, size, spacing, site=name, cache_cases=1)  # one volume at a time
        except DataError as error:
            problems.append(Problem(name, error.patient, error.field, error.detail))
            continue
        loaded[name], coverage[name] = 0, Coverage()
        for patient in volumes.patient_ids:
            try:
                affine, shape = volumes.geometry(patient)  # the header, checked as training checks it
                volumes.volume(patient)  # read and preprocessed as training would
                data, image = read_volume(ImageRef(volumes.path(patient)), site=name, patient=patient,
                                          grid_size=size)
            except DataError as error:
                problems.append(Problem(name, patient, error.field, error.detail))
                continue
            loaded[name] += 1
            coverage[name].add(field_of_view.coverage(data, image.affine))
            grids.setdefault(patient, {})[name] = (shape, ras_affine(affine, shape), volumes.path(patient))
    for patient, by_site in sorted(grids.items()):
        reference_site, (shape, affine, _) = next(iter(by_site.items()))
        for site, (other_shape, other_affine, path) in by_site.items():
            if other_shape != shape:
                problems.append(Problem(site, patient, str(path), f"shape {other_shape} differs from {shape} at "
                                                                  f"'{reference_site}'"))
            elif not np.allclose(other_affine, affine, atol=AFFINE_TOLERANCE_MM):
                problems.append(Problem(site, patient, str(path), f"voxel grid (affine in RAS) differs from "
                                                                  f"'{reference_site}': not co-registered"))
    return loaded, problems, coverage


def ras_affine(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The affine the volume would have after reorientation to RAS (from the header alone)."""
    orientation = nib.orientations.io_orientation(affine)
    return affine @ nib.orientations.inv_ornt_aff(orientation, shape)


def problems_as_dicts(problems: Sequence[Problem]) -> list[dict]:
    return [asdict(problem) for problem in problems]
