"""A data check before any job: every site's datalist and volumes, and one patient's geometry across sites.

Each site loads its volumes as training would (``SiteImages`` / ``SiteLabels``), so a corrupt, truncated or
unreadable file shows here, named, instead of mid-run. A patient's volumes must also describe the same grid at
every party (same shape and, after reorientation to RAS, the same affine): a site whose file has another shape
or position holds a volume that does not line up with the others', which no loader can fix; the file blamed is
the one whose grid differs from the grid most of the patient's volumes share. Every datalist that names a label
convention must name the server's. Finally, how much of
the data the common grid keeps: the share of brain (non-zero) voxels of each site and of label voxels at the
server that lie inside the grid's field of view (a small ``size`` without ``spacing`` keeps only the centre).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from split_unet.errors import DataError

from .partition import DATALIST, SERVER_SITE
from .readers import GridSize, ImageRef, grid_mismatch, grid_shape, label_to_source, odd_grids, read_json, read_volume
from .site_data import SiteImages, SiteLabels

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
    grids: dict[str, dict[str, tuple[tuple[int, ...], np.ndarray]]] = {}  # patient -> site -> (shape, affine)
    files: dict[str, dict[str, Path]] = {}  # patient -> site -> file
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
            grids.setdefault(patient, {})[name] = (shape, affine)
            files.setdefault(patient, {})[name] = volumes.path(patient)
    for patient, by_site in sorted(grids.items()):
        reference, odd = odd_grids(by_site)
        reference_file = files[patient][reference]
        shown = reference_file.relative_to(sites_dir) if reference_file.is_relative_to(sites_dir) else reference_file
        where = f"site '{reference}' ({shown})"
        for site in odd:
            problems.append(Problem(site, patient, str(files[patient][site]),
                                    grid_mismatch(by_site[site], by_site[reference], where)))
    problems.extend(_convention_problems(sites_dir, names))
    return loaded, problems, coverage


def datalist_conventions(sites_dir: str | Path, names: Sequence[str]) -> dict[str, str]:
    """The label convention each party's datalist names (the server's always does; a site's may not)."""
    found = {}
    for name in names:
        try:
            convention = read_json(Path(sites_dir) / name / DATALIST, site=name).get("convention")
        except DataError:
            continue  # reported where the party's volumes are checked
        if convention is not None:
            found[name] = convention
    return found


def _convention_problems(sites_dir: Path, names: Sequence[str]) -> list[Problem]:
    """Sites' datalists that name another label convention than the server's (where the server's folder is among
    those checked: a hospital checks its own folder alone)."""
    conventions = datalist_conventions(sites_dir, names)
    server = conventions.get(SERVER_SITE)
    return [Problem(site, None, f"{sites_dir / site / DATALIST}:convention",
                    f"label convention '{convention}' differs from the server's '{server}'")
            for site, convention in conventions.items() if server is not None and convention != server]


def problems_as_dicts(problems: Sequence[Problem]) -> list[dict]:
    return [asdict(problem) for problem in problems]
