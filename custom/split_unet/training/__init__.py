"""Training without NVFlare: loss, metrics, the split-learning parties, patches, augmentation, sliding-window
inference and centralized training."""

from .adversarial import InversionAdversary, mean_image, warmup_batches
from .augment import augment_image, intensity_augment, intensity_seed, site_seed, spatial_augment
from .config import TrainConfig, merge_train_settings
from .metrics import RegionMetrics, dice_without_each_input, logits_to_masks
from .objective import amp_active, autocast, chunks, epoch_batches, gpu_peak_mb, grad_scaler, segmentation_loss, select_device
from .parties import DecoderParty, EncoderParty, dropped_input, make_optimizer, present_inputs
from .patches import check_patch_starts, cut_patch, sample_patch_starts, step_seeds
from .sliding_window import sliding_window_logits

__all__ = [
    "DecoderParty", "EncoderParty", "InversionAdversary", "mean_image", "warmup_batches", "RegionMetrics", "TrainConfig", "amp_active", "augment_image", "autocast",
    "check_patch_starts", "chunks", "cut_patch", "dice_without_each_input", "dropped_input", "epoch_batches", "gpu_peak_mb",
    "grad_scaler", "intensity_augment", "intensity_seed", "logits_to_masks", "make_optimizer", "merge_train_settings",
    "present_inputs", "sample_patch_starts", "segmentation_loss", "select_device", "site_seed", "sliding_window_logits",
    "spatial_augment", "step_seeds",
]
