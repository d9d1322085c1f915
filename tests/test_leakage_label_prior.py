"""The label-aware prior and the residual correlation with its null, on synthetic volumes: a shared anatomy, each
patient's lesion with two sub-regions, and patient-specific texture outside the lesion."""

import numpy as np
import pytest
from scipy import stats

from split_unet.leakage.metrics import (label_aware_prior, mean_interval, prior_relative_similarity,
                                       residual_correlation, subregion_means, subregions, tumour_surroundings)

pytestmark = pytest.mark.unit

SIZE = 20


def _cohort(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (B, 1, S, S, S), label maps (B, S, S, S)): a shared anatomy, a lesion of oedema (label 1, +1.0) around
    an enhancing core (label 3, +2.0) placed per patient, and the patient's own smooth texture everywhere."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij")).astype(float)
    radius = np.sqrt(((grid - SIZE / 2) ** 2).sum(axis=0)) / SIZE
    anatomy = np.where(radius < 0.45, 1.0 + 0.5 * np.cos(12 * radius), 0.0)
    images, labels = [], []
    for _ in range(count):
        centre = rng.integers(7, SIZE - 7, size=3)
        distance = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
        label = np.where(distance < 2.5, 3, np.where(distance < 4.5, 1, 0)).astype(np.uint8)
        texture = np.cos(grid[0] * rng.uniform(0.5, 1.5) + rng.uniform(0, 6)) * np.sin(grid[1] * rng.uniform(0.5, 1.5))
        image = anatomy + 1.0 * (label == 1) + 2.0 * (label == 3) + 0.3 * texture * (anatomy > 0)
        images.append(image + 0.02 * rng.standard_normal(image.shape))
        labels.append(label)
    return np.stack(images)[:, None], np.stack(labels)


def _regions(labels: np.ndarray) -> np.ndarray:
    """(B, 3, *S) WT/TC/ET masks of MSD label maps, as the server holds them."""
    return np.stack([labels > 0, (labels == 2) | (labels == 3), labels == 3], axis=1)


@pytest.fixture(scope="module")
def cohort():
    truth, labels = _cohort(8, seed=0)
    auxiliary, aux_labels = _cohort(10, seed=1)
    atlas = auxiliary.mean(axis=0)
    prior = label_aware_prior(atlas, labels, subregion_means(auxiliary, aux_labels))
    return truth, labels, atlas, prior


def test_subregions_of_the_servers_nested_regions_are_the_label_map():
    _, labels = _cohort(3, seed=2)
    assert np.array_equal(subregions(_regions(labels)), labels)


def test_the_label_aware_prior_paints_each_sub_region_at_its_auxiliary_mean(cohort):
    truth, labels, atlas, prior = cohort
    auxiliary, aux_labels = _cohort(10, seed=1)
    means = subregion_means(auxiliary, aux_labels)
    # Every patient weighs alike: the mean of each patient's own mean in the sub-region.
    assert means[3] == pytest.approx(np.mean([a[0][m == 3].mean() for a, m in zip(auxiliary, aux_labels)]))
    assert sorted(means) == [1, 3]
    assert prior.shape == truth.shape
    for index in range(len(truth)):
        assert np.allclose(prior[index, 0][labels[index] == 3], means[3])
        assert np.allclose(prior[index, 0][labels[index] == 1], means[1])
        assert np.array_equal(prior[index, 0][labels[index] == 0], atlas[0][labels[index] == 0])
    # A sub-region no auxiliary patient has (2 here) keeps the atlas.
    painted = label_aware_prior(atlas, np.full((1, *labels.shape[1:]), 2, dtype=np.uint8), means)
    assert np.array_equal(painted[0], atlas)


