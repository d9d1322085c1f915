"""Checkpoint files, written atomically (``files.save_atomically``): a crash mid-write never leaves half a file.

Resumable training keeps, in a checkpoint folder outside any job's run folder, the server's
``server.pt`` (decoder, optimiser, progress, RNG) and at each site ``step_<train step>.pt`` (encoder,
optimiser, RNG). A site writes its file before the server writes its own, so the server's file always
names a step every site holds; a site keeps its last two files for the crash in between.
"""

from __future__ import annotations

from pathlib import Path

import torch

from split_unet.errors import ProtocolError
from split_unet.files import save_atomically

SERVER_CHECKPOINT = "server.pt"
SITE_CHECKPOINTS_KEPT = 2


def site_checkpoint(folder: str | Path, train_step: int) -> Path:
    return Path(folder) / f"step_{train_step:07d}.pt"


def save_site_checkpoint(state: dict, folder: str | Path, train_step: int) -> Path:
    """Save this step's file and delete all but the newest ``SITE_CHECKPOINTS_KEPT``."""
    path = save_atomically(state, site_checkpoint(folder, train_step))
    for old in sorted(Path(folder).glob("step_*.pt"))[:-SITE_CHECKPOINTS_KEPT]:
        old.unlink()
    return path


def load_checkpoint(path: str | Path, *, site: str) -> dict:
    """A checkpoint file's contents, or a ProtocolError naming the site and the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as error:
        raise ProtocolError(f"cannot resume: {error}", site=site, field=str(path)) from error
