"""What a site (one modality) or the server (labels) loads at run time from its partition folder."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from split_unet.data.partition import DATALIST
from split_unet.data.readers import ImageRef, grid_spacing, load_image, load_label, read_json
from split_unet.data.regions import CONVENTIONS, MODALITIES
from split_unet.errors import DataError
from split_unet.ids import check_patient_id

__all__ = ["SiteImages", "SiteLabels", "split_patients"]


class _SiteVolumes(ABC):
    """Datalist parsing, patient lookup and the in-memory cache shared by sites and the server.

    Subclasses implement :meth:`_load` for one patient's file.
    """

    def __init__(self, site_dir: str | Path, size: int, spacing: float | None = None, site: str | None = None):
        self.site_dir = Path(site_dir)
        self.size = size
        self.spacing = spacing
        self._datalist_path = self.site_dir / DATALIST
        # Until the datalist names the site, errors name the folder.
        self.site: str = site or self.site_dir.name
        self.datalist = read_json(self._datalist_path, site=self.site)
        self.site = site or self._field("site", str)
        patients = self._field("patients", dict)
        field = f"{self._datalist_path}:patients"
        if not all(isinstance(rel, str) for rel in patients.values()):
            raise DataError("'patients' must map patient ids to file paths", site=self.site, field=field)
        # The datalist is the site's own (its files may lie elsewhere, e.g. a benchmark's copied site); its ids
        # become names in messages and files, so they follow the id rule.
        self._paths = {check_patient_id(pid, site=self.site, field=field): self.site_dir / rel
                       for pid, rel in patients.items()}
        self.patient_ids: list[str] = sorted(self._paths)
        self._cache: dict[str, np.ndarray] = {}

    def _field(self, key: str, kind: type) -> Any:
        """A required datalist entry of type ``kind``."""
        value = self.datalist.get(key)
        if not isinstance(value, kind):
            raise DataError(f"'{key}' must be a {kind.__name__}, got {type(value).__name__}", site=self.site,
                            field=f"{self._datalist_path}:{key}")
        return value

    @abstractmethod
    def _load(self, patient_id: str, path: Path) -> np.ndarray:
        """Read and preprocess one patient's file."""

    def _cached(self, patient_id: str) -> np.ndarray:
        if patient_id not in self._cache:
            if patient_id not in self._paths:
                raise DataError(f"unknown patient (this site has {len(self._paths)})", site=self.site,
                                patient=patient_id, field="patient_id")
            self._cache[patient_id] = self._load(patient_id, self._paths[patient_id])
        return self._cache[patient_id]

    def __len__(self) -> int:
        return len(self._paths)

    def get(self, patient_id: str) -> np.ndarray:
        """One patient's volume, shape ``(C, S, S, S)`` (a copy: the cached array stays intact)."""
        return self._cached(patient_id).copy()

    def batch(self, patient_ids: Sequence[str]) -> np.ndarray:
        """Volumes of ``patient_ids`` stacked in that order, shape ``(B, C, S, S, S)``."""
        return np.stack([self._cached(pid) for pid in patient_ids])

    def keep(self, patient_ids: Iterable[str]) -> None:
        """Use only these patients (e.g. a PSI intersection); ids this site lacks are an error."""
        keep = set(patient_ids)
        if missing := sorted(keep - set(self._paths)):
            raise DataError(f"{len(missing)} patients to keep are not held here, e.g. {missing[0]}", site=self.site,
                            field="patient_ids")
        self._paths = {pid: path for pid, path in self._paths.items() if pid in keep}
        self.patient_ids = sorted(self._paths)

    def path(self, patient_id: str) -> Path:
        """The file of one patient."""
        self._cached(patient_id)  # a known patient
        return self._paths[patient_id]

    def geometry(self, patient_id: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """The source file's affine and 3D shape (header only): all the label holder needs to undo the grid."""
        self._cached(patient_id)  # known patient, readable file
        header = nib.load(self._paths[patient_id]).header
        return header.get_best_affine(), tuple(int(n) for n in header.get_data_shape()[:3])

    def grid_spacing(self, patient_id: str) -> tuple[float, float, float]:
        """Voxel size (mm) of this patient on the common grid (for distances in mm)."""
        return grid_spacing(self.geometry(patient_id)[0], self.spacing)

    def check(self) -> None:
        """Load every volume once (they stay cached); raise the first :class:`DataError`."""
        for patient_id in self.patient_ids:
            self._cached(patient_id)


class SiteImages(_SiteVolumes):
    """A modality site's images: ``get`` gives float32 ``(1, S, S, S)``, z-scored over the brain."""

    def __init__(self, site_dir: str | Path, size: int, spacing: float | None = None, site: str | None = None):
        super().__init__(site_dir, size, spacing, site)
        self.modality: str = self._field("modality", str)
        if self.modality not in MODALITIES:
            raise DataError(f"unknown modality {self.modality!r}; expected one of {list(MODALITIES)}",
                            site=self.site, field=f"{self._datalist_path}:modality")

    def _load(self, patient_id: str, path: Path) -> np.ndarray:
        return load_image(ImageRef(path), self.size, self.spacing, site=self.site, patient=patient_id)


class SiteLabels(_SiteVolumes):
    """The server's labels: ``get`` gives float32 region masks ``(3, S, S, S)`` (WT, TC, ET)."""

    def __init__(self, site_dir: str | Path, size: int, spacing: float | None = None, site: str | None = None):
        super().__init__(site_dir, size, spacing, site)
        self.convention: str = self._field("convention", str)
        if self.convention not in CONVENTIONS:
            raise DataError(f"unknown label convention {self.convention!r}; expected one of {sorted(CONVENTIONS)}",
                            site=self.site, field=f"{self._datalist_path}:convention")

    def _load(self, patient_id: str, path: Path) -> np.ndarray:
        return load_label(path, self.size, self.convention, self.spacing, site=self.site, patient=patient_id)


def split_patients(patient_ids: Iterable[str], val_fraction: float = 0.2, seed: int = 0, *,
                   n_val: int | None = None) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split: sort, then a seeded permutation; input order does not matter.

    Args:
        patient_ids: unique patient ids.
        val_fraction: share of patients for validation (rounded half up), unless ``n_val`` is given.
        seed: permutation seed.
        n_val: exact number of validation patients.

    Returns:
        ``(train_ids, val_ids)``, each sorted.

    Raises:
        ValueError: duplicate ids, or a validation size outside ``[0, len(patient_ids)]``.
    """
    ids = sorted(patient_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("patient ids must be unique")
    if n_val is None:
        n_val = int(val_fraction * len(ids) + 0.5)
    if not 0 <= n_val <= len(ids):
        raise ValueError(f"cannot take {n_val} validation patients out of {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val
