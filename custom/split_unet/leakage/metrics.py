"""How much a reconstruction or an estimated mask reveals: image similarity and Dice, as plain floats.

SSIM and PSNR follow the settings that match MONAI's ``SSIMMetric`` / ``PSNRMetric`` (scikit-image is
much faster on the CPU): ``structural_similarity(..., data_range=1, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``; scikit-image's default settings give different values.

A similarity alone does not say what an attack learnt: every patient shares one anatomy, so the mean of
other patients' images (an atlas, no activations at all) already scores well. ``prior_relative_similarity``
scores a reconstruction next to that population prior, as the excess over it, on the residual from the
atlas (patient-specific content) and inside the tumour and its surroundings. ``other_patient_similarity`` scores
another real patient's image the same way: what a real-looking image that knows nothing of the patient reaches.

The server holds more than the atlas: every patient's labels. ``label_aware_prior`` paints them on the atlas (each
sub-region at the auxiliary patients' mean intensity in it), the best guess of a server that receives nothing, and
``residual_correlation`` asks whether a reconstruction holds any patient-specific signal beyond a prior, weak or not:
the correlation of what the prior does not explain in the reconstruction and in the truth, next to the same score
for another patient's reconstruction of the batch (its null), with 95 % intervals over the patients.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage, stats
from skimage.metrics import normalized_mutual_information, peak_signal_noise_ratio, structural_similarity

__all__ = ["image_similarity", "label_aware_prior", "mask_dice", "mean_interval", "orient_sign",
           "other_patient_similarity", "prior_relative_similarity", "residual_correlation", "residual_from",
           "robust_unit_range", "subregion_means", "subregions", "tumour_surroundings"]

NMI_BINS = 64
METRICS = ("ssim", "psnr", "nmi")
# Voxels the tumour region grows by: the oedema's rim and the tissue it displaces belong to what a
# reconstruction should not reveal (3 voxels: 3 mm at 1 mm, a tenth of a 32^3 phantom's tumour radius or more).
TUMOUR_MARGIN = 3
RESIDUAL_RELATIVE_PRECISION = 1e-9  # float64 least squares is exact to ~1e-13 of the volume's scale
CONFIDENCE = 0.95


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def robust_unit_range(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``volume`` mapped linearly to [0, 1] by its own 1st and 99th percentiles (within ``mask``), clipped.

    A reconstruction's intensity scale and offset are arbitrary (instance normalisation discards them),
    so each volume is compared on its own robust range. A constant volume maps to zeros.
    """
    volume = volume.astype(np.float64)
    low, high = np.percentile(volume if mask is None else volume[mask], (1, 99))
    if high <= low:
        return np.zeros_like(volume)
    return np.clip((volume - low) / (high - low), 0.0, 1.0)


def image_similarity(reconstruction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray,
                     mask: torch.Tensor | np.ndarray | None = None, sign_invariant: bool = False) -> dict[str, float]:
    """SSIM, PSNR (dB) and normalised mutual information, per sample then averaged.

    Args:
        reconstruction, truth: (B, 1, *S) images (2D or 3D), each rescaled by ``robust_unit_range``.
        mask: optional (B, *S) or (B, 1, *S) bool region (e.g. the brain) to score; SSIM is then the mean
            of the SSIM map over the region, PSNR and NMI use its voxels only.
        sign_invariant: score each sample's reconstruction or its negative, whichever has the higher SSIM
            (for attacks that cannot tell the sign, e.g. UnSplit).

    Returns:
        ``{"ssim", "psnr", "nmi"}``. NMI is scikit-image's (1 for independent images, 2 for identical).
    """
    recon, true = _numpy(reconstruction)[:, 0], _numpy(truth)[:, 0]
    if recon.shape != true.shape:
        raise ValueError(f"reconstruction {recon.shape} and truth {true.shape} differ in shape")
    masks = [None] * len(true) if mask is None else _numpy(mask).astype(bool).reshape(true.shape)
    if sign_invariant:
        recon = orient_sign(recon[:, None], true[:, None], mask)[:, 0]
    scores = {name: [] for name in METRICS}
    for r, t, m in zip(recon, true, masks):
        t, r = robust_unit_range(t, m), robust_unit_range(r, m)
        region = slice(None) if m is None else m
        scores["ssim"].append(_ssim(r, t, m))
        scores["psnr"].append(peak_signal_noise_ratio(t[region], r[region], data_range=1.0))
        scores["nmi"].append(normalized_mutual_information(t[region], r[region], bins=NMI_BINS))
    return {name: float(np.mean(values)) for name, values in scores.items()}


