"""The worst recorded step and the strongest attack, from hand-made leakage.json entries."""

import json

import pytest

from split_unet.studies.leakage import release_mechanism, steps_to_attack, worst_case
from split_unet.leakage.record import RECORD_FOLDER, step_folder

pytestmark = pytest.mark.unit


def _image(ssim, prior, residual, tumour, other_residual=0.30, label_prior=None, corr=0.0, null_high=0.1):
    """An entry; against the label-aware prior (``label_prior``, default the atlas's ``prior`` + 0.05) the same SSIM,
    and a residual correlation ``corr`` (tumour: twice it) next to a null interval up to ``null_high``."""
    label_prior = prior + 0.05 if label_prior is None else label_prior
    correlation = {}
    for prefix, value in (("", corr), ("tumour_", 2 * corr)):
        correlation.update({f"{prefix}residual_corr": value, f"{prefix}residual_corr_ci": [value - 0.1, value + 0.1],
                            f"{prefix}null_residual_corr_ci": [null_high - 0.2, null_high],
                            f"{prefix}residual_corr_margin": value - null_high, f"{prefix}residual_corr_patients": 8})
    return {"ssim": ssim, "prior_ssim": prior, "excess_ssim": ssim - prior, "residual_ssim": residual,
            "other_residual_ssim": other_residual, "excess_residual_ssim": residual - other_residual,
            "excess_tumour_ssim": tumour, "label_prior_ssim": label_prior, "label_excess_ssim": ssim - label_prior,
            "label_excess_tumour_ssim": tumour - 0.1, **correlation}


def _labels(level_dice):
    per_level = {str(level): {"dice_wt": dice, "random_dice_wt": 0.01} for level, dice in level_dice.items()}
    level = max(level_dice, key=level_dice.get)
    return {"level": level, **per_level[str(level)], "per_level": per_level}


ATTACKS = {
    # Early steps leak more than the last one: the worst case must not be the last step.
    "whitebox": {"flair": {"1": _image(0.85, 0.35, 0.60, 0.40), "96": _image(0.50, 0.35, 0.20, 0.10),
                           "192": _image(0.30, 0.35, 0.05, 0.00)}},
    # A weaker attack overall that still knows most about the tumour at the last step.
    # Its step-192 batch happens to resemble the auxiliary patients less: the most residual over another patient's.
    "learned": {"flair": {"1": {**_image(0.60, 0.35, 0.30, 0.20), "release_mechanism": []},
                          "192": {**_image(0.55, 0.35, 0.25, 0.45, other_residual=-0.40), "release_mechanism": []}}},
    "labels": {"flair": {"1": _labels({0: 0.2, 1: 0.7}), "192": _labels({0: 0.4, 1: 0.3})}},
}


def test_worst_step_and_strongest_attack_per_metric():
    worst = worst_case(ATTACKS)
    images = worst["images"]["flair"]
    assert images["excess_ssim"] == {"value": pytest.approx(0.50), "attack": "whitebox", "step": 1,
                                     "ssim": 0.85, "prior_ssim": 0.35}
    assert images["residual_ssim"] == {"value": 0.60, "attack": "whitebox", "step": 1}
    assert images["excess_residual_ssim"] == {"value": pytest.approx(0.65), "attack": "learned", "step": 192}
    assert images["excess_tumour_ssim"] == {"value": 0.45, "attack": "learned", "step": 192}
    # Label leakage: the step and level whose estimate matches the tumour most.
    assert worst["labels"]["flair"] == {"dice_wt": 0.7, "random_dice_wt": 0.01, "step": 1, "level": 1}


def test_the_worst_case_against_the_label_aware_prior_and_of_the_residual_correlation():
    attacks = {**ATTACKS, "surrogate": {"flair": {"96": _image(0.40, 0.35, 0.1, 0.0, corr=0.35)}}}
    images = worst_case(attacks)["images"]["flair"]
    assert images["label_excess_ssim"] == {"value": pytest.approx(0.45), "attack": "whitebox", "step": 1}
    assert images["label_excess_tumour_ssim"] == {"value": pytest.approx(0.35), "attack": "learned", "step": 192}
    # The correlation's peak carries the correlation, its interval and the null's.
    assert images["residual_corr_margin"] == {
        "value": pytest.approx(0.25), "attack": "surrogate", "step": 96, "residual_corr": 0.35,
        "residual_corr_ci": pytest.approx([0.25, 0.45]), "null_residual_corr_ci": pytest.approx([-0.1, 0.1]),
        "residual_corr_patients": 8}
    assert images["tumour_residual_corr_margin"]["residual_corr"] == pytest.approx(0.7)
    # Only a threat model's attacks: the surrogate alone.
    only = worst_case(attacks, only=("surrogate", "labels"))
    assert {peak["attack"] for peak in only["images"]["flair"].values()} == {"surrogate"}
    assert only["labels"]["flair"]["dice_wt"] == 0.7
    assert worst_case(attacks, only=("surrogate",))["labels"] == {}


def test_missing_attacks_are_absent():
    assert worst_case({"labels": ATTACKS["labels"]})["images"] == {}


