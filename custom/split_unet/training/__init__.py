"""Training without NVFlare: loss, metrics, the split-learning parties and centralized training."""

from .config import TrainConfig
from .metrics import RegionMetrics, dice_without_each_input, logits_to_masks
from .objective import chunks, epoch_batches, gpu_peak_mb, segmentation_loss, select_device
from .parties import DecoderParty, EncoderParty, dropped_input, make_optimizer, present_inputs

__all__ = [
    "DecoderParty", "EncoderParty", "RegionMetrics", "TrainConfig", "chunks", "dice_without_each_input",
    "dropped_input", "epoch_batches", "logits_to_masks", "make_optimizer", "present_inputs", "segmentation_loss",
    "select_device",
    "gpu_peak_mb",
]
