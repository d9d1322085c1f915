"""NoPeek (Vepakomma et al. 2020): penalise the distance correlation between a site's input and what it sends.

The original measures distance correlation across the samples of a batch; with the batches of two or
four volumes used here that statistic is degenerate (two samples always correlate perfectly). For a
segmentation encoder the leak is spatial (activations reproduce the local image), so the samples here
are voxel positions: at each sent level, the input average-pooled to that level's resolution against
the activation's channel vector, at ``positions`` seeded random voxels of each volume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distance_correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Sample distance correlation (Szekely et al. 2007) of x (N, P) and y (N, Q); 0 = independent, 1 = dependent.

    Defined as 0 when either sample is constant (zero distance variance), as Szekely et al. define it, with a
    finite gradient: a patch of pure background (a constant image, or features a ReLU zeroed) is the common case
    in skull-stripped volumes, and the plain formula's square roots at 0 give it an infinite gradient, NaN once
    multiplied by the zero derivative of its argument.
    """
    def centred(z: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(z, z)
        return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()

    a, b = centred(x), centred(y)
    dcov2 = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()  # dVar(x)^2 dVar(y)^2
    # Clamped before each square root: where the clamp binds, its derivative is 0 and the root's stays finite.
    dcor2 = dcov2.clamp_min(0) / dvar2.clamp_min(eps**4).sqrt()
    return torch.where(dvar2 > eps**4, dcor2.clamp_min(eps**2).sqrt(), torch.zeros_like(dcor2))


def spatial_nopeek_loss(images: torch.Tensor, features: dict[int, torch.Tensor], positions: int = 256,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean distance correlation between images (B, C_in, *S) and each level's features (B, C_l, *S_l)."""
    spatial_dims = images.dim() - 2
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial_dims - 1]
    terms = []
    for feature in features.values():
        factor = images.shape[2] // feature.shape[2]
        pooled = pool(images, factor) if factor > 1 else images
        for sample in range(images.shape[0]):
            x = pooled[sample].flatten(1).T  # (voxels, C_in)
            z = feature[sample].flatten(1).T  # (voxels, C_l)
            count = min(positions, x.shape[0])
            index = torch.randperm(x.shape[0], generator=generator)[:count].to(x.device)
            terms.append(distance_correlation(x[index], z[index]))
    return torch.stack(terms).mean()
