"""The hijacking study's loops on a tiny phantom: the detector alarms on the attack at once, never on honest training."""

import json

import pytest
from helpers import make_dataset

from split_unet.studies.hijacking import RESULT_FILE, main

pytestmark = pytest.mark.unit


def test_study_writes_alarm_steps_and_reconstruction_scores(tmp_path):
    _, sites = make_dataset(tmp_path, patients=6, size=16)
    result = main(["--sites", str(sites), "--out", str(tmp_path / "out"), "--size", "16", "--steps", "3",
                   "--honest-seeds", "0", "--attack-seeds", "0", "--aux", "2", "--pretrain-steps", "2"])
    assert json.loads((tmp_path / "out" / RESULT_FILE).read_text()) == result
    runs = result["runs"]
    assert set(runs) == {"honest, seed 0", "honest + gradient noise x10, seed 0", "hijacking, seed 0"}
    assert runs["honest, seed 0"]["alarm_step"] is None and max(runs["honest, seed 0"]["spatial_mean_ratio"]) < 1e-6
    assert runs["honest + gradient noise x10, seed 0"]["alarm_step"] is None
    attack = runs["hijacking, seed 0"]
    assert attack["alarm_step"] == 1 and len(attack["spatial_mean_ratio"]) == 3
    assert [s["step"] for s in attack["reconstruction"]] == [1, 3]
    assert all(s["excess_ssim"] == pytest.approx(s["ssim"] - s["prior_ssim"]) for s in attack["reconstruction"])