def orient_sign(reconstruction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray,
                mask: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """(B, 1, *S) reconstruction with each sample negated where its negative has the higher SSIM to ``truth``.

    For attacks that cannot tell the contrast's sign (UnSplit): the evaluation gives them the better one.
    """
    recon, true = _numpy(reconstruction).astype(np.float64), _numpy(truth)
    masks = [None] * len(true) if mask is None else _numpy(mask).astype(bool).reshape(true[:, 0].shape)
    out = recon.copy()
    for index, (r, t, m) in enumerate(zip(recon[:, 0], true[:, 0], masks)):
        t = robust_unit_range(t, m)
        if _ssim(robust_unit_range(-r, m), t, m) > _ssim(robust_unit_range(r, m), t, m):
            out[index, 0] = -r
    return out


def tumour_surroundings(whole_tumour: torch.Tensor | np.ndarray, margin: int = TUMOUR_MARGIN) -> np.ndarray:
    """(B, *S) bool: each sample's whole-tumour mask grown by ``margin`` voxels (face-connected steps)."""
    masks = _numpy(whole_tumour).astype(bool)
    structure = ndimage.generate_binary_structure(masks.ndim - 1, 1)
    return np.stack([ndimage.binary_dilation(m, structure, iterations=margin) if margin > 0 and m.any() else m
                     for m in masks])


def residual_from(volume: np.ndarray, atlas: np.ndarray) -> np.ndarray:
    """What of ``volume`` the atlas does not explain: the least-squares residual of ``volume`` on (atlas, 1).

    Fitting the atlas's scale and offset, rather than subtracting it, makes the residual independent of the
    arbitrary intensity scale and keeps the atlas out of both residuals: ``volume - atlas`` would leave
    ``-atlas`` in the residual of any reconstruction that lacks the anatomy, and that shared term alone would
    make it look like the truth's residual.
    """
    design = np.stack([atlas.ravel(), np.ones(atlas.size)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, volume.ravel(), rcond=None)
    residual = volume - (design @ coefficients).reshape(volume.shape)
    # What the atlas explains up to rounding has no residual (the unit range would blow rounding up to [0, 1]).
    scale = np.abs(volume).max()
    return residual if np.abs(residual).max() > RESIDUAL_RELATIVE_PRECISION * scale else np.zeros_like(volume)


def prior_relative_similarity(reconstruction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray,
                              atlas: torch.Tensor | np.ndarray, region: torch.Tensor | np.ndarray | None = None,
                              sign_invariant: bool = False) -> dict[str, float]:
    """A reconstruction's similarity to the truth next to the population prior's, and what only it knows.

    Args:
        reconstruction, truth: (B, 1, *S).
        atlas: (1, *S) or (1, 1, *S): the mean image of auxiliary patients of the same modality, the best
            guess without any activation; or (B, 1, *S), a prior per patient (``label_aware_prior``).
        region: optional (B, *S) bool, the tumour and its surroundings (``tumour_surroundings``); samples
            whose region is empty are left out of the region's scores.
        sign_invariant: as in ``image_similarity`` (the sign is chosen once, against the whole image).

    Returns:
        ``ssim``, ``psnr``, ``nmi`` of the reconstruction; ``prior_<m>`` of the atlas scored the same way
        against each patient; ``excess_<m>`` = attack - prior. ``residual_ssim`` / ``residual_nmi``: the
        similarity of the reconstruction's and the truth's residuals from the atlas (``residual_from``):
        near 0 SSIM (NMI 1, its floor) when the reconstruction
        holds nothing the atlas does not (the atlas itself, or anything unrelated to the patient), 1 (2)
        for the truth itself. With ``region``: ``tumour_<m>``,
        ``prior_tumour_<m>`` and ``excess_tumour_<m>`` for SSIM and NMI within it.
    """
    recon, true = _numpy(reconstruction).astype(np.float64), _numpy(truth).astype(np.float64)
    if sign_invariant:
        recon = orient_sign(recon, true)
    prior = _per_patient(atlas, true.shape)
    scores = image_similarity(recon, true)
    for name, value in image_similarity(prior, true).items():
        scores[f"prior_{name}"] = value
        scores[f"excess_{name}"] = scores[name] - value
    residual = image_similarity(np.stack([residual_from(r, p) for r, p in zip(recon[:, 0], prior[:, 0])])[:, None],
                                np.stack([residual_from(t, p) for t, p in zip(true[:, 0], prior[:, 0])])[:, None])
    scores.update(residual_ssim=residual["ssim"], residual_nmi=residual["nmi"])
    if region is not None:
        masks = _numpy(region).astype(bool).reshape(true[:, 0].shape)
        kept = masks.reshape(len(masks), -1).any(axis=1)
        if kept.any():
            attack = image_similarity(recon[kept], true[kept], masks[kept])
            baseline = image_similarity(prior[kept], true[kept], masks[kept])
            for name in ("ssim", "nmi"):
                scores[f"tumour_{name}"] = attack[name]
                scores[f"prior_tumour_{name}"] = baseline[name]
                scores[f"excess_tumour_{name}"] = attack[name] - baseline[name]
    return scores


def _per_patient(prior: torch.Tensor | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A prior of (1, *S), (1, 1, *S) or (B, 1, *S) as float64 (B, 1, *S) for a batch of ``shape``."""
    prior = _numpy(prior).astype(np.float64)
    return np.broadcast_to(prior.reshape(-1, 1, *shape[2:]), shape)


def subregions(regions: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, *S) uint8 label maps (MSD values: 1 oedema, 2 non-enhancing core, 3 enhancing) of (B, 3, *S) WT/TC/ET
    region masks, as the server holds them."""
    from split_unet.data import label_from_regions  # the data package is heavy: only the study needs it

    return np.stack([label_from_regions(np.asarray(r) != 0, "msd") for r in _numpy(regions)])


def subregion_means(images: torch.Tensor | np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """``{label: mean intensity}`` of each sub-region (label > 0) of (N, 1, *S) images with (N, *S) label maps: the
    mean over the patients that have it of each patient's mean in it (every patient weighs alike)."""
    images = _numpy(images)[:, 0].astype(np.float64)
    means: dict[int, list[float]] = {}
    for image, label in zip(images, labels):
        for value in np.unique(label[label > 0]):
            means.setdefault(int(value), []).append(float(image[label == value].mean()))
    return {value: float(np.mean(values)) for value, values in sorted(means.items())}


def label_aware_prior(atlas: torch.Tensor | np.ndarray, labels: np.ndarray, means: dict[int, float]) -> np.ndarray:
    """(B, 1, *S): the atlas with each patient's sub-regions (``labels``, (B, *S)) painted at ``means``
    (``subregion_means`` of the auxiliary patients): what a server that holds the labels and public images guesses
    with no activation at all. A sub-region no auxiliary patient has keeps the atlas."""
    labels = np.asarray(labels)
    prior = np.repeat(_per_patient(atlas, (1, 1, *labels.shape[1:])), len(labels), axis=0).copy()
    for value, mean in means.items():
        prior[:, 0][labels == value] = mean
    return prior


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two voxel sets; 0 where either is constant (it then carries no signal)."""
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def mean_interval(values: list[float] | np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """[low, high]: Student's t interval of the mean of ``values`` (at least 2)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"an interval needs at least 2 values, got {len(values)}")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return [float(values.mean() - half), float(values.mean() + half)]


def residual_correlation(reconstruction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray,
                         prior: torch.Tensor | np.ndarray, region: torch.Tensor | np.ndarray | None = None
                         ) -> dict[str, float | list[float]]:
    """Patient-specific signal beyond ``prior``, however weak: corr(recon - prior, truth - prior), with its null.

    Each residual is ``residual_from`` (the least-squares fit of the prior and a constant removed, so that a
    reconstruction's arbitrary scale does not matter). Patient i scores ``r_i`` = the Pearson correlation of its
    reconstruction's residual with its truth's over the volume (and over ``region``); its null ``n_i`` is the same
    score for the other patients' reconstructions of the batch against patient i's truth (each residual from its
    own patient's prior), averaged: what a reconstruction holding nothing of patient i but everything else (the
    anatomy, the attack's artefacts) scores. SSIM's excess misses such weak signal: a correlation of 0.3 moves
    SSIM little.

    Args:
        reconstruction, truth: (B, 1, *S), B >= 2 (the intervals need more than 2 to mean much).
        prior: (1, *S), (1, 1, *S) or (B, 1, *S): the atlas or ``label_aware_prior``.
        region: optional (B, *S) bool, the tumour and its surroundings; patients with an empty region are left out
            of the region's scores (which then need 2 patients with one).

    Returns:
        ``residual_corr`` (mean of r_i) and ``residual_corr_ci`` (its 95 % interval over patients),
        ``null_residual_corr`` and ``null_residual_corr_ci`` likewise for n_i, ``residual_corr_margin`` =
        ``residual_corr`` minus the null interval's upper end (at most 0: within the null's interval or below it),
        ``residual_corr_patients``; with ``region``, the same names with ``tumour_`` in front.
    """
    recon, true = _numpy(reconstruction).astype(np.float64), _numpy(truth).astype(np.float64)
    if recon.shape != true.shape or len(true) < 2:
        raise ValueError(f"need reconstruction and truth of one shape with at least 2 patients (a null from another "
                         f"patient of the batch), got {recon.shape} and {true.shape}")
    priors = _per_patient(prior, true.shape)
    recon_residual = np.stack([residual_from(r, p) for r, p in zip(recon[:, 0], priors[:, 0])])
    true_residual = np.stack([residual_from(t, p) for t, p in zip(true[:, 0], priors[:, 0])])
    scopes = {"": np.ones(true_residual.shape, dtype=bool)}
    if region is not None:
        scopes["tumour_"] = _numpy(region).astype(bool).reshape(true_residual.shape)
    scores: dict[str, float | list[float]] = {}
    for prefix, masks in scopes.items():
        kept = [i for i in range(len(true)) if masks[i].any()]
        if len(kept) < 2:
            continue
        own = [_pearson(recon_residual[i][masks[i]], true_residual[i][masks[i]]) for i in kept]
        null = [float(np.mean([_pearson(recon_residual[j][masks[i]], true_residual[i][masks[i]])
                               for j in range(len(true)) if j != i])) for i in kept]
        null_interval = mean_interval(null)
        scores.update({f"{prefix}residual_corr": float(np.mean(own)), f"{prefix}residual_corr_ci": mean_interval(own),
                       f"{prefix}null_residual_corr": float(np.mean(null)),
                       f"{prefix}null_residual_corr_ci": null_interval,
                       f"{prefix}residual_corr_margin": float(np.mean(own)) - null_interval[1],
                       f"{prefix}residual_corr_patients": len(kept)})
    return scores


def other_patient_similarity(truth: torch.Tensor | np.ndarray, others: torch.Tensor | np.ndarray,
                             region: torch.Tensor | np.ndarray | None = None) -> dict[str, float]:
    """The most that another patient's true image scores as a "reconstruction" of the attacked patients.

    Each of ``others`` is scored by ``prior_relative_similarity`` against the atlas of the remaining ones (an
    image inside the atlas would share its own part of it). No activation enters, so this is what an attacker
    reaches who knows nothing of the patients but outputs a real image of the modality, and, taking the best of
    ``others`` for these patients, an upper bound of it. On the phantom its residual SSIM is far from the atlas's
    0 (0.26-0.43): outside the head both residuals are flat, and SSIM scores flat windows of equal level near 1.

    Args:
        truth: (B, 1, *S) the attacked patients' images.
        others: (A, 1, *S) images of other patients of the same modality, A >= 2.
        region: as in ``prior_relative_similarity``.

    Returns:
        ``other_<score>`` for ``excess_ssim``, ``residual_ssim`` and, with ``region``, ``excess_tumour_ssim``:
        the maximum over ``others`` of that score (averaged over the B patients), and ``other_patients`` = A.
    """
    others = _numpy(others).astype(np.float64)
    if len(others) < 2:
        raise ValueError(f"need at least 2 other patients (one scored, the rest its atlas), got {len(others)}")
    true = _numpy(truth)
    names = ("excess_ssim", "residual_ssim") + (("excess_tumour_ssim",) if region is not None else ())
    best = {name: float("-inf") for name in names}
    for index in range(len(others)):
        atlas = np.delete(others, index, axis=0).mean(axis=0)
        guess = np.broadcast_to(others[index][None], true.shape)
        scores = prior_relative_similarity(guess, true, atlas, region)
        for name in names:
            if name in scores:
                best[name] = max(best[name], scores[name])
    return {**{f"other_{name}": value for name, value in best.items() if np.isfinite(value)},
            "other_patients": len(others)}


def _ssim(reconstruction: np.ndarray, truth: np.ndarray, mask: np.ndarray | None) -> float:
    """scikit-image's mean SSIM (volumes already in [0, 1]), or the SSIM map's mean within ``mask``."""
    mean, ssim_map = structural_similarity(truth, reconstruction, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, full=True)
    return float(mean if mask is None else ssim_map[mask].mean())


def mask_dice(pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> float:
    """Dice of binary masks (B, *S), per sample then averaged; empty against empty counts as 1."""
    pred, truth = _numpy(pred).astype(bool), _numpy(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {truth.shape}")
    axes = tuple(range(1, pred.ndim))
    overlap = (pred & truth).sum(axis=axes)
    total = pred.sum(axis=axes) + truth.sum(axis=axes)
    return float(np.mean(np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)))
