"""Seeded augmentation of training patches (MONAI transforms).

Spatial augmentation must be the same at every site and on the label, so it is drawn from a seed the server
sends with each step (``patches.step_seeds``): every MONAI transform here draws its parameters from its seed
alone, never from the data, so a one-channel image at a site, a stack of channels and the label get the same
geometry. Intensity augmentation is each site's own, from ``intensity_seed``; centralized training derives
the same seeds, so both augment identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import torch
from monai.transforms import (Compose, OneOf, RandAdjustContrast, RandAffine, RandFlip, RandGaussianNoise,
                              RandRotate90, RandScaleIntensity, RandShiftIntensity)
from monai.utils import convert_to_numpy

from .patches import INTENSITY_STREAM, derive_seed

SPATIAL_MODES = ("bilinear", "nearest")
MAX_ROTATION_RAD = np.deg2rad(10.0)  # small affine: rotation about each axis up to 10 degrees
MAX_SCALE = 0.1  # and scaling by up to +-10 % per axis
AFFINE_PROBABILITY = 0.2


def _spatial_transform(shape: Sequence[int], mode: str) -> Compose:
    # 90-degree rotations only in planes of equal sides, so the patch keeps its shape.
    planes = [plane for plane in combinations(range(len(shape)), 2) if shape[plane[0]] == shape[plane[1]]]
    transforms = [RandFlip(prob=0.5, spatial_axis=axis) for axis in range(len(shape))]
    if planes:
        transforms.append(OneOf([RandRotate90(prob=0.5, max_k=3, spatial_axes=plane) for plane in planes]))
    transforms.append(RandAffine(prob=AFFINE_PROBABILITY, rotate_range=(MAX_ROTATION_RAD,) * len(shape),
                                 scale_range=(MAX_SCALE,) * len(shape), mode=mode, padding_mode="zeros"))
    return Compose(transforms)


def spatial_augment(volume: np.ndarray | torch.Tensor, seed: int, mode: str) -> np.ndarray:
    """(C, *S) -> (C, *S) of the same dtype: flips (each axis, p = 0.5), a 90-degree rotation in one plane of equal
    sides (p = 0.5) and a small affine (p = 0.2), all drawn from ``seed``. ``mode``: "bilinear" for images,
    "nearest" for labels and region masks."""
    if mode not in SPATIAL_MODES:
        raise ValueError(f"mode must be one of {SPATIAL_MODES}, got {mode!r}")
    volume = convert_to_numpy(volume)
    transform = _spatial_transform(volume.shape[1:], mode).set_random_state(seed=seed)
    return convert_to_numpy(transform(volume), dtype=volume.dtype)


def intensity_augment(volume: np.ndarray | torch.Tensor, seed: int) -> np.ndarray:
    """A site's own intensity augmentation of its (1, *S) z-scored volume, float32: scale and shift by up to 10 %,
    Gaussian noise and a gamma in [0.7, 1.5], each with its own probability, drawn from ``seed``."""
    transform = Compose([RandScaleIntensity(factors=0.1, prob=0.5), RandShiftIntensity(offsets=0.1, prob=0.5),
                         RandGaussianNoise(prob=0.15, std=0.1), RandAdjustContrast(prob=0.3, gamma=(0.7, 1.5))])
    return convert_to_numpy(transform.set_random_state(seed=seed)(volume), dtype=np.float32)


def site_seed(seed: int, site_index: int) -> int:
    """The seed of site ``site_index``'s intensity augmentation in a run of seed ``seed``."""
    return derive_seed(seed, site_index, INTENSITY_STREAM)


def intensity_seed(seed: int, site_index: int, train_step: int, k: int) -> int:
    """Site ``site_index``'s intensity seed for patient position ``k`` of step ``train_step``."""
    return derive_seed(site_seed(seed, site_index), train_step, k)


def augment_image(patch: np.ndarray, spatial_seed: int, intensity_seeds: Sequence[int]) -> np.ndarray:
    """A (C, *P) image patch augmented as the sites do: the spatial augmentation of ``spatial_seed``, then channel
    c's intensity augmentation from ``intensity_seeds[c]``. A site calls it with its one channel; centralized
    training with the stack of the sites' channels, getting the same result channel by channel."""
    if len(intensity_seeds) != len(patch):
        raise ValueError(f"{len(intensity_seeds)} intensity seeds for {len(patch)} channels")
    moved = spatial_augment(patch, spatial_seed, "bilinear")
    return np.concatenate([intensity_augment(moved[c:c + 1], s) for c, s in enumerate(intensity_seeds)])
