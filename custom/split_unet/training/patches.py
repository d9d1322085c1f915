"""Training patches that the server chooses and every site cuts: corners, cutting and the sites' check.

Each training step the server draws one patch corner per patient and sends it with the patient ids; every
site cuts the same patch from its own modality, so the encoders' activations and the label stay aligned.
Every draw comes from (seed, train_step, patient position) alone: a resumed run draws the same and no
generator state is saved. Plain numpy: the NVFlare glue only moves the corners.

MONAI's ``RandSpatialCrop`` / ``RandCropByPosNegLabel`` crop a volume they hold; here the party that draws (the
server) holds no image and the parties that crop hold no label, so the corner is drawn and sent on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from split_unet.errors import ProtocolError
from split_unet.ids import is_integer

Corner = tuple[int, int, int]

#: Separates the seed streams derived from the same (seed, step, patient): spatial augmentation vs the sites'
#: intensity augmentation (see ``derive_seed``).
SPATIAL_STREAM = 1
INTENSITY_STREAM = 2


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed (what MONAI's ``set_random_state`` takes) from integers, by numpy's ``SeedSequence``."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def step_seeds(seed: int, train_step: int, count: int) -> list[int]:
    """The spatial-augmentation seed of each of the ``count`` patients of step ``train_step``."""
    return [derive_seed(seed, train_step, k, SPATIAL_STREAM) for k in range(count)]


def _uniform_corner(rng: np.random.Generator, grid_shape: Sequence[int], patch_shape: Sequence[int]) -> Corner:
    return tuple(int(rng.integers(0, max(0, g - p) + 1)) for g, p in zip(grid_shape, patch_shape))


def sample_patch_starts(grid_shape: tuple[int, int, int], patch_shape: tuple[int, int, int], seed: int,
                        train_step: int, count: int, labels: Sequence[np.ndarray] | None = None,
                        positive_fraction: float = 0.5) -> list[Corner]:
    """One patch corner (grid voxels) per patient ``k`` of a training step, drawn from
    ``np.random.default_rng([seed, train_step, k])`` only.

    Without ``labels`` (uniform sampling) each corner is uniform in ``[0, max(0, G - P)]`` per axis: it does not
    depend on any image or label, so the corners tell the sites nothing. With ``labels`` (label sampling, at the
    label holder): ``labels[k]`` is patient k's whole-tumour mask on the grid; with probability
    ``positive_fraction`` the patch is centred on a tumour voxel drawn uniformly (moved inside the grid), else
    it is uniform; a patient without tumour gets a uniform patch.
    """
    if labels is not None and len(labels) != count:
        raise ValueError(f"{len(labels)} label masks for {count} patients")
    corners = []
    for k in range(count):
        rng = np.random.default_rng([seed, train_step, k])
        if labels is None:
            corners.append(_uniform_corner(rng, grid_shape, patch_shape))
            continue
        mask = np.asarray(labels[k])
        if mask.shape != tuple(grid_shape):
            raise ValueError(f"label mask {k} has shape {mask.shape}, the grid is {tuple(grid_shape)}")
        tumour = np.flatnonzero(mask)
        if rng.random() < positive_fraction and tumour.size:
            centre = np.unravel_index(tumour[rng.integers(tumour.size)], mask.shape)
            corners.append(tuple(int(np.clip(c - p // 2, 0, max(0, g - p)))
                                 for c, p, g in zip(centre, patch_shape, grid_shape)))
        else:
            corners.append(_uniform_corner(rng, grid_shape, patch_shape))
    return corners


def cut_patch(volume: np.ndarray, start: Sequence[int], patch_shape: Sequence[int]) -> np.ndarray:
    """``volume[:, start : start + patch_shape]`` of a (C, X, Y, Z) volume, any start allowed: the part of the
    patch outside the volume is zeros (as MONAI's sliding window pads with constant 0). Keeps the dtype."""
    patch = np.zeros((volume.shape[0], *patch_shape), dtype=volume.dtype)
    source, target = [slice(None)], [slice(None)]
    for s, p, g in zip(start, patch_shape, volume.shape[1:]):
        low, high = max(s, 0), min(s + p, g)
        if high <= low:
            return patch
        source.append(slice(low, high))
        target.append(slice(low - s, high - s))
    patch[tuple(target)] = volume[tuple(source)]
    return patch


def check_patch_starts(starts: object, grid_shape: Sequence[int], patch_shape: Sequence[int], *,
                       site: str | None, field: str, count: int | None = None) -> list[Corner]:
    """The patch corners a site accepts from the server: a list (of ``count`` entries, when given) of three
    integers each, every patch overlapping the grid (``-P < start < G`` per axis). A ProtocolError otherwise."""
    if not isinstance(starts, (list, tuple)):
        raise ProtocolError(f"patch corners must be a list, got {type(starts).__name__}", site=site, field=field)
    if count is not None and len(starts) != count:
        raise ProtocolError(f"{len(starts)} patch corners for {count} patients", site=site, field=field)
    corners = []
    for i, start in enumerate(starts):
        if (not isinstance(start, (list, tuple)) or len(start) != 3
                or not all(is_integer(s, numpy=True) for s in start)):
            raise ProtocolError(f"a patch corner must be three integers, got {start!r:.80}", site=site,
                                field=f"{field}[{i}]")
        if not all(-p < s < g for s, p, g in zip(start, patch_shape, grid_shape)):
            raise ProtocolError(f"patch corner {tuple(int(s) for s in start)} of a {tuple(patch_shape)} patch lies "
                                f"outside the {tuple(grid_shape)} grid", site=site, field=f"{field}[{i}]")
        corners.append(tuple(int(s) for s in start))
    return corners
