"""Vertical partition: one folder per modality site (images only) and one for the server (labels only)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from split_unet.data.readers import find_cases, read_label, read_volume
from split_unet.data.regions import MODALITIES
from split_unet.errors import DataError

__all__ = ["partition_dataset", "SERVER_SITE", "DATALIST"]

#: Name of the label holder's folder and site.
SERVER_SITE = "server"
#: File name of the patient list in every partition folder.
DATALIST = "datalist.json"


def _save(data: np.ndarray, source: nib.Nifti1Image, path: Path) -> None:
    """Save ``data`` with the source's header geometry (qform/sform and their codes) and ``data``'s dtype."""
    header = source.header.copy()
    header.set_data_dtype(data.dtype)
    # The source affine equals the header's best affine, so nibabel keeps the stored qform/sform as they are.
    image = nib.Nifti1Image(data, source.affine, header)
    image.header.set_slope_inter(1.0, 0.0)  # data is stored unscaled
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def partition_dataset(data_dir: str | Path, out_dir: str | Path, modalities: Sequence[str] = MODALITIES,
                      progress: bool = True) -> dict[str, Path]:
    """Split a dataset (MSD Task01 or BraTS 2021, see :func:`find_cases`) into per-site folders.

    Writes ``out_dir/<modality>/images/<patient>.nii.gz`` (that modality only, float32 3D, source geometry,
    values as stored) and ``out_dir/server/labels/<patient>.nii.gz`` (uint8, labels unchanged), each folder
    with a ``datalist.json``: ``{"site", "modality", "patients": {id: relative path}}`` for a site,
    ``{"site": "server", "convention", "patients"}`` for the server.

    Returns:
        ``{site name: folder}`` for every modality in ``modalities`` and ``"server"``.

    Raises:
        DataError: a case lacks a modality (``field`` = the modality) or a label, or a file is unreadable.
        ValueError: an unknown modality in ``modalities``.
    """
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected a subset of {list(MODALITIES)}")
    cases = find_cases(data_dir)
    # Check every case before writing anything, so a bad dataset leaves no half-written partition.
    for case in cases:
        for modality in modalities:
            if modality not in case.images:
                raise DataError(f"no {modality} image", patient=case.patient_id, field=modality)
        if case.label is None:
            raise DataError("no label", patient=case.patient_id, field="label")

    out = Path(out_dir)
    folders = {name: out / name for name in (*modalities, SERVER_SITE)}
    patients: dict[str, dict[str, str]] = {name: {} for name in folders}
    for number, case in enumerate(cases, start=1):
        pid = case.patient_id
        for modality in modalities:
            data, source = read_volume(case.images[modality], patient=pid)
            patients[modality][pid] = f"images/{pid}.nii.gz"
            _save(data, source, folders[modality] / patients[modality][pid])
        label, source = read_label(case.label, case.convention, patient=pid)
        patients[SERVER_SITE][pid] = f"labels/{pid}.nii.gz"
        _save(label, source, folders[SERVER_SITE] / patients[SERVER_SITE][pid])
        if progress:
            print(f"partition {number}/{len(cases)} {pid}", flush=True)

    for name, folder in folders.items():
        if name == SERVER_SITE:
            datalist = {"site": name, "convention": cases[0].convention, "patients": patients[name]}
        else:
            datalist = {"site": name, "modality": name, "patients": patients[name]}
        (folder / DATALIST).write_text(json.dumps(datalist, indent=2) + "\n")
    return folders