def test_the_label_aware_prior_knows_the_tumour_the_atlas_does_not(cohort):
    """What the server's labels alone give: in the tumour region the painted prior scores far above the atlas."""
    truth, labels, atlas, prior = cohort
    region = tumour_surroundings(labels > 0)
    against_atlas = prior_relative_similarity(prior, truth, atlas, region)
    assert against_atlas["excess_tumour_ssim"] > 0.2
    # Scored against itself (a prior per patient), it has no excess, whole or in the tumour.
    against_itself = prior_relative_similarity(prior, truth, prior, region)
    assert against_itself["excess_ssim"] == pytest.approx(0.0, abs=1e-12)
    assert against_itself["excess_tumour_ssim"] == pytest.approx(0.0, abs=1e-12)
    # A zero residual against any other scores SSIM's stabilising constants only: C1 C2 / ((mu^2 + C1)(var + C2)),
    # about 1e-5 here (C1 = 1e-4, C2 = 9e-4 on [0, 1]).
    assert against_itself["residual_ssim"] == pytest.approx(0.0, abs=1e-3)


def test_the_prior_itself_has_no_residual_correlation_and_the_truth_the_most(cohort):
    truth, labels, _, prior = cohort
    region = tumour_surroundings(labels > 0)
    nothing = residual_correlation(prior, truth, prior, region)
    assert nothing["residual_corr"] == 0.0 and nothing["tumour_residual_corr"] == 0.0
    everything = residual_correlation(3.0 * truth + 1.0, truth, prior, region)  # any scale and offset
    assert everything["residual_corr"] == pytest.approx(1.0)
    assert everything["residual_corr_ci"] == pytest.approx([1.0, 1.0])
    assert everything["residual_corr_margin"] > 0.5 and everything["residual_corr_patients"] == len(truth)


def test_weak_patient_specific_signal_stands_out_of_its_null_and_none_does_not(cohort):
    """A reconstruction = prior + a fifth of what the prior does not explain + much noise: SSIM barely moves, the
    correlation lies above the null's interval. Another patient's such reconstruction stays within it."""
    truth, labels, _, prior = cohort
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(truth.shape)
    weak = prior + 0.2 * (truth - prior) + 0.3 * noise
    scores = residual_correlation(weak, truth, prior)
    assert scores["residual_corr"] > 0.1 and scores["residual_corr_margin"] > 0
    low, high = scores["null_residual_corr_ci"]
    assert low < 0.05 and high < scores["residual_corr_ci"][0]
    assert prior_relative_similarity(weak, truth, prior)["excess_ssim"] < 0.1
    # Every patient's reconstruction moved to the next patient: the same patients' signal, none of it their own.
    shuffled = np.roll(weak, 1, axis=0)
    shuffled_priors = np.roll(prior, 1, axis=0)
    unrelated = shuffled - shuffled_priors + prior  # the other patient's residual on this patient's prior
    assert residual_correlation(unrelated, truth, prior)["residual_corr_margin"] <= 0


def test_the_null_of_a_patient_is_the_other_patients_reconstructions_against_its_truth():
    truth, labels = _cohort(3, seed=4)
    prior = np.zeros_like(truth[:1]) + truth.mean(axis=0, keepdims=True)
    recon = truth[[1, 2, 0]]  # each patient's reconstruction is the next patient's image
    scores = residual_correlation(recon, truth, prior)
    from split_unet.leakage.metrics import residual_from
    residuals = [residual_from(t[0], prior[0, 0]).ravel() for t in truth]
    # r_i pairs patient i's truth with i+1's image; n_i averages the two other reconstructions (images of i+2 and i).
    own = [np.corrcoef(residuals[(i + 1) % 3], residuals[i])[0, 1] for i in range(3)]
    null = [np.mean([np.corrcoef(residuals[j], residuals[i])[0, 1] for j in ((i + 2) % 3, i)]) for i in range(3)]
    assert scores["residual_corr"] == pytest.approx(np.mean(own))
    assert scores["null_residual_corr"] == pytest.approx(np.mean(null))


def test_mean_interval_is_students_t():
    low, high = mean_interval([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)  # sd 1, n 3
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half))
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([1.0])


def test_a_batch_of_one_has_no_null():
    truth, _ = _cohort(1, seed=5)
    with pytest.raises(ValueError, match="at least 2 patients"):
        residual_correlation(truth, truth, truth.mean(axis=0))
