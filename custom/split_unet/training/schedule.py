"""The training schedule: which patients each step trains on, which input modality dropout leaves out, which patch
of each patient it trains on and how it is augmented, the learning rate, when to validate, and where a resumed run
starts. Centralized
training and the split-learning server follow the same schedule, so both see the same batches, drops and patches
step for step."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from split_unet.errors import ProtocolError
from split_unet.ids import is_integer

from .augment import spatial_augment
from .config import TrainConfig
from .objective import epoch_batches
from .parties import dropped_input
from .patches import check_patch_starts, cut_patch, sample_patch_starts, step_seeds


@dataclass(frozen=True)
class Step:
    """One training step. ``train_step`` counts from 1 over the whole run; ``epoch`` and ``index`` from 0."""

    train_step: int
    epoch: int
    index: int
    batches_in_epoch: int
    patient_ids: list[str]
    absent: int | None  # the input (site) modality dropout leaves out of this step, or None

    @property
    def progress_point(self) -> bool:
        """About every quarter of an epoch, not at its end (the epoch's own report follows)."""
        return (self.index + 1) % max(1, self.batches_in_epoch // 4) == 0 and self.index + 1 < self.batches_in_epoch


@dataclass(frozen=True)
class PatchBatch:
    """The patches of one training step: per patient its corner on the grid and, with augmentation, the seed of
    its spatial augmentation. The server draws it and sends ``message()``; every site rebuilds it with
    ``from_message`` and cuts the same patches from its own modality."""

    shape: tuple[int, int, int]
    starts: list[tuple[int, int, int]]
    seeds: list[int] | None

    def message(self) -> dict:
        return {"starts": [list(start) for start in self.starts], "seeds": self.seeds}

    @classmethod
    def from_message(cls, message: object, config: TrainConfig, count: int, *, site: str) -> "PatchBatch":
        """The checked patches of a training request for ``count`` patients (``ProtocolError`` otherwise)."""
        if not isinstance(message, Mapping):
            raise ProtocolError("patch training needs the patches of the batch", site=site, field="info.patches")
        starts = check_patch_starts(message.get("starts"), config.grid_shape, config.patch_shape, site=site,
                                    field="info.patches.starts", count=count)
        seeds = message.get("seeds")
        if config.augment != (seeds is not None) or seeds is not None and not (
                isinstance(seeds, list) and all(is_integer(n) and 0 <= n < 2**32
                                                for n in seeds)):
            raise ProtocolError(f"must be {'a list of seeds' if config.augment else 'None (no augmentation)'}, got "
                                f"{str(seeds)[:60]}", site=site, field="info.patches.seeds")
        if seeds is not None and len(seeds) != count:
            raise ProtocolError(f"{len(seeds)} augmentation seeds for {count} patients", site=site,
                                field="info.patches.seeds")
        return cls(config.patch_shape, starts, seeds)

    def cut(self, volumes: Sequence[np.ndarray], mode: str) -> np.ndarray:
        """``(B, C, *patch)`` float32: each patient's patch of its ``(C, *grid)`` volume, spatially augmented
        (``mode`` "bilinear" for images, "nearest" for label masks)."""
        patches = []
        for k, volume in enumerate(volumes):
            patch = cut_patch(volume, self.starts[k], self.shape)
            patches.append(spatial_augment(patch, self.seeds[k], mode) if self.seeds is not None else patch)
        return np.stack(patches).astype(np.float32, copy=False)


#: nnU-Net's exponent of the polynomial learning-rate decay.
POLY_EXPONENT = 0.9


def learning_rate(config: TrainConfig, train_step: int) -> float:
    """The learning rate of training step ``train_step`` (from 1): ``config.lr``, or with ``lr_schedule`` "poly"
    nnU-Net's ``lr * (1 - (step - 1) / steps) ** 0.9`` over ``config.total_steps``. The step number alone
    decides it, so the server and every site agree and a resumed run continues the same curve. (torch's
    ``PolynomialLR`` counts its own ``step()`` calls: a site left out of a step would fall behind.)"""
    if config.lr_schedule == "constant":
        return config.lr
    done = min(max(train_step - 1, 0), config.total_steps)
    return config.lr * (1.0 - done / config.total_steps) ** POLY_EXPONENT


def stepped_batches(patient_ids: list[str], config: TrainConfig, epoch: int) -> list[list[str]]:
    """The batches of ``epoch``: one shuffled pass (``epoch_batches``), or with ``steps_per_epoch`` the next
    ``steps_per_epoch`` batches of an endless run of shuffled passes (pass p shuffled as ``epoch_batches``'s
    epoch p), so every patient trains equally often whatever an epoch's length."""
    if config.steps_per_epoch is None:
        return epoch_batches(patient_ids, config.batch_size, config.seed, epoch)
    per_pass = -(-len(patient_ids) // config.batch_size)
    first = epoch * config.steps_per_epoch
    passes = {p: epoch_batches(patient_ids, config.batch_size, config.seed, p)
              for p in range(first // per_pass, (first + config.steps_per_epoch - 1) // per_pass + 1)}
    return [passes[g // per_pass][g % per_pass] for g in range(first, first + config.steps_per_epoch)]


class Schedule:
    """The steps of ``config.epochs`` epochs over ``train_ids`` for a model with ``num_inputs`` inputs (sites)."""

    def __init__(self, train_ids: Sequence[str], config: TrainConfig, num_inputs: int):
        if not train_ids:
            raise ValueError("no training patients")
        self.config = config
        self.num_inputs = num_inputs
        self.batches = [stepped_batches(list(train_ids), config, epoch) for epoch in range(config.epochs)]
        self.total_steps = sum(len(batches) for batches in self.batches)

    def steps_before(self, epoch: int) -> int:
        """Training steps of the epochs before ``epoch``."""
        return sum(len(batches) for batches in self.batches[:epoch])

    def steps(self, epoch: int, done: int = 0) -> Iterator[Step]:
        """The steps of ``epoch`` after the first ``done`` steps of the run (a resume position)."""
        first = self.steps_before(epoch)
        batches = self.batches[epoch]
        for index, patient_ids in enumerate(batches):
            train_step = first + index + 1
            if train_step > done:
                absent = dropped_input(self.config.modality_dropout, self.num_inputs, self.config.seed, train_step)
                yield Step(train_step, epoch, index, len(batches), patient_ids, absent)

    def following(self, step: Step) -> list[str]:
        """The patients of the step after ``step`` (none after the last): loaded while ``step`` runs."""
        if step.index + 1 < step.batches_in_epoch:
            return self.batches[step.epoch][step.index + 1]
        return self.batches[step.epoch + 1][0] if step.epoch + 1 < len(self.batches) else []

    def patches(self, step: Step, tumour: Sequence[np.ndarray] | None = None) -> PatchBatch | None:
        """The patches of ``step`` (None: whole-volume training), drawn from (seed, step) alone so a resumed run
        draws the same; ``tumour`` (the "label" sampling only): each patient's whole-tumour mask on the grid."""
        config = self.config
        if config.patch_shape is None:
            return None
        count = len(step.patient_ids)
        starts = sample_patch_starts(config.grid_shape, config.patch_shape, config.seed, step.train_step, count,
                                     labels=tumour if config.patch_sampling == "label" else None,
                                     positive_fraction=config.patch_positive_fraction)
        seeds = step_seeds(config.seed, step.train_step, count) if config.augment else None
        return PatchBatch(config.patch_shape, starts, seeds)

    def validates_after(self, epoch: int) -> bool:
        """Validation every ``val_interval`` epochs and after the last."""
        return (epoch + 1) % self.config.val_interval == 0 or epoch + 1 == self.config.epochs
