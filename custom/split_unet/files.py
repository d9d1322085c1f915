"""Files written atomically: a reader, a crash or a concurrent writer never leaves or sees half a file.

The one place that writes results, checkpoints and caches: every writer goes through a temporary file in
the destination's folder and an ``os.replace``, which is atomic on one file system.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """``write(file)`` into a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: concurrent writers of one path (sites building one cache) never share it.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as tmp:
        try:
            write(tmp)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)
    return path


def save_atomically(state: dict, path: str | Path) -> Path:
    """``torch.save`` of ``state`` (tensors, numbers, strings: loadable with ``weights_only=True``)."""
    return write_atomically(path, lambda file: torch.save(state, file))


def write_json(path: str | Path, content: dict) -> Path:
    return write_atomically(path, lambda file: file.write(json.dumps(content, indent=2).encode()))


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
