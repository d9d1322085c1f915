"""Training settings shared by centralized training and the split-learning controller."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from split_unet.networks import NetworkConfig


@dataclass
class TrainConfig:
    """One training budget. ``split-unet centralized`` and the NVFlare job read the same fields."""

    epochs: int = 8
    batch_size: int = 2
    lr: float = 5e-3
    val_fraction: float = 0.25
    val_interval: int = 2
    val_batch_size: int = 2  # as large as the training batch: validation must not raise the server's peak memory
    seed: int = 0
    size: int = 64
    spacing: float | None = None
    device: str | None = None
    nopeek_weight: float = 0.0  # sites' NoPeek distance-correlation penalty (0 = off)
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
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if not 1 <= self.micro_batches <= self.batch_size:
            raise ValueError(f"micro_batches must be in [1, batch_size={self.batch_size}], got {self.micro_batches}")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["network"] = self.network.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**values)
