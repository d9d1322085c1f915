"""Leakage evaluation: what the exchanged activations and gradients give away (plain PyTorch)."""

from .attacks import (
    gradient_label_leakage,
    gradient_magnitude,
    learned_inversion,
    random_mask_like,
    total_variation,
    train_inversion_decoder,
    unsplit_inversion,
    whitebox_inversion,
)
from .evaluate import ATTACKS, DEFAULT_ITERATIONS, LEAKAGE_FILE, evaluate_leakage
from .figures import mask_grid, reconstruction_grid
from .metrics import image_similarity, mask_dice, robust_unit_range
from .record import RECORD_FOLDER, SNAPSHOT_FOLDER, RecordedExchange, load_record, snapshot_path, step_folder

__all__ = [
    "ATTACKS", "DEFAULT_ITERATIONS", "LEAKAGE_FILE", "RECORD_FOLDER", "SNAPSHOT_FOLDER", "RecordedExchange",
    "evaluate_leakage", "gradient_label_leakage", "gradient_magnitude", "image_similarity", "learned_inversion",
    "load_record", "mask_dice", "mask_grid", "random_mask_like", "reconstruction_grid", "robust_unit_range",
    "snapshot_path", "step_folder", "total_variation", "train_inversion_decoder", "unsplit_inversion",
    "whitebox_inversion",
]
