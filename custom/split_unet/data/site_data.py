"""What a site (one modality) or the server (labels) loads at run time from its partition folder."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from split_unet.data.partition import DATALIST
from split_unet.data.readers import (
    GridSize,
    ImageRef,
    grid_spacing,
    load_image,
    load_label,
    read_header,
    read_json,
)
from split_unet.data.regions import CONVENTIONS, MODALITIES
from split_unet.errors import DataError
from split_unet.ids import check_patient_id

__all__ = ["SiteImages", "SiteLabels", "split_patients"]


class _SiteVolumes(ABC):
    """Datalist parsing, patient lookup, header checks and the bounded volume cache shared by sites and the server.

    Nothing is read beyond the headers until a volume is used: :meth:`check` reads headers only, volumes load on
    first use (or ahead of it, :meth:`prefetch`) into a least-recently-used cache of at most ``cache_cases``
    volumes (0: no bound). Subclasses implement :meth:`_load` for one patient's file.
    """

    def __init__(self, site_dir: str | Path, size: GridSize, spacing: float | None = None, site: str | None = None,
                 cache_cases: int = 0):
        if cache_cases < 0:
            raise ValueError(f"cache_cases must be at least 0, got {cache_cases}")
        self.site_dir = Path(site_dir)
        self.size = size
        self.spacing = spacing
        self.cache_cases = cache_cases
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
        self._geometry: dict[str, tuple[np.ndarray, tuple[int, int, int]]] = {}  # from the headers
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # least recently used first
        self._pending: dict[str, Future] = {}  # prefetches not yet taken by a batch
        self._lock = threading.Lock()  # the cache and the pending prefetches, shared with the loader thread
        self._loader: ThreadPoolExecutor | None = None  # made by the first prefetch

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

    def path(self, patient_id: str) -> Path:
        """The file of one patient; a DataError for a patient this site does not hold."""
        if patient_id not in self._paths:
            raise DataError(f"unknown patient (this site has {len(self._paths)})", site=self.site,
                            patient=patient_id, field="patient_id")
        return self._paths[patient_id]

    def _store(self, patient_id: str, volume: np.ndarray) -> None:
        """Put a loaded volume in the cache (read-only: callers get views of it), evicting the least recently
        used beyond ``cache_cases``. Called with the lock held."""
        volume.flags.writeable = False
        self._cache[patient_id] = volume
        self._cache.move_to_end(patient_id)
        while self.cache_cases and len(self._cache) > self.cache_cases:
            self._cache.popitem(last=False)

    def _cached(self, patient_id: str) -> np.ndarray:
        """One patient's preprocessed volume: from the cache, from its prefetch, or loaded now."""
        path = self.path(patient_id)
        with self._lock:
            if patient_id in self._cache:
                self._cache.move_to_end(patient_id)
                return self._cache[patient_id]
            prefetch = self._pending.pop(patient_id, None)
        volume = prefetch.result() if prefetch is not None else self._load(patient_id, path)  # a DataError as is
        with self._lock:
            self._store(patient_id, volume)
        return volume

    def _prefetched(self, patient_id: str, path: Path) -> np.ndarray:
        """The loader thread's work: load one volume into the cache. A failure stays in the pending future, so
        the batch that needs the patient raises it."""
        volume = self._load(patient_id, path)
        with self._lock:
            self._store(patient_id, volume)
            self._pending.pop(patient_id, None)
        return volume

    def prefetch(self, patient_ids: Iterable[str]) -> None:
        """Start loading these patients into the cache on a background thread (one at a time, in order), e.g. the
        next step's batch while this step runs; a :meth:`batch` that needs one of them waits for it instead of
        loading it again, and raises its DataError if it failed. Patients already cached or on their way are
        skipped; an unknown patient is an error before anything starts. With a bounded cache, prefetched volumes
        evict the least recently used: ``cache_cases`` of at least two batches keeps the current one."""
        paths = {patient_id: self.path(patient_id) for patient_id in patient_ids}
        with self._lock:
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prefetch-{self.site}")
            for patient_id, path in paths.items():
                if patient_id not in self._cache and patient_id not in self._pending:
                    self._pending[patient_id] = self._loader.submit(self._prefetched, patient_id, path)

    def close(self) -> None:
        """Stop the prefetch thread (loads not yet started are dropped); the cache stays usable."""
        with self._lock:
            loader, self._loader = self._loader, None
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()  # a later batch loads what was dropped itself
        if loader is not None:
            loader.shutdown(wait=True, cancel_futures=True)

    def cached_ids(self) -> list[str]:
        """Patients whose volumes are in the cache now, least recently used first."""
        with self._lock:
            return list(self._cache)

    def __len__(self) -> int:
        return len(self._paths)

    def volume(self, patient_id: str) -> np.ndarray:
        """One patient's cached volume itself, shape ``(C, *grid)``, read-only (no copy: e.g. to cut patches).
        Images are float32, labels uint8 region masks."""
        return self._cached(patient_id)

    def get(self, patient_id: str) -> np.ndarray:
        """One patient's volume as float32, shape ``(C, *grid)`` (a copy: the cached array stays intact)."""
        return self._cached(patient_id).astype(np.float32)

    def batch(self, patient_ids: Sequence[str]) -> np.ndarray:
        """Volumes of ``patient_ids`` stacked in that order as float32, shape ``(B, C, *grid)``."""
        return np.stack([self._cached(pid) for pid in patient_ids]).astype(np.float32, copy=False)

    def keep(self, patient_ids: Iterable[str]) -> None:
        """Use only these patients (e.g. a PSI intersection); ids this site lacks are an error."""
        keep = set(patient_ids)
        if missing := sorted(keep - set(self._paths)):
            raise DataError(f"{len(missing)} patients to keep are not held here, e.g. {missing[0]}", site=self.site,
                            field="patient_ids")
        self._paths = {pid: path for pid, path in self._paths.items() if pid in keep}
        self.patient_ids = sorted(self._paths)

    def _check_header(self, patient_id: str) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Check one patient's header (no data is read) and keep its geometry: affine and 3D shape."""
        if patient_id not in self._geometry:
            # Site and server files are 3D (the partition writes one modality per file): a 4D file is refused.
            image = read_header(ImageRef(self.path(patient_id)), site=self.site, patient=patient_id,
                                grid_size=self.size)
            self._geometry[patient_id] = (np.asarray(image.affine, dtype=np.float64),
                                          tuple(int(n) for n in image.shape[:3]))
        return self._geometry[patient_id]

    def geometry(self, patient_id: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """The source file's affine and 3D shape (header only): all the label holder needs to undo the grid."""
        return self._check_header(patient_id)

    def grid_spacing(self, patient_id: str) -> tuple[float, float, float]:
        """Voxel size (mm) of this patient on the common grid (for distances in mm)."""
        return grid_spacing(self.geometry(patient_id)[0], self.spacing)

    def check(self) -> None:
        """Check every patient's file from its header alone (readable, 3D, a size the grid allows, data the file
        can hold, an invertible affine); raise the first :class:`DataError`. The data is read on first use, where
        damage beyond the header (a truncated stream, NaN, label values) raises a DataError naming the patient."""
        for patient_id in self.patient_ids:
            self._check_header(patient_id)


class SiteImages(_SiteVolumes):
    """A modality site's images: ``get`` gives float32 ``(1, *grid)``, z-scored over the brain."""

    def __init__(self, site_dir: str | Path, size: GridSize, spacing: float | None = None, site: str | None = None,
                 cache_cases: int = 0):
        super().__init__(site_dir, size, spacing, site, cache_cases)
        self.modality: str = self._field("modality", str)
        if self.modality not in MODALITIES:
            raise DataError(f"unknown modality {self.modality!r}; expected one of {list(MODALITIES)}",
                            site=self.site, field=f"{self._datalist_path}:modality")

    def _load(self, patient_id: str, path: Path) -> np.ndarray:
        return load_image(ImageRef(path), self.size, self.spacing, site=self.site, patient=patient_id)


class SiteLabels(_SiteVolumes):
    """The server's labels: cached as uint8 region masks ``(3, *grid)`` (WT, TC, ET); ``get`` and ``batch`` give
    them as float32."""

    def __init__(self, site_dir: str | Path, size: GridSize, spacing: float | None = None, site: str | None = None,
                 cache_cases: int = 0):
        super().__init__(site_dir, size, spacing, site, cache_cases)
        self.convention: str = self._field("convention", str)
        if self.convention not in CONVENTIONS:
            raise DataError(f"unknown label convention {self.convention!r}; expected one of {sorted(CONVENTIONS)}",
                            site=self.site, field=f"{self._datalist_path}:convention")

    def _load(self, patient_id: str, path: Path) -> np.ndarray:
        return load_label(path, self.size, self.convention, self.spacing, site=self.site, patient=patient_id,
                          dtype=np.uint8)


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
