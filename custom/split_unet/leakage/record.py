"""What an honest-but-curious server sees, recorded for the leakage evaluation.

Layout of a record folder (the server's run folder ``leakage_record/``)::

    leakage_record/
      step_000001/
        flair.pt   # {"step", "site", "patient_ids", "activations": {level: (B, C_l, *S_l)},
        t1w.pt     #  "gradients": {level: (B, C_l, *S_l)} or absent}
      ...

``activations`` are what the server received from the site at that step (after every filter);
``gradients`` are what the server sent back for those activations (with the next task). True images and
labels are never recorded: the evaluation joins them from the data set by patient id.

A site that takes part in an evaluation may also keep its encoder's weights as they were when it computed
the recorded activations (``encoder_snapshots/step_000001.pt`` in the site's run folder), for the
white-box upper bound and the learned inversion; they stay at the site otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from split_unet.files import save_atomically

RECORD_FOLDER = "leakage_record"
SNAPSHOT_FOLDER = "encoder_snapshots"


def step_folder(step: int) -> str:
    return f"step_{step:06d}"


@dataclass
class RecordedExchange:
    """One site's exchange at one step."""

    step: int
    site: str
    patient_ids: list[str]
    activations: dict[int, torch.Tensor]
    gradients: dict[int, torch.Tensor] = field(default_factory=dict)

    def save(self, record_dir: str | Path) -> Path:
        return save_atomically({"step": self.step, "site": self.site, "patient_ids": self.patient_ids,
                                "activations": self.activations, "gradients": self.gradients},
                               Path(record_dir) / step_folder(self.step) / f"{self.site}.pt")

    @classmethod
    def load(cls, path: str | Path) -> "RecordedExchange":
        return cls(**torch.load(path, weights_only=True))


def load_record(record_dir: str | Path) -> list[RecordedExchange]:
    """All exchanges of a record folder, ordered by step and site."""
    return [RecordedExchange.load(p) for p in sorted(Path(record_dir).glob("step_*/*.pt"))]


def snapshot_path(site_run_dir: str | Path, step: int) -> Path:
    return Path(site_run_dir) / SNAPSHOT_FOLDER / f"{step_folder(step)}.pt"