def test_a_step_is_attacked_again_until_every_recorded_site_has_a_complete_entry(tmp_path):
    record = tmp_path / "simulator" / "server" / "simulate_job" / RECORD_FOLDER
    for step in (1, 96, 192):
        for site in ("flair", "t1w"):
            (record / step_folder(step)).mkdir(parents=True, exist_ok=True)
            (record / step_folder(step) / f"{site}.pt").touch()
    both = {site: ATTACKS["whitebox"]["flair"] for site in ("flair", "t1w")}
    assert steps_to_attack(tmp_path, "whitebox", both) == []
    # learned: step 96 never attacked; t1w not at all.
    assert steps_to_attack(tmp_path, "learned", ATTACKS["learned"]) == [1, 96, 192]
    assert steps_to_attack(tmp_path, "learned", {site: ATTACKS["learned"]["flair"] for site in both}) == [96]
    # Entries written before the label-aware prior was scored: attacked again.
    before_labels = {key: value for key, value in both["t1w"]["192"].items() if "corr" not in key}
    assert steps_to_attack(tmp_path, "whitebox", {**both, "t1w": {**both["t1w"], "192": before_labels}}) == [192]
    # Entries written before the prior, another patient's image and every level were scored: attacked again.
    old = {**both, "t1w": {**both["t1w"], "1": {"ssim": 0.9, "psnr": 30.0, "nmi": 1.5}}}
    assert steps_to_attack(tmp_path, "whitebox", old) == [1]
    before_other = {key: value for key, value in _image(0.9, 0.3, 0.5, 0.1).items() if "other" not in key
                    and key != "excess_residual_ssim" and "corr" not in key}
    assert steps_to_attack(tmp_path, "whitebox", {**both, "flair": {**both["flair"], "96": before_other}}) == [96]
    # Another patient's image is optional (``evaluate_leakage(reference=False)``).
    without_other = {key: value for key, value in _image(0.9, 0.3, 0.5, 0.1).items() if "other" not in key}
    assert steps_to_attack(tmp_path, "whitebox", {**both, "flair": {**both["flair"], "96": without_other}}) == []
    labels = {site: ATTACKS["labels"]["flair"] for site in both}
    assert steps_to_attack(tmp_path, "labels", labels) == [96]
    labels["t1w"] = {**labels["t1w"], "96": {"level": 0, "dice_wt": 0.8, "random_dice_wt": 0.02}}
    assert steps_to_attack(tmp_path, "labels", labels) == [96]
    assert steps_to_attack(tmp_path, "whitebox", {}) == [1, 96, 192]
    # A learned decoder trained before it went through the site's noise: attacked again.
    learned = {site: ATTACKS["learned"]["flair"] for site in both}
    learned["t1w"] = {**learned["t1w"], "96": _image(0.6, 0.35, 0.3, 0.2)}
    learned["flair"] = {**learned["flair"], "96": learned["flair"]["1"]}
    assert steps_to_attack(tmp_path, "learned", learned) == [96]


NOISE = {"path": "split_unet.filters.ActivationClipNoise", "args": {"clip_norm": 1000.0, "noise_multiplier": 0.003,
                                                                   "levels": [0]}}
BLOCKING = {"path": "split_unet.filters.LevelBlocking", "args": {"blocked_levels": [0]}}


def _site_workspace(root, job_groups, scopes, job_scope=None):
    run_dir = root / "simulator" / "flair" / "simulate_job"
    (run_dir / "app_flair" / "config").mkdir(parents=True)
    (run_dir / "app_flair" / "config" / "config_fed_client.json").write_text(
        json.dumps({"task_result_filters": job_groups}))
    (run_dir / "meta.json").write_text(json.dumps({"scope": job_scope} if job_scope else {}))
    (root / "simulator" / "flair" / "local").mkdir(parents=True)
    (root / "simulator" / "flair" / "local" / "privacy.json").write_text(
        json.dumps({"scopes": scopes, "default_scope": "clinical"}))


def test_the_learned_attack_knows_the_noise_of_the_job_and_of_the_scope_the_site_applied(tmp_path):
    scope_noise = {**NOISE, "path": "split_unet.filters.activation_privacy.ActivationClipNoise",
                   "args": {"clip_norm": 1.0, "noise_multiplier": 0.5}}
    job_groups = [{"tasks": ["split_unet_train", "split_unet_validate"], "filters": [BLOCKING, NOISE]},
                  {"tasks": ["split_unet_validate"], "filters": [{**NOISE, "args": {"clip_norm": 7.0}}]}]
    # A scope lists filter specs, as NVFlare's privacy.json does (a job groups them by task).
    scopes = [{"name": "clinical", "task_result_filters": [BLOCKING, scope_noise]},
              {"name": "undefended", "task_result_filters": []}]
    _site_workspace(tmp_path / "default", job_groups, scopes)
    # The job's noise on training answers (not its validation-only filter), then the default scope's; no blocking.
    assert release_mechanism(tmp_path / "default", "flair") == [NOISE["args"], scope_noise["args"]]
    _site_workspace(tmp_path / "opt_out", job_groups, scopes, job_scope="undefended")
    assert release_mechanism(tmp_path / "opt_out", "flair") == [NOISE["args"]]
    _site_workspace(tmp_path / "none", [], [])
    assert release_mechanism(tmp_path / "none", "flair") == []
