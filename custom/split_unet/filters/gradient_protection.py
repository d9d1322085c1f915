"""Protection of the gradients the server returns, against label leakage at the sites.

A site that receives d loss / d activations sees, voxel by voxel, where the loss is large: at the tumour
(``split_unet.leakage.attacks.gradient_label_leakage``). Two defences on the way out of the server:

- ``maxnorm`` (after Li et al. 2022, "Label Leakage and Protection in Two-party Split Learning"): every
  sample's gradient gets isotropic Gaussian noise that brings its expected squared norm up to the batch's
  largest, so norms no longer single out samples;
- ``noise``: Gaussian noise with standard deviation ``noise_multiplier`` times the root mean square of
  each sample's gradient at each level, which also drowns the per-voxel pattern.
"""

from __future__ import annotations

import torch
from nvflare.apis.fl_context import FLContext

from split_unet.protocol.wire import KIND_REQUEST, TensorMessage

from .base import TensorMessageFilter

MODES = ("maxnorm", "noise")


def maxnorm_noise(gradient: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, ...) -> (B, ...) with each sample's expected squared norm raised to the batch maximum."""
    squared = gradient.flatten(1).pow(2).sum(dim=1)
    deficit = (squared.max() - squared).clamp_min(0)
    std = (deficit / gradient[0].numel()).sqrt().view(-1, *([1] * (gradient.dim() - 1)))
    return gradient + torch.randn(gradient.shape, generator=generator) * std


def relative_noise(gradient: torch.Tensor, noise_multiplier: float, generator: torch.Generator) -> torch.Tensor:
    """(B, ...) -> (B, ...) plus noise of ``noise_multiplier`` x each sample's RMS."""
    rms = gradient.flatten(1).pow(2).mean(dim=1).sqrt().view(-1, *([1] * (gradient.dim() - 1)))
    return gradient + torch.randn(gradient.shape, generator=generator) * rms * noise_multiplier


class GradientProtection(TensorMessageFilter):
    """Server-side ``task_data_filter`` on the tasks that carry gradients (train, validate, finish).

    Args:
        mode: ``"maxnorm"`` or ``"noise"``.
        noise_multiplier: for ``"noise"``, the noise scale relative to each sample's gradient RMS.
        seed: noise seed (default: nondeterministic).
    """

    kinds = (KIND_REQUEST,)

    def __init__(self, mode: str = "noise", noise_multiplier: float = 1.0, seed: int | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.noise_multiplier = noise_multiplier
        self.seed = seed
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def transform(self, message: TensorMessage, fl_ctx: FLContext) -> TensorMessage | None:
        if not message.tensors:
            return None
        protect = (lambda g: maxnorm_noise(g, self.generator)) if self.mode == "maxnorm" else \
            (lambda g: relative_noise(g, self.noise_multiplier, self.generator))
        message.tensors = {level: protect(gradient) for level, gradient in message.tensors.items()}
        return message
