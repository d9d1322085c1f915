"""Training settings shared by centralized training and the split-learning controller."""

from __future__ import annotations

from collections.abc import Mapping
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


def region_sizes(value: object) -> int | tuple[int, int, int]:
    """``min_component_voxels``: one size (int) or one per region (WT, TC, ET; a JSON list, kept as a tuple), each an
    integer of at least 0."""
    sizes = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else []
    if len(sizes) not in (1, 3) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
        raise ValueError(f"min_component_voxels must be an integer >= 0 or three of them (WT, TC, ET), got {value!r}")
    return sizes[0] if isinstance(value, int) else tuple(sizes)


def merge_train_settings(*layers: Mapping) -> dict:
    """Training settings (``TrainConfig`` fields) of ``layers`` applied in order, each later one winning; ``network``
    merged key by key, so that a layer may change one network setting and keep the others."""
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            merged[key] = {**merged.get("network", {}), **value} if key == "network" else value
    return merged


@dataclass
class TrainConfig:
    """One training budget. ``split-unet centralized`` and the NVFlare job read the same fields; each field's docstring
    is also its command-line help (``launch.options``)."""

    epochs: int = 8
    """Training epochs."""
    # Patch training counts in steps, as nnU-Net does (250 an epoch): one pass of a few patients is a few patches, too
    # few to validate after each.
    steps_per_epoch: int | None = None
    """An epoch of this many steps (default: one pass over the training patients)."""
    batch_size: int = 2
    """Patients per training step."""
    lr: float = 5e-3
    """Learning rate (Adam), of the decoder and every encoder."""
    # Every party computes the poly rate from the step number alone.
    lr_schedule: str = field(default="constant", metadata={"choices": LR_SCHEDULES})
    """poly: nnU-Net's decay, lr * (1 - (step - 1) / steps) ** 0.9 over epochs x steps-per-epoch steps (needs
    --steps-per-epoch)."""
    val_fraction: float = 0.25
    """Share of the common patients held out for validation."""
    val_interval: int = 2
    """Validate every this many epochs (and after the last)."""
    val_batch_size: int = 2  # as large as the training batch: validation must not raise the server's peak memory
    """Patients per validation round trip (whole volumes)."""
    seed: int = 0
    """Seed of the network weights, the patient split, the batches, the patches, augmentation and modality
    dropout."""
    # BraTS is 240 x 240 x 155 at 1 mm. Whole-volume training trains on the grid; patch training cuts patches from it.
    size: int | tuple[int, int, int] = 64
    """The common grid every party brings its volumes onto after crop/pad: N (a cube) or X,Y,Z voxels, e.g.
    240,240,155."""
    spacing: float | None = None
    """Isotropic spacing (mm) to resample to before the crop/pad (default: none, the source voxels; 1 mm for
    BraTS)."""
    # Each step the server draws one patch per patient and sends its corner; every site cuts the same patch.
    patch_size: int | tuple[int, int, int] | None = None
    """Train on patches of N^3 or X,Y,Z voxels; validate with a sliding window of that size (default: whole
    volumes)."""
    # Label sampling tells the sites roughly where the tumour is; the job's default follows the sites' scope
    # (``jobs.train_config``).
    patch_sampling: str = field(default="uniform", metadata={"choices": PATCH_SAMPLING})
    """uniform (the corners tell the sites nothing) or label (a share of the patches centred on tumour: the sites
    learn where it is). A job's default: label where the scope allows it ('undefended'), else uniform."""
    patch_positive_fraction: float = 0.5
    """Label sampling: share of the patches centred on tumour."""
    # Drawn from seeds the server sends: spatial the same at every site and on the label; intensity at each site on
    # its own.
    augment: bool = False
    """Spatial (flips, 90-degree rotations, small affine) and intensity (scale, shift, noise, gamma) augmentation."""
    sw_batch_size: int = 2
    """Sliding-window validation and inference: windows per batch (round trip)."""
    sw_overlap: float = 0.5
    """Sliding-window overlap in [0, 1)."""
    # Bounded by default so that a party's memory stops growing with the patients it holds (all 64 of the quick start
    # fit).
    cache_cases: int = 64
    """Preprocessed volumes each party keeps in memory, least recently used out first (0: all)."""
    # Off: on loopback it saved no CPU (docs/performance.md); "zstd" sends 2.7x fewer bytes over a slow link.
    activation_compression: str | None = None
    """Lossless compression of the activations a site sends (``protocol.codecs.COMPRESSIONS``; None: raw bytes)."""
    amp: bool = True
    """Mixed precision (autocast) on CUDA (no effect on the CPU)."""
    device: str | None = None
    """cpu, cuda, cuda:1 (default: CUDA when available)."""
    nopeek_weight: float = 0.0
    """The sites' NoPeek distance-correlation penalty (0: off)."""
    nopeek_levels: tuple[int, ...] | None = None
    """The sent levels NoPeek decorrelates from the image (None: every sent level)."""
    adversarial_weight: float = 0.0
    """The sites' adversarial training against their own inversion decoder (``training.adversarial``; 0: off): the
    weight of the encoder's term pulling that decoder's reconstruction to the site's mean image."""
    privacy_warmup_steps: int = 0
    """Local steps on the sites' privacy terms (NoPeek, adversarial) before the first activations leave a site."""
    modality_dropout: float = 0.0
    """Probability that one site, drawn per step, is left out of a training step."""
    # The loss is a mean over patients, so the accumulated gradients make the same step.
    micro_batches: int = 1
    """The server's decoder runs each training batch in this many parts before its one optimiser step (less
    server memory, the same step)."""
    decoder_checkpointing: bool = False
    """The decoder recomputes its activations in the backward pass instead of keeping them (less server
    memory)."""
    min_component_voxels: int | tuple[int, int, int] = 0
    """Post-processing: remove connected components smaller than this (grid voxels) from every segmentation, one
    size for every region or one per region (WT, TC, ET; 0: none)."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """The encoders' and the decoder's shape (``networks.NetworkConfig``)."""

    def __post_init__(self):
        if isinstance(self.network, dict):
            self.network = NetworkConfig.from_dict(self.network)
        self.size = _shape_setting("size", self.size)
        if self.patch_size is not None:
            self.patch_size = _shape_setting("patch_size", self.patch_size)
        self.min_component_voxels = region_sizes(self.min_component_voxels)
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
