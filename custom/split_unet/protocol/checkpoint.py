"""Atomic checkpoint files: a crash mid-write never leaves a half-written file in place."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomically(state: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
