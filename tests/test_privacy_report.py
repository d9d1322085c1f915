"""The privacy-utility sweep end to end on tiny data: job filters in the simulator, attacks, report."""

import json

import pytest
from helpers import TINY_NETWORK, TINY_SIZE

from split_unet.errors import DataError
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


def _image_entry(excess, residual_over_other):
    return {"ssim": 0.35 + excess, "prior_ssim": 0.35, "excess_ssim": excess, "residual_ssim": 0.3 + residual_over_other,
            "excess_residual_ssim": residual_over_other, "excess_tumour_ssim": excess}


def _labels_entry(dice):
    return {"dice_wt": dice, "random_dice_wt": 0.02, "level": 1}


def _stored_sweep(folder, defended_steps):
    """A sweep of stored results only: an undefended reference (labels and Dice, no image attack, as the oldest
    files hold) and a defended run whose white-box attack covers ``defended_steps``."""
    summaries = {"undefended": {"dice": {"mean": 0.80}}, "defended": {"dice": {"mean": 0.75},
                                                                     "bytes_per_step": {"total": 22}}}
    (folder / "summaries.json").write_text(json.dumps(summaries))
    (folder / "leakage_undefended.json").write_text(json.dumps(
        {"attacks": {"labels": {"flair": {"1": _labels_entry(0.85)}}}}))
    (folder / "leakage_defended.json").write_text(json.dumps({"attacks": {
        "whitebox": {"flair": {str(step): _image_entry(0.01 * step, -0.1) for step in defended_steps}},
        "labels": {"flair": {"1": _labels_entry(0.09)}}}}))
    sweep = {"configurations": [
        {"name": "undefended", "reference": True,
         "stored": {"summary": "summaries.json", "entry": "undefended", "leakage": "leakage_undefended.json"}},
        {"name": "defended", "stored": {"summary": "summaries.json", "entry": "defended",
                                        "leakage": "leakage_defended.json"}}]}
    sweep_file = folder / "sweep.json"
    sweep_file.write_text(json.dumps(sweep))
    return sweep_file, sweep


