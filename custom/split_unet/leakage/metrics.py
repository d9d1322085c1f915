"""How much a reconstruction or an estimated mask reveals: image similarity and Dice, as plain floats.

SSIM and PSNR follow the settings that match MONAI's ``SSIMMetric`` / ``PSNRMetric`` (scikit-image is
much faster on the CPU): ``structural_similarity(..., data_range=1, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``; scikit-image's default settings give different values.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import normalized_mutual_information, peak_signal_noise_ratio, structural_similarity

__all__ = ["image_similarity", "mask_dice", "robust_unit_range"]

NMI_BINS = 64


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
    scores = {"ssim": [], "psnr": [], "nmi": []}
    for r, t, m in zip(recon, true, masks):
        t = robust_unit_range(t, m)
        candidates = [robust_unit_range(c, m) for c in ((r, -r) if sign_invariant else (r,))]
        ssim, r = max(((_ssim(c, t, m), c) for c in candidates), key=lambda pair: pair[0])
        region = slice(None) if m is None else m
        scores["ssim"].append(ssim)
        scores["psnr"].append(peak_signal_noise_ratio(t[region], r[region], data_range=1.0))
        scores["nmi"].append(normalized_mutual_information(t[region], r[region], bins=NMI_BINS))
    return {name: float(np.mean(values)) for name, values in scores.items()}


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
