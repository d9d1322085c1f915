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
from split_unet.ids import check_patient_id

__all__ = ["partition_dataset", "holdings", "SERVER_SITE", "DATALIST"]

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


def holdings(patient_ids: Sequence[str], parties: Sequence[str], overlap: float | None = None,
             seed: int = 0) -> dict[str, list[str]]:
    """Which patients each party holds.

    Args:
        patient_ids: all patients.
        parties: the sites and the label holder.
        overlap: ``None``: every party holds every patient. Otherwise the share of patients (rounded) that
            every party holds; each other patient is held by a random non-empty proper subset of the parties,
            so the intersection is exactly that share.
        seed: seed of the random choice.

    Returns:
        ``{party: sorted patient ids}``.
    """
    if overlap is None:
        return {party: sorted(patient_ids) for party in parties}
    if not 0 < overlap <= 1:
        raise ValueError(f"overlap must be in (0, 1], got {overlap}")
    if len(parties) < 2:
        raise ValueError("an overlap needs at least two parties")
    rng = np.random.default_rng(seed)
    order = [patient_ids[i] for i in rng.permutation(len(patient_ids))]
    n_common = int(overlap * len(order) + 0.5)
    held: dict[str, list[str]] = {party: list(order[:n_common]) for party in parties}
    for patient in order[n_common:]:
        for index in rng.choice(len(parties), size=int(rng.integers(1, len(parties))), replace=False):
            held[parties[index]].append(patient)
    return {party: sorted(ids) for party, ids in held.items()}


def partition_dataset(data_dir: str | Path, out_dir: str | Path, modalities: Sequence[str] = MODALITIES,
                      progress: bool = True, overlap: float | None = None, seed: int = 0) -> dict[str, Path]:
    """Split a dataset (MSD Task01, BraTS 2021 or BraTS 2023+, see :func:`find_cases`) into per-site folders.

    By default every site and the server hold every patient; with ``overlap`` each holds a partly different
    set (see :func:`holdings`), as hospitals do, and PSI finds the patients they share.

    Writes ``out_dir/<modality>/images/<patient>.nii.gz`` (that modality only, float32 3D, source geometry,
    values as stored) and ``out_dir/server/labels/<patient>.nii.gz`` (uint8, labels unchanged), each folder
    with a ``datalist.json``: ``{"site", "modality", "patients": {id: relative path}}`` for a site,
    ``{"site": "server", "convention", "patients"}`` for the server. Cases without a label (MSD ``imagesTs``,
    BraTS validation folders) go to the sites only: training skips them, ``split-unet infer`` segments them.

    Returns:
        ``{site name: folder}`` for every modality in ``modalities`` and ``"server"``.

    Raises:
        DataError: a case lacks a modality (``field`` = the modality), or a file is unreadable.
        ValueError: an unknown modality in ``modalities``.
    """
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected a subset of {list(MODALITIES)}")
    cases = find_cases(data_dir)
    # Check every case before writing anything, so a bad dataset leaves no half-written partition.
    for case in cases:
        check_patient_id(case.patient_id, field="patient_id")
        for modality in modalities:
            if modality not in case.images:
                raise DataError(f"no {modality} image", patient=case.patient_id, field=modality)

    out = Path(out_dir)
    folders = {name: out / name for name in (*modalities, SERVER_SITE)}
    held = {party: set(ids) for party, ids in
            holdings([case.patient_id for case in cases], list(folders), overlap, seed).items()}
    patients: dict[str, dict[str, str]] = {name: {} for name in folders}
    for number, case in enumerate(cases, start=1):
        pid = case.patient_id
        for modality in (m for m in modalities if pid in held[m]):
            data, source = read_volume(case.images[modality], patient=pid)
            patients[modality][pid] = f"images/{pid}.nii.gz"
            _save(data, source, folders[modality] / patients[modality][pid])
        if case.label is not None and pid in held[SERVER_SITE]:
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