def test_stored_results_are_reported_as_they_are_without_data_training_or_attacks(tmp_path):
    sweep_file, _ = _stored_sweep(tmp_path, defended_steps=(1, 192))
    report = run_sweep(sweep_file, None, tmp_path / "report", log=lambda line: pytest.fail(f"trained: {line}"))
    rows = {row["name"]: row for row in report["rows"]}
    # The worst step (192: excess 1.92) of the stored white-box entries, the reference's labels only.
    assert rows["defended"]["images"]["excess_ssim"]["value"] == pytest.approx(1.92)
    assert rows["defended"]["attacked"] == {"whitebox": [1, 192], "labels": [1]}
    assert rows["defended"]["bytes_per_step"] == 22 and "images" not in rows["undefended"]
    # The reference has no image attack and is still the reference: its Dice and labels set the targets.
    assert "label-leakage Dice <= 0.5 x undefended, mean Dice cost <= 0.03 (undefended: mean Dice 0.800, " \
           "label Dice 0.85)" in report["verdict"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| whitebox: 1/192; labels: 1 |" in markdown and "| labels: 1 |" in markdown


@pytest.mark.parametrize("break_it, field", [
    (lambda sweep: sweep["configurations"][1]["stored"].update(leakage="missing.json"), "missing.json"),
    (lambda sweep: sweep["configurations"][1]["stored"].update(entry="nobody"), "stored.entry"),
    (lambda sweep: sweep["configurations"][1]["stored"].pop("summary"), "stored.summary"),
    (lambda sweep: sweep["configurations"].append({"name": "to train"}), "sites"),
])
def test_a_bad_stored_configuration_is_refused_naming_it_and_nothing_is_written(tmp_path, break_it, field):
    sweep_file, sweep = _stored_sweep(tmp_path, defended_steps=(1,))
    break_it(sweep)
    sweep_file.write_text(json.dumps(sweep))
    with pytest.raises(DataError) as refused:
        run_sweep(sweep_file, None, tmp_path / "report", log=lambda _: None)
    assert field in str(refused.value)
    assert ("'defended'" in str(refused.value)) or ("'to train'" in str(refused.value))
    assert not (tmp_path / "report").exists()


def test_a_row_attacked_at_fewer_steps_is_a_lower_bound_neither_recommended_nor_on_the_frontier(tmp_path):
    sweep_file, sweep = _stored_sweep(tmp_path, defended_steps=(1, 192))
    # Private at its one attacked step and as cheap as the undefended run: it would be recommended if its worst
    # case were not a lower bound.
    (tmp_path / "leakage_last_step.json").write_text(json.dumps({"attacks": {
        "whitebox": {"flair": {"192": _image_entry(-0.2, -0.2)}}, "labels": {"flair": {"1": _labels_entry(0.05)}}}}))
    summaries = json.loads((tmp_path / "summaries.json").read_text())
    summaries["last step"] = {"dice": {"mean": 0.80}}
    (tmp_path / "summaries.json").write_text(json.dumps(summaries))
    sweep["configurations"].append({"name": "last step only", "stored": {
        "summary": "summaries.json", "entry": "last step", "leakage": "leakage_last_step.json"}})
    sweep_file.write_text(json.dumps(sweep))
    report = run_sweep(sweep_file, None, tmp_path / "report", log=lambda _: None)
    assert report["recommended"] is None and report["frontier"] == ["defended"]
    assert "Left out as lower bounds (fewer attacks or steps than the others): last step only." in report["verdict"]
    # What the complete row misses, and by how much.
    assert "No configuration meets the image targets; the lowest excess SSIM over the prior is +1.92 " \
           "('defended', mean Dice 0.750)" in report["verdict"]
    assert "the least costly is 'defended' (mean Dice 0.750, cost 0.050; excess SSIM +1.92, residual SSIM -0.10" \
           in report["verdict"]


def test_the_committed_frontier_report_is_what_the_stored_results_give(project_root, tmp_path):
    """docs/privacy_frontier/report is rebuilt from the stored results by this code: a change to either that
    leaves the committed report stale fails here (rebuild it with the command in docs/privacy.md)."""
    folder = project_root / "docs" / "privacy_frontier"
    report = run_sweep(folder / "report_sweep.json", None, tmp_path, log=lambda _: None)
    committed = json.loads((folder / "report" / "report.json").read_text())
    assert report["verdict"] == committed["verdict"] and report["frontier"] == committed["frontier"]
    assert [(r["name"], r["dice"]) for r in report["rows"]] == [(r["name"], r["dice"]) for r in committed["rows"]]
    def table_and_verdict(path):  # every line but the one naming the sweep file's path
        return [line for line in path.read_text().splitlines() if not line.startswith("Sweep: ")]
    assert table_and_verdict(tmp_path / "report.md") == table_and_verdict(folder / "report" / "report.md")


def _scored(excess, corr, null_high=0.1, tumour_excess=None):
    """An image entry scored against the label-aware prior too: SSIM ``excess`` over it (tumour: ``tumour_excess``,
    default the same), a residual correlation ``corr`` (tumour alike) next to a null interval up to ``null_high``."""
    entry = {**_image_entry(excess, -0.1), "patients": 8, "label_excess_ssim": excess,
             "label_excess_tumour_ssim": excess if tumour_excess is None else tumour_excess}
    for prefix in ("", "tumour_"):
        entry.update({f"{prefix}residual_corr": corr, f"{prefix}residual_corr_ci": [corr - 0.05, corr + 0.05],
                      f"{prefix}null_residual_corr_ci": [null_high - 0.15, null_high],
                      f"{prefix}residual_corr_margin": corr - null_high, f"{prefix}residual_corr_patients": 8})
    return entry


STEPS = ("1", "96", "192")
HIJACKING = {"runs": {**{f"honest, seed {seed}": {"alarm_step": None} for seed in range(5)},
                      **{f"hijacking, seed {seed}": {"alarm_step": 1} for seed in range(3)}}}


def _threat_attacks(completion_corr=0.0):
    """Every attack at steps 1, 96, 192 on two sites: the honest server's within the targets except the model
    completion's correlation (``completion_corr``, at step 192 on t1gd), a leaked encoder's far above."""
    attacks = {attack: {site: {step: _scored(0.01, 0.02) for step in STEPS} for site in ("flair", "t1gd")}
               for attack in ("unsplit", "surrogate", "completion", "learned", "whitebox")}
    attacks["completion"]["t1gd"]["192"] = _scored(0.03, completion_corr)
    attacks["learned"]["flair"]["96"] = _scored(0.30, 0.6, tumour_excess=0.5)
    attacks["labels"] = {site: {step: _labels_entry(0.08) for step in STEPS} for site in ("flair", "t1gd")}
    return attacks


def test_the_report_names_the_configuration_closest_to_threat_model_1_and_by_how_much_it_misses(tmp_path):
    sweep_file, sweep = _stored_sweep(tmp_path, defended_steps=(1,))
    summaries = json.loads((tmp_path / "summaries.json").read_text())
    stored = {"summary": "summaries.json", "entry": "defended", "leakage": "leakage_defended_threats.json"}
    configurations = []
    for name, dice, corr in (("defended", 0.75, 0.35), ("stronger", 0.70, 0.2), ("strongest", 0.60, 0.3)):
        summaries[name] = {"dice": {"mean": dice}}
        (tmp_path / f"leakage_{name}_threats.json").write_text(json.dumps({"attacks": _threat_attacks(corr)}))
        configurations.append({"name": name, "shipped": name == "defended",
                               "stored": {**stored, "entry": name, "leakage": f"leakage_{name}_threats.json"}})
    (tmp_path / "summaries.json").write_text(json.dumps(summaries))
    sweep["threat_models"] = {"configurations": configurations}
    sweep_file.write_text(json.dumps(sweep))
    run_sweep(sweep_file, None, tmp_path / "report", log=lambda _: None)
    markdown = (tmp_path / "report" / "report.md").read_text()
    # Every margin equals its tumour-region twin here; the stronger configuration's (0.2 against a null up to 0.1)
    # is the smallest miss.
    assert "No configuration measured meets threat model (1). Closest: stronger: mean Dice 0.700, cost 0.100 " \
           "against the undefended run (target at most 0.03: missed by 0.070); its residual correlation in the " \
           "tumour region (margin over its null) misses its target by 0.10." in markdown
    assert "Meeting threat model (1)" not in markdown


def test_threat_models_take_each_adversarys_attacks_only():
    from split_unet.studies.privacy_report import threat_models

    honest, malicious, leaked = threat_models(_threat_attacks(completion_corr=0.35), HIJACKING)
    assert honest["name"] == "honest-but-curious server" and honest["promised"] and not leaked["promised"]
    assert honest["attacks"] == ["completion", "labels", "surrogate", "unsplit"] and honest["complete"]
    assert honest["steps"] == [1, 96, 192] and honest["patients"] == 8
    # Within the SSIM targets, but the completion's correlation lies 0.25 above its null's interval: missed.
    assert honest["label_excess_ssim"]["value"] == pytest.approx(0.03)
    assert honest["residual_corr_margin"] == {**honest["residual_corr_margin"], "value": pytest.approx(0.25),
                                              "attack": "completion", "site": "t1gd", "step": 192,
                                              "null_residual_corr_ci": pytest.approx([-0.05, 0.1])}
    assert not honest["met"]
    # The leaked encoder's worst is its own attacks'.
    assert leaked["attacks"] == ["learned", "whitebox"] and leaked["label_excess_ssim"]["value"] == pytest.approx(0.3)
    assert leaked["label_excess_tumour_ssim"]["value"] == pytest.approx(0.5) and not leaked["met"]
    # The hijacking server is stopped at step 1: it holds what an honest server holds at step 1, which is within.
    assert malicious["attacks"][0] == "hijacking" and malicious["steps"] == [1]
    assert malicious["detection"] == {"alarm_steps": [1, 1, 1], "honest_runs": 5, "false_alarms": 0, "met": True}
    assert malicious["met"]


def test_a_threat_model_meets_its_targets_only_when_every_attack_ran_at_every_step():
    from split_unet.studies.privacy_report import threat_models

    attacks = _threat_attacks()
    honest, _, _ = threat_models(attacks, HIJACKING)
    assert honest["met"] and honest["verdict"] == "met"
    del attacks["completion"]["flair"]["96"]
    honest, _, _ = threat_models(attacks, HIJACKING)
    assert not honest["complete"] and not honest["met"] and honest["verdict"] == "incomplete"
    assert honest["not_run"] == {"completion": {"flair": [96]}}
    # What was measured already misses: more attacks or steps cannot bring the worst case back within the target.
    attacks["unsplit"]["flair"]["96"] = _scored(0.01, 0.3)
    honest, malicious, leaked = threat_models(attacks, HIJACKING)
    assert not honest["complete"] and honest["verdict"] == "missed"
    assert malicious["verdict"] == "met" and leaked["verdict"] == "missed"  # alarm at step 1, before step 96
    del attacks["completion"]
    honest, malicious, _ = threat_models(attacks, {"runs": {**HIJACKING["runs"], "honest, seed 9": {"alarm_step": 3}}})
    assert honest["missing_attacks"] == ["completion"] and not honest["met"]
    assert malicious["detection"]["false_alarms"] == 1 and not malicious["met"] and malicious["verdict"] == "missed"


def test_a_threat_model_is_incomplete_while_an_attack_lacks_a_site():
    from split_unet.studies.privacy_report import threat_models

    attacks = _threat_attacks()
    del attacks["surrogate"]["t1gd"]
    honest, _, _ = threat_models(attacks, HIJACKING)
    assert not honest["complete"] and honest["verdict"] == "incomplete"
    assert honest["not_run"] == {"surrogate": {"t1gd": [1, 96, 192]}}


def test_the_shipped_configuration_is_reported_by_threat_model(tmp_path):
    sweep_file, sweep = _stored_sweep(tmp_path, defended_steps=(1,))
    (tmp_path / "leakage_threats.json").write_text(json.dumps({"attacks": _threat_attacks(completion_corr=0.35)}))
    (tmp_path / "leakage_stronger.json").write_text(json.dumps({"attacks": _threat_attacks()}))
    summaries = json.loads((tmp_path / "summaries.json").read_text())
    summaries["stronger"] = {"dice": {"mean": 0.70}}
    (tmp_path / "summaries.json").write_text(json.dumps(summaries))
    (tmp_path / "hijacking.json").write_text(json.dumps(HIJACKING))
    stored = {"summary": "summaries.json", "entry": "defended", "leakage": "leakage_threats.json"}
    sweep["threat_models"] = {"hijacking": "hijacking.json", "configurations": [
        {"name": "stronger", "stored": {**stored, "entry": "stronger", "leakage": "leakage_stronger.json"}},
        {"name": "defended", "shipped": True, "stored": stored}]}
    sweep_file.write_text(json.dumps(sweep))
    report = run_sweep(sweep_file, None, tmp_path / "report", log=lambda _: None)
    assert [t["name"] for t in report["threat_models"]] == ["honest-but-curious server", "malicious server",
                                                            "leaked encoder"]
    assert [t["met"] for t in report["threat_models"]] == [False, True, False]
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["threat_models"] == json.loads(json.dumps(report["threat_models"]))
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## By threat model" in markdown
    assert "| honest-but-curious server | yes | completion, labels, surrogate, unsplit | 1/96/192 | 8 | 0.08 | +0.03 " \
           "(t1gd, completion, step 192)" in markdown
    assert "+0.35 [+0.30, +0.40] (-0.05 to +0.10; margin +0.25) (t1gd, completion, step 192)" in markdown
    assert "Mean Dice cost of the shipped scope: 0.050 (0.750 against 0.800 undefended; target at most 0.03: " \
           "missed by 0.020)." in markdown
    # The candidates against the honest-but-curious server, the shipped scope first.
    assert [c["name"] for c in saved["threat_model_configurations"]] == ["defended", "stronger"]
    assert "| stronger | 0.700 | +0.03 (t1gd, completion, step 192) |" in markdown
    assert markdown.count("| yes | met |") == 2  # the malicious server's row and the stronger one's: complete, met
    assert markdown.count("| yes | missed |") == 3  # the honest server's and the leaked encoder's rows, the shipped one's
    assert "Meeting threat model (1): stronger: mean Dice 0.700, cost 0.100 against the undefended run (target at " \
           "most 0.03: missed by 0.070)." in markdown
    # Exactly one shipped configuration.
    sweep["threat_models"]["configurations"][0]["shipped"] = True
    sweep_file.write_text(json.dumps(sweep))
    with pytest.raises(DataError, match="shipped"):
        run_sweep(sweep_file, None, tmp_path / "again", log=lambda _: None)
