"""Split-U-Net: split learning for multi-modal brain tumour segmentation on NVIDIA FLARE.

Modules, one job each:

- ``split_unet.data``: phantoms, NIfTI readers (MSD Task01, BraTS), vertical partition, region masks.
- ``split_unet.networks``: ``ModalityEncoder``, ``FusionDecoder``, ``SplitUNet`` (plain PyTorch/MONAI).
- ``split_unet.training``: losses, optimisers, metrics and the centralized trainer (no NVFlare).
- ``split_unet.protocol``: the NVFlare glue: wire format, server Controller, site Executor.
"""

__version__ = "0.1.0"
