"""The privacy-utility sweep end to end on tiny data: job filters in the simulator, attacks, report."""

import json

from helpers import TINY_NETWORK, TINY_SIZE

from split_unet.studies.privacy_report import pareto_front, run_sweep


def test_pareto_front():
    points = [(0.8, 1.0), (0.7, 0.2), (0.6, 0.5), (0.5, 0.1)]
    assert pareto_front(points) == [3, 1, 0]


def test_sweep_trains_attacks_and_reports(project_root, tiny_data, trained_tiny, tmp_path):
    _, sites = tiny_data
    reference_workspace, _ = trained_tiny
    sweep = {
        "attacks": ["whitebox", "labels"], "record_steps": [1, -1], "attack_iterations": {"whitebox": 5},
        "train": {"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1, "val_fraction": 0.5},
        "configurations": [
            {"name": "undefended", "workspace": str(reference_workspace), "reference": True},
            {"name": "int8 + gradient noise",
             "site_filters": [{"path": "split_unet.filters.ActivationQuantization", "args": {"codec": "int8"}}],
             "server_filters": [{"path": "split_unet.filters.GradientProtection", "args": {"noise_multiplier": 4.0}}]},
        ],
    }
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(sweep))
    report = run_sweep(sweep_file, sites, tmp_path / "report", project_root / "site_configs", log=lambda _: None)
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"undefended", "int8 + gradient noise"} and not any("error" in r for r in rows.values())
    # int8 activations take half the bytes of the default float16 ones.
    undefended, defended = rows["undefended"], rows["int8 + gradient noise"]
    assert defended["bytes_per_step"] < undefended["bytes_per_step"]
    for row in rows.values():
        excess = row["images"]["excess_ssim"]
        assert -1 <= excess["value"] <= 1 and excess["attack"] == "whitebox" and excess["step"] >= 1
        assert excess["value"] == excess["ssim"] - excess["prior_ssim"]
        assert -2 <= row["images"]["excess_residual_ssim"]["value"] <= 2
        assert 0 <= row["labels"]["mean"] <= row["labels"]["max"] <= 1
    # Both recorded steps were attacked in the trained configuration.
    leakage = json.loads((tmp_path / "report" / "runs" / "int8_gradient_noise" / "leakage.json").read_text())
    assert all(len(steps) == 2 for steps in leakage["attacks"]["whitebox"].values())
    out = tmp_path / "report"
    markdown = (out / "report.md").read_text()
    assert (out / "privacy_utility.png").is_file() and "## Recommendation" in markdown
    assert "residual SSIM over another patient's" in markdown
    assert json.loads((out / "report.json").read_text())["frontier"]
