"""A real NVFlare federation on loopback (POC mode): prepare, start, PSI, training, inference, download, stop.

The server and the sites run in a Python environment where ``split_unet`` is NOT importable (a venv that
sees this one's packages except the editable ``split_unet``), so every job must carry its own code.
Bounded: a hard alarm ends the test, and the federation is stopped in every case.
"""

import pytest
import json
import subprocess
from pathlib import Path

import nibabel as nib

from split_unet.data import SERVER_SITE, holdings, partition_dataset
from split_unet.jobs import PsiJob, training_settings
from split_unet.launch.poc import PocFederation, run_pipeline
from split_unet.protocol.psi import intersection_path

from helpers import TINY_NETWORK, TINY_SIZE, bare_python, free_port, make_dataset, processes_mentioning

pytestmark = pytest.mark.poc
HARD_LIMIT_S = 900  # about 3 min on an idle 2-core machine; generous for a loaded one
SITES = ["flair", "t1w", "t1gd", "t2w"]


def test_poc_federation_psi_train_infer(project_root, tmp_path, hard_limit, monkeypatch):
    # The federation's processes inherit this environment: a PYTHONPATH naming custom/ would import split_unet.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    msd, _ = make_dataset(tmp_path / "data", patients=8)
    sites_dir = tmp_path / "data" / "overlap"
    partition_dataset(msd, sites_dir, overlap=0.75, seed=1, progress=False)
    python = bare_python(tmp_path / "bare_env")
    probe = subprocess.run([python, "-c", "import nvflare, torch, monai; import split_unet"], capture_output=True)
    assert probe.returncode != 0 and b"No module named 'split_unet'" in probe.stderr

    federation = PocFederation(tmp_path / "federation", sites_dir, project_root / "site_configs",
                               port=free_port(), python=python)
    try:
        training = training_settings({"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1, "batch_size": 2,
                                      "val_fraction": 0.34}, with_code=True)
        report = run_pipeline(federation, tmp_path / "out", training, PsiJob(with_code=True), progress=None)
    finally:
        federation.stop()
    assert not federation.running()
    assert processes_mentioning(str(tmp_path / "federation")) == []

    # The server listened on loopback only (its startup kit), and every phase was timed.
    server_config = json.loads((federation.prod_dir / "localhost" / "startup" / "fed_server.json").read_text())
    assert server_config["servers"][0]["service"]["target"].startswith("localhost:")
    assert set(report["seconds"]) >= {"prepare", "start", "psi", "train", "infer", "stop"}
    assert all("COMPLETED" in job["status"] for job in report["jobs"].values())

    # PSI: each site's intersection is that of all five parties.
    held = {party: set(ids) for party, ids in holdings([f"BRATS_00{i}" for i in range(1, 9)],
                                                         [*SITES, SERVER_SITE], 0.75, seed=1).items()}
    expected = set.intersection(*held.values())
    for site in SITES:
        path = intersection_path(federation.site_root(site), report["jobs"]["psi"]["id"], site)
        assert set(path.read_text().split()) == expected
        # The jobs brought their own code: BYOC, not the (absent) installed package.
        assert (federation.site_root(site) / report["jobs"]["train"]["id"] / f"app_{site}" / "custom"
                / "split_unet").is_dir()
    train = report["train"]
    assert train["config"]["train_patients"] + train["config"]["val_patients"] == len(expected)
    assert 0 <= train["dice"]["mean"] <= 1

    # Inference: one NIfTI per patient all sites hold, with the source geometry; Dice where labels exist.
    infer = report["infer"]
    assert "error" not in infer, infer
    at_sites = set.intersection(*(held[site] for site in SITES))
    assert set(infer["patients"]) == at_sites
    assert infer["scored_cases"] == len(at_sites & held[SERVER_SITE])
    for pid, entry in infer["patients"].items():
        seg = nib.load(Path(infer["segmentations"]) / entry["segmentation"])
        src = nib.load(sites_dir / "flair" / "images" / f"{pid}.nii.gz")
        assert seg.shape == src.shape and (seg.affine == src.affine).all()
