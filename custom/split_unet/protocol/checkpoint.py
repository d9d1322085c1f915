"""Checkpoint files, written atomically (``files.save_atomically``): a crash mid-write never leaves half a file.

Resumable training keeps, in a checkpoint folder outside any job's run folder, the server's
``server.pt`` (decoder, optimiser, progress, RNG) and at each site ``step_<train step>.pt`` (encoder,
optimiser, RNG). A site writes its file before the server writes its own, so the server's file always
names a step every site holds; a site keeps its last two files for the crash in between.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

from split_unet.errors import ProtocolError
from split_unet.files import save_atomically
from split_unet.training import DecoderParty, TrainConfig

SERVER_CHECKPOINT = "server.pt"
SITE_CHECKPOINTS_KEPT = 2
# Settings a resumed run must share with the run that wrote its checkpoint (epochs may grow).
RESUME_KEYS = ("batch_size", "steps_per_epoch", "lr", "lr_schedule", "seed", "size", "spacing", "val_fraction",
               "nopeek_weight", "modality_dropout", "adversarial_weight", "privacy_warmup_steps", "patch_size",
               "patch_sampling", "patch_positive_fraction", "augment", "network")


def site_checkpoint(folder: str | Path, train_step: int) -> Path:
    return Path(folder) / f"step_{train_step:07d}.pt"


def save_site_checkpoint(state: dict, folder: str | Path, train_step: int) -> Path:
    """Save this step's file and delete all but the newest ``SITE_CHECKPOINTS_KEPT``."""
    path = save_atomically(state, site_checkpoint(folder, train_step))
    for old in sorted(Path(folder).glob("step_*.pt"))[:-SITE_CHECKPOINTS_KEPT]:
        old.unlink()
    return path


def load_checkpoint(path: str | Path, *, site: str, field: str) -> dict:
    """A checkpoint or model file's tensors and plain values, or a ProtocolError naming the site, the job's field
    and the file. ``weights_only``: a file a job names may hold a pickle, whose code must never run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        first_sentence = str(error).split(". ")[0][:300]  # torch's refusal goes on with advice to trust the file
        raise ProtocolError(f"cannot load {path}: {type(error).__name__}: {first_sentence}", site=site,
                            field=field) from error
    if not isinstance(state, dict):
        raise ProtocolError(f"{path} holds a {type(state).__name__}, not a dict of weights", site=site, field=field)
    return state


class ServerCheckpoint:
    """The server's resumable state in ``path``: its decoder party (weights, optimiser), torch's RNG and the
    training progress (step, epoch, the epoch's losses so far, the history), for a run of ``sites`` with
    ``config``."""

    def __init__(self, path: Path, sites: Sequence[str], config: TrainConfig):
        self.path, self.sites, self.config = Path(path), list(sites), config

    def save(self, party: DecoderParty, train_step: int, epoch: int, losses: Sequence[float],
             history: Sequence[dict]) -> Path:
        state = {**party.state_dict(), "torch_rng": torch.get_rng_state(), "train_step": train_step, "epoch": epoch,
                 "losses": list(losses), "history": list(history), "sites": self.sites,
                 "train": self.config.to_dict()}
        return save_atomically(state, self.path)

    def load(self, party: DecoderParty) -> dict | None:
        """The saved progress, its decoder party and RNG restored; None if nothing was saved yet. A checkpoint of
        another run (other sites, or a setting in ``RESUME_KEYS`` changed) is refused before anything is
        restored."""
        if not self.path.is_file():
            return None
        state = load_checkpoint(self.path, site="server", field="checkpoint_dir")
        saved, current = state["train"], self.config.to_dict()
        changed = [key for key in RESUME_KEYS if saved[key] != current[key]]
        if state["sites"] != self.sites:
            changed.append("sites")
        if changed:
            raise ProtocolError(f"the checkpoint's run differs in {changed}", site="server", field=str(self.path))
        party.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])
        return state
