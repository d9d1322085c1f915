"""Networks of the Split-U-Net (plain PyTorch/MONAI, no NVFlare)."""

from .config import NetworkConfig, build_decoder, build_encoder, build_inversion_decoder, build_split_unet
from .split_unet import FUSIONS, FusionDecoder, ModalityEncoder, SplitUNet

__all__ = [
    "FUSIONS", "FusionDecoder", "ModalityEncoder", "NetworkConfig", "SplitUNet",
    "build_decoder", "build_encoder", "build_inversion_decoder", "build_split_unet",
]
