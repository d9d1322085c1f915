"""Loss, device and batch schedule shared by centralized and split training."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from monai.losses import DiceCELoss


def segmentation_loss() -> torch.nn.Module:
    """Dice + binary cross-entropy on the three overlapping region channels (WT, TC, ET).

    The regions are nested, not exclusive, so each channel is its own sigmoid (as in MONAI's BraTS
    tutorial) rather than one softmax over labels.
    """
    return DiceCELoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)


def select_device(preferred: str | None = None) -> torch.device:
    """``preferred`` if given (e.g. "cpu"), else CUDA when present, else CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gpu_peak_mb(device: torch.device) -> float | None:
    """Peak GPU memory (MiB) torch allocated on ``device`` so far; None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
def amp_active(device: torch.device, enabled: bool) -> bool:
    """Mixed precision runs on CUDA only: on the CPU float16 is slow and would change the numbers."""
    return enabled and device.type == "cuda"


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    """float16 autocast on ``device`` where ``amp_active``; otherwise nothing changes (CPU numbers bit for bit)."""
    return torch.autocast("cuda", dtype=torch.float16) if amp_active(device, enabled) else nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaling float16 gradients need against underflow; a pass-through where ``amp_active`` is false."""
    return torch.amp.GradScaler("cuda", enabled=amp_active(device, enabled))


def epoch_batches(patient_ids: Sequence[str], batch_size: int, seed: int, epoch: int) -> list[list[str]]:
    """The training batches of one epoch: a seeded shuffle, the last batch possibly smaller.

    Centralized and split training call this with the same arguments, so they see the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(len(patient_ids))
    ids = [patient_ids[i] for i in order]
    return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]


def chunks(patient_ids: Sequence[str], size: int) -> list[list[str]]:
    """Fixed-order batches, for validation."""
    return [list(patient_ids[i:i + size]) for i in range(0, len(patient_ids), size)]
