"""A data check before any job: every site's datalist and volumes, and one patient's geometry across sites.

Each site loads its volumes as training would (``SiteImages`` / ``SiteLabels``), so a corrupt, truncated or
unreadable file shows here, named, instead of mid-run. A patient's volumes must also describe the same grid at
every party (same shape and, after reorientation to RAS, the same affine): a site whose file has another shape
or position holds a volume that does not line up with the others', which no loader can fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from split_unet.errors import DataError

from .partition import DATALIST, SERVER_SITE
from .site_data import SiteImages, SiteLabels

AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class Problem:
    site: str
    patient: str | None
    field: str | None
    message: str


def check_sites(sites_dir: str | Path, size: int = 64, spacing: float | None = None,
                sites: Sequence[str] | None = None) -> tuple[dict[str, int], list[Problem]]:
    """Check the site folders of ``sites_dir`` (or just ``sites``; ``server`` holds the labels).

    Returns ``({site: volumes that loaded}, problems)``; no exception for bad data, every problem is listed.
    """
    sites_dir = Path(sites_dir)
    names = list(sites) if sites else sorted(p.parent.name for p in sites_dir.glob(f"*/{DATALIST}"))
    if not names:
        raise DataError(f"no site folders (with a {DATALIST}) found", field=str(sites_dir))
    loaded: dict[str, int] = {}
    problems: list[Problem] = []
    grids: dict[str, dict[str, tuple[tuple[int, ...], np.ndarray, Path]]] = {}  # patient -> site -> grid
    for name in names:
        try:
            kind = SiteLabels if name == SERVER_SITE else SiteImages
            volumes = kind(sites_dir / name, size, spacing, site=name)
        except DataError as error:
            problems.append(Problem(name, error.patient, error.field, error.detail))
            continue
        loaded[name] = 0
        for patient in volumes.patient_ids:
            try:
                affine, shape = volumes.geometry(patient)  # loads and checks the volume as training would
            except DataError as error:
                problems.append(Problem(name, patient, error.field, error.detail))
                continue
            loaded[name] += 1
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
    return loaded, problems


def ras_affine(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The affine the volume would have after reorientation to RAS (from the header alone)."""
    orientation = nib.orientations.io_orientation(affine)
    return affine @ nib.orientations.inv_ornt_aff(orientation, shape)


def problems_as_dicts(problems: Sequence[Problem]) -> list[dict]:
    return [asdict(problem) for problem in problems]
