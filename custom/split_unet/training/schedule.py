"""The training schedule: which patients each step trains on, which input modality dropout leaves out, when to
validate, and where a resumed run starts. Centralized training and the split-learning server follow the same
schedule, so both see the same batches and drops step for step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .config import TrainConfig
from .objective import epoch_batches
from .parties import dropped_input


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


class Schedule:
    """The steps of ``config.epochs`` epochs over ``train_ids`` for a model with ``num_inputs`` inputs (sites)."""

    def __init__(self, train_ids: Sequence[str], config: TrainConfig, num_inputs: int):
        self.config = config
        self.num_inputs = num_inputs
        self.batches = [epoch_batches(list(train_ids), config.batch_size, config.seed, epoch)
                        for epoch in range(config.epochs)]
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

    def validates_after(self, epoch: int) -> bool:
        """Validation every ``val_interval`` epochs and after the last."""
        return (epoch + 1) % self.config.val_interval == 0 or epoch + 1 == self.config.epochs
