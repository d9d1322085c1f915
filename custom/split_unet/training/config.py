"""Training settings shared by centralized training and the split-learning controller."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from split_unet.data.readers import grid_shape
from split_unet.networks import NetworkConfig


PATCH_SAMPLING = ("uniform", "label")
LR_SCHEDULES = ("constant", "poly")


def _shape_setting(name: str, value: object) -> int | tuple[int, int, int]:
    """A cube side (int) or three sides (a JSON list, kept as a tuple), each a positive integer."""
    try:
        grid_shape(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer or three of them, got {value!r}") from None
    return value if isinstance(value, int) else tuple(value)


@dataclass
class TrainConfig:
    """One training budget. ``split-unet centralized`` and the NVFlare job read the same fields."""

    epochs: int = 8
    # Steps an epoch has (None: one pass over the training patients). Patch training counts in steps, as nnU-Net
    # does (250 an epoch): one pass of a few patients is a few patches, too few to validate after each.
    steps_per_epoch: int | None = None
    batch_size: int = 2
    lr: float = 5e-3
    # "constant", or "poly": lr * (1 - (step - 1) / steps) ** 0.9 over the run's epochs * steps_per_epoch steps
    # (nnU-Net's decay); every party computes it from the step number alone.
    lr_schedule: str = "constant"
    val_fraction: float = 0.25
    val_interval: int = 2
    val_batch_size: int = 2  # as large as the training batch: validation must not raise the server's peak memory
    seed: int = 0
    # The common voxel grid every party brings its volumes onto: a cube side, or three sides (e.g. BraTS's
    # 240 x 240 x 155 at 1 mm). Whole-volume training trains on it; patch training cuts patches from it.
    size: int | tuple[int, int, int] = 64
    spacing: float | None = None
    # Patch training (None: whole volumes). Each step the server draws one patch per patient and sends its corner;
    # every site cuts the same patch. "uniform" sampling is content-independent; "label" centres a share
    # (``patch_positive_fraction``) of the patches on tumour voxels and so tells the sites roughly where it is.
    patch_size: int | tuple[int, int, int] | None = None
    patch_sampling: str = "uniform"
    patch_positive_fraction: float = 0.5
    # Augmentation drawn from seeds the server sends: spatial (flips, 90-degree rotations, small affine) the same at
    # every site and on the label; intensity (scale, shift, noise, gamma) at each site on its own.
    augment: bool = False
    # Sliding-window validation and inference (patch training): windows per round trip and their overlap.
    sw_batch_size: int = 2
    sw_overlap: float = 0.5
    # Preprocessed volumes a party keeps in memory, least recently used out first (0: all of them). Bounded by
    # default so that a party's memory stops growing with the patients it holds (all 64 of the quick start fit).
    cache_cases: int = 64
    # Lossless compression of the activations a site sends (``protocol.codecs.COMPRESSIONS``; None: raw bytes). Off:
    # on loopback it saved no CPU (docs/performance.md); "zstd" sends 2.7x fewer bytes over a slow link.
    activation_compression: str | None = None
    # Mixed precision (autocast) where the device is CUDA.
    amp: bool = True
    device: str | None = None
    nopeek_weight: float = 0.0  # sites' NoPeek distance-correlation penalty (0 = off)
    # The sent levels NoPeek decorrelates from the image (None: every sent level).
    nopeek_levels: tuple[int, ...] | None = None
    # Sites' adversarial training against their own inversion decoder (``training.adversarial``; 0 = off): the
    # weight of the encoder's term pulling that decoder's reconstruction to the site's mean image.
    adversarial_weight: float = 0.0
    # Local steps on the sites' privacy terms (NoPeek, adversarial) before the first activations leave a site.
    privacy_warmup_steps: int = 0
    modality_dropout: float = 0.0  # probability that one site, drawn per step, is left out of a training step
    # The server's decoder runs each training batch in this many parts and accumulates their gradients before
    # its one optimiser step: less server memory, the same step (the loss is a mean over patients).
    micro_batches: int = 1
    # The decoder recomputes its activations in the backward pass instead of keeping them (server memory).
    decoder_checkpointing: bool = False
    # Post-processing of every segmentation: connected components smaller than this (grid voxels) are removed.
    min_component_voxels: int = 0
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self):
        if isinstance(self.network, dict):
            self.network = NetworkConfig.from_dict(self.network)
        self.size = _shape_setting("size", self.size)
        if self.patch_size is not None:
            self.patch_size = _shape_setting("patch_size", self.patch_size)
        if self.patch_sampling not in PATCH_SAMPLING:
            raise ValueError(f"patch_sampling must be one of {PATCH_SAMPLING}, got {self.patch_sampling!r}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1 or None, got {self.steps_per_epoch}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr_schedule == "poly" and self.steps_per_epoch is None:
            # A site knows the run's length only from its settings; it does not know how many patients train.
            raise ValueError("lr_schedule 'poly' needs steps_per_epoch (the run's length in steps)")
        if not 0.0 <= self.patch_positive_fraction <= 1.0:
            raise ValueError(f"patch_positive_fraction must be in [0, 1], got {self.patch_positive_fraction}")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"sw_overlap must be in [0, 1), got {self.sw_overlap}")
        if self.sw_batch_size < 1 or self.cache_cases < 0:
            raise ValueError("sw_batch_size must be at least 1 and cache_cases at least 0")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if self.nopeek_weight < 0 or self.adversarial_weight < 0 or self.privacy_warmup_steps < 0:
            raise ValueError("nopeek_weight, adversarial_weight and privacy_warmup_steps must not be negative")
        if self.nopeek_levels is not None:
            self.nopeek_levels = tuple(sorted(set(int(level) for level in self.nopeek_levels)))
            if not self.nopeek_levels or not set(self.nopeek_levels) <= set(self.network.sent_levels):
                raise ValueError(f"nopeek_levels must be some of the sent levels {list(self.network.sent_levels)}, "
                                 f"got {list(self.nopeek_levels)}")
        if self.privacy_warmup_steps and not (self.nopeek_weight or self.adversarial_weight):
            raise ValueError("privacy_warmup_steps needs a privacy term to warm up: nopeek_weight or adversarial_weight")
        if self.adversarial_weight and self.patch_size is not None:
            # The adversary's target is the site's mean whole volume.
            raise ValueError("adversarial_weight needs whole-volume training (patch_size None)")
        if not 1 <= self.micro_batches <= self.batch_size:
            raise ValueError(f"micro_batches must be in [1, batch_size={self.batch_size}], got {self.micro_batches}")

    @property
    def total_steps(self) -> int | None:
        """The run's training steps when an epoch is counted in steps (``steps_per_epoch``), else None."""
        return None if self.steps_per_epoch is None else self.epochs * self.steps_per_epoch

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """The common grid's three sides (voxels)."""
        return grid_shape(self.size)

    @property
    def patch_shape(self) -> tuple[int, int, int] | None:
        """The training patch's three sides, or None for whole-volume training."""
        return None if self.patch_size is None else grid_shape(self.patch_size)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The spatial shape a network input has in training: the patch, or the whole grid."""
        return self.patch_shape or self.grid_shape

    def to_dict(self) -> dict:
        values = asdict(self)
        for key in ("size", "patch_size", "nopeek_levels"):
            if isinstance(values[key], tuple):
                values[key] = list(values[key])
        values["network"] = self.network.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)
