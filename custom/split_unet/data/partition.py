"""Vertical partition: one folder per modality site (images only) and one for the server (labels only)."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from split_unet.data.readers import (
    Case,
    ImageRef,
    find_cases,
    grid_mismatch,
    odd_grids,
    read_header,
    read_label,
    read_volume,
)
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
    with a ``datalist.json``: ``{"site", "modality", "convention", "patients": {id: relative path}}`` for a site,
    ``{"site": "server", "convention", "patients"}`` for the server. Cases without a label (MSD ``imagesTs``,
    BraTS validation folders) go to the sites only: training skips them, ``split-unet infer`` segments them with
    the release's label values, which every datalist names even where no case is labelled.

    Every case is checked as it is written: each modality present (the error names the file the release
    expects), every file readable, label values of the release, and all of a case's volumes on one voxel grid
    (shape and, reoriented to RAS, affine; the file that differs from the grid most of them share is named). The
    folders are written into a temporary folder beside ``out_dir`` that becomes ``out_dir`` only once every case
    passed: a refused data set leaves nothing behind.

    Returns:
        ``{site name: folder}`` for every modality in ``modalities`` and ``"server"``.

    Raises:
        DataError: a refused case (``patient`` and ``field``, the file, name it), or ``out_dir`` exists and is not
            an empty folder.
        ValueError: an unknown modality in ``modalities``.
    """
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected a subset of {list(MODALITIES)}")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise DataError("the output folder exists and is not empty: give a new folder", field=str(out))
    cases = find_cases(data_dir)
    # What needs no file read is checked before anything is written.
    for case in cases:
        check_patient_id(case.patient_id, field="patient_id")
        for modality in modalities:
            case.image(modality)
    convention = cases[0].convention  # find_cases refuses a folder of several releases
    held = {party: set(ids) for party, ids in
            holdings([case.patient_id for case in cases], [*modalities, SERVER_SITE], overlap, seed).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        patients = _write_parties(cases, modalities, held, staging, progress)
        for name, listed in patients.items():
            role = {} if name == SERVER_SITE else {"modality": name}
            datalist = {"site": name, **role, "convention": convention, "patients": listed}
            (staging / name / DATALIST).write_text(json.dumps(datalist, indent=2) + "\n")
        staging.replace(out)  # atomic; replaces an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: out / name for name in (*modalities, SERVER_SITE)}


def _write_parties(cases: Sequence[Case], modalities: Sequence[str], held: dict[str, set[str]], out: Path,
                   progress: bool) -> dict[str, dict[str, str]]:
    """Check each case and write its volumes into the parties' folders under ``out``; ``{party: {id: file}}``."""
    patients: dict[str, dict[str, str]] = {name: {} for name in (*modalities, SERVER_SITE)}
    for name in patients:
        (out / name).mkdir()  # a party with no file still gets its folder and datalist
    for number, case in enumerate(cases, start=1):
        pid = case.patient_id
        _check_grids(case, modalities)
        for modality in (m for m in modalities if pid in held[m]):
            data, source = read_volume(case.images[modality], patient=pid)
            patients[modality][pid] = f"images/{pid}.nii.gz"
            _save(data, source, out / modality / patients[modality][pid])
        if case.label is not None and pid in held[SERVER_SITE]:
            label, source = read_label(case.label, case.convention, patient=pid)
            patients[SERVER_SITE][pid] = f"labels/{pid}.nii.gz"
            _save(label, source, out / SERVER_SITE / patients[SERVER_SITE][pid])
        if progress:
            print(f"partition {number}/{len(cases)} {pid}", flush=True)
    return patients


def _check_grids(case: Case, modalities: Sequence[str]) -> None:
    """All of a case's files (the modalities partitioned and the label) on one voxel grid, from their headers; a
    DataError naming the file that differs, its shape, and the file it was compared with."""
    paths = {case.images[m].path: case.images[m] for m in modalities}  # an MSD case's modalities share one file
    if case.label is not None:
        paths[case.label] = ImageRef(case.label)
    grids = {}
    for path, ref in paths.items():
        image = read_header(ref, patient=case.patient_id)
        grids[path] = (image.shape[:3], image.affine)
    reference, odd = odd_grids(grids)
    if odd:
        raise DataError(grid_mismatch(grids[odd[0]], grids[reference], reference.name), patient=case.patient_id,
                        field=str(odd[0]))
