"""Leakage relative to the population prior, on synthetic volumes: a shared anatomy plus a patient's own lesion."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from split_unet.leakage.metrics import (image_similarity, other_patient_similarity, prior_relative_similarity,
                                       tumour_surroundings)

pytestmark = pytest.mark.unit

SIZE = 24


def _anatomy() -> np.ndarray:
    """A smooth head-like volume every patient shares."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(axis=0))
    return np.where(radius < 0.8, 1.0 + 0.5 * np.cos(6 * radius), 0.0)


def _patients(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (B, 1, S, S, S), tumour masks (B, S, S, S)): the anatomy plus a bright lesion and a little noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"))
    images, masks = [], []
    for _ in range(count):
        centre = rng.integers(8, SIZE - 8, size=3)
        lesion = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0)) < 4
        images.append(_anatomy() + 1.5 * lesion + 0.05 * rng.standard_normal((SIZE,) * 3))
        masks.append(lesion)
    return np.stack(images)[:, None], np.stack(masks)


@pytest.fixture(scope="module")
def cohort():
    """(attacked patients, their tumour surroundings, atlas = mean of 8 auxiliary patients)."""
    truth, masks = _patients(2, seed=0)
    auxiliary, _ = _patients(8, seed=1)
    return truth, tumour_surroundings(masks), auxiliary.mean(axis=0)


def test_a_reconstruction_equal_to_the_atlas_knows_nothing_beyond_the_prior(cohort):
    truth, region, atlas = cohort
    guess = np.broadcast_to(atlas[None], truth.shape)
    scores = prior_relative_similarity(guess, truth, atlas, region)
    # The atlas alone already looks like each patient: the reason for reporting the excess.
    assert scores["prior_ssim"] > 0.3
    assert scores["excess_ssim"] == pytest.approx(0.0, abs=1e-9)
    assert scores["excess_nmi"] == pytest.approx(0.0, abs=1e-9)
    assert scores["excess_tumour_ssim"] == pytest.approx(0.0, abs=1e-9)
    # Nothing patient-specific: the residual's SSIM is at its floor; NMI's floor is 1 (independent images).
    assert abs(scores["residual_ssim"]) < 0.02
    assert scores["residual_nmi"] == pytest.approx(1.0, abs=1e-6)


def test_a_reconstruction_unrelated_to_the_patient_has_no_patient_specific_content(cohort):
    """Noise, or the atlas's negative, shares nothing with the patient beyond the anatomy: residual SSIM ~0.

    Subtracting the atlas from both would leave -atlas in both residuals and score such a guess high.
    """
    truth, region, atlas = cohort
    noise = np.random.default_rng(5).standard_normal(truth.shape)
    for guess in (noise, -np.broadcast_to(atlas[None], truth.shape) + 0.01 * noise):
        scores = prior_relative_similarity(guess, truth, atlas, region)
        assert abs(scores["residual_ssim"]) < 0.05 and scores["residual_nmi"] < 1.05


def test_the_truth_scores_the_maximum(cohort):
    truth, region, atlas = cohort
    scores = prior_relative_similarity(truth, truth, atlas, region)
    assert scores["ssim"] == pytest.approx(1.0) and scores["residual_ssim"] == pytest.approx(1.0)
    assert scores["residual_nmi"] == pytest.approx(2.0) and scores["tumour_ssim"] == pytest.approx(1.0)
    assert scores["excess_ssim"] == pytest.approx(1.0 - scores["prior_ssim"])
    assert scores["excess_tumour_ssim"] > 0.3


def test_the_lesion_alone_is_patient_specific_content(cohort):
    """A reconstruction that has the lesion but a blurred anatomy beats the atlas in the tumour and residual."""
    truth, region, atlas = cohort
    partial = np.stack([gaussian_filter(t, 1.0) for t in truth])
    sign_flipped = prior_relative_similarity(-partial, truth, atlas, region, sign_invariant=True)
    scores = prior_relative_similarity(partial, truth, atlas, region)
    assert scores["residual_ssim"] > 0.3 and scores["excess_tumour_ssim"] > 0.1
    assert sign_flipped == pytest.approx(scores)


def test_another_patients_image_is_scored_as_a_reconstruction_and_the_best_one_is_kept(cohort):
    truth, region, _ = cohort
    others, _ = _patients(4, seed=2)
    scores = other_patient_similarity(truth, others, region)
    assert scores["other_patients"] == 4
    # Each is scored against the atlas of the others (leave one out), and the maximum is taken.
    each = [prior_relative_similarity(np.broadcast_to(others[i][None], truth.shape), truth,
                                      np.delete(others, i, axis=0).mean(axis=0), region) for i in range(4)]
    for name in ("excess_ssim", "residual_ssim", "excess_tumour_ssim"):
        assert scores[f"other_{name}"] == pytest.approx(max(s[name] for s in each))
    # Another patient's lesion lies elsewhere: less patient-specific content than the truth's own 1.
    assert scores["other_residual_ssim"] < 0.9
    # The patient's own image among the others scores the truth's maximum.
    assert other_patient_similarity(truth[:1], np.concatenate([others, truth[:1]]))["other_residual_ssim"] == \
        pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        other_patient_similarity(truth, others[:1])


def test_tumour_surroundings_grow_the_mask_and_keep_an_empty_one_empty():
    mask = np.zeros((2, 9, 9, 9), bool)
    mask[0, 4, 4, 4] = True
    grown = tumour_surroundings(mask, margin=2)
    assert grown[0].sum() == 25 and grown[0, 4, 4, 6] and not grown[0, 4, 6, 6]  # an L1 ball of radius 2
    assert not grown[1].any()


def test_patients_without_a_tumour_are_left_out_of_the_region_scores(cohort):
    truth, region, atlas = cohort
    empty = np.zeros_like(region)
    assert "tumour_ssim" not in prior_relative_similarity(truth, truth, atlas, empty)
    one = region.copy()
    one[1] = False
    kept = prior_relative_similarity(truth[:1], truth[:1], atlas, region[:1])
    assert prior_relative_similarity(truth, truth, atlas, one)["prior_tumour_ssim"] == pytest.approx(
        kept["prior_tumour_ssim"])


def test_image_similarity_is_unchanged_for_sign_invariant_scoring():
    truth, _ = _patients(2, seed=3)
    assert image_similarity(torch.from_numpy(-truth), truth, sign_invariant=True)["ssim"] == pytest.approx(1.0)
