"""The worst recorded step and the strongest attack, from hand-made leakage.json entries."""

import pytest

from split_unet.studies.leakage import is_complete, worst_case

pytestmark = pytest.mark.unit


def _image(ssim, prior, residual, tumour):
    return {"ssim": ssim, "prior_ssim": prior, "excess_ssim": ssim - prior, "residual_ssim": residual,
            "excess_tumour_ssim": tumour}


def _labels(level_dice):
    per_level = {str(level): {"dice_wt": dice, "random_dice_wt": 0.01} for level, dice in level_dice.items()}
    level = max(level_dice, key=level_dice.get)
    return {"level": level, **per_level[str(level)], "per_level": per_level}


ATTACKS = {
    # Early steps leak more than the last one: the worst case must not be the last step.
    "whitebox": {"flair": {"1": _image(0.85, 0.35, 0.60, 0.40), "96": _image(0.50, 0.35, 0.20, 0.10),
                           "192": _image(0.30, 0.35, 0.05, 0.00)}},
    # A weaker attack overall that still knows most about the tumour at the last step.
    "learned": {"flair": {"1": _image(0.60, 0.35, 0.30, 0.20), "192": _image(0.55, 0.35, 0.25, 0.45)}},
    "labels": {"flair": {"1": _labels({0: 0.2, 1: 0.7}), "192": _labels({0: 0.4, 1: 0.3})}},
}


def test_worst_step_and_strongest_attack_per_metric():
    worst = worst_case(ATTACKS)
    images = worst["images"]["flair"]
    assert images["excess_ssim"] == {"value": pytest.approx(0.50), "attack": "whitebox", "step": 1,
                                     "ssim": 0.85, "prior_ssim": 0.35}
    assert images["residual_ssim"] == {"value": 0.60, "attack": "whitebox", "step": 1}
    assert images["excess_tumour_ssim"] == {"value": 0.45, "attack": "learned", "step": 192}
    # Label leakage: the step and level whose estimate matches the tumour most.
    assert worst["labels"]["flair"] == {"dice_wt": 0.7, "random_dice_wt": 0.01, "step": 1, "level": 1}


def test_missing_attacks_are_absent_and_old_entries_are_incomplete():
    assert worst_case({"labels": ATTACKS["labels"]})["images"] == {}
    assert is_complete("whitebox", ATTACKS["whitebox"]) and is_complete("labels", ATTACKS["labels"])
    # Entries written before the prior and every level were scored: the sweep attacks those runs again.
    assert not is_complete("whitebox", {"flair": {"1": {"ssim": 0.9, "psnr": 30.0, "nmi": 1.5}}})
    assert not is_complete("labels", {"flair": {"1": {"level": 0, "dice_wt": 0.8, "random_dice_wt": 0.02}}})
    assert not is_complete("whitebox", {})


def _report_row(name, dice, excess, residual, labels, reference=False):
    return {"name": name, "configuration": {"reference": reference}, "dice": dice,
            "images": {"excess_ssim": {"value": excess, "ssim": 0.35 + excess, "prior_ssim": 0.35, "site": "flair",
                                       "attack": "whitebox", "step": 1},
                       "residual_ssim": {"value": residual, "site": "flair", "attack": "learned", "step": 1}},
            "labels": {"mean": labels, "max": labels}}


def test_the_report_judges_images_against_the_prior_not_a_raw_ssim():
    from split_unet.studies.privacy_report import _row, recommend

    row = _row("defended", {}, {"dice": {"mean": 0.8}}, {"attacks": ATTACKS})
    assert row["images"]["excess_ssim"]["value"] == pytest.approx(0.5) and row["images"]["excess_ssim"]["step"] == 1
    assert row["labels"] == {"per_site": worst_case(ATTACKS)["labels"], "max": 0.7, "mean": 0.7}

    reference = _report_row("undefended", 0.80, 0.60, 0.90, 0.40, reference=True)
    # SSIM 0.38 "looks" private but an attacker still recovers the patient's own content (residual 0.3).
    knows_the_patient = _report_row("knows the patient", 0.79, 0.03, 0.30, 0.10)
    at_the_prior = _report_row("at the prior", 0.78, 0.02, 0.05, 0.10)
    best, verdict = recommend([reference, knows_the_patient, at_the_prior])
    assert best is at_the_prior and "over the prior" in verdict
    best, verdict = recommend([reference, knows_the_patient])
    assert best is None and "No configuration meets the image targets" in verdict
