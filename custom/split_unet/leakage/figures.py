"""PNG grids of what an attack recovered: one row per case, axial slices side by side.

Drawn on matplotlib ``Figure`` objects directly (Agg canvas), not through pyplot: no display is needed and
the process's pyplot backend and figure list are left alone.

Volumes are ``(S, S, S)`` arrays in RAS order (as ``split_unet.data`` loads them), so an axial slice is
``volume[:, :, k]``; it is drawn with anterior up and the patient's right on the image's left.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .metrics import robust_unit_range

__all__ = ["mask_grid", "reconstruction_grid"]


def _axial(volume: np.ndarray, index: int) -> np.ndarray:
    """Slice ``index`` along the last (inferior-superior) axis, rows = posterior-anterior."""
    return np.asarray(volume)[:, :, index].T


def _grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], columns: Sequence[str], path: str | Path,
          cmaps: Sequence[str]) -> Path:
    """Draw ``rows`` of (title, one 2D slice per column) and save to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(2.4 * len(columns), 2.4 * len(rows)))
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for row_axes, (title, slices) in zip(axes, rows):
        for column, (ax, image, cmap, name) in enumerate(zip(row_axes, slices, cmaps, columns)):
            ax.imshow(image, cmap=cmap, vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name if column else f"{title}\n{name}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def reconstruction_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path,
                        slice_index: int | None = None) -> Path:
    """Original vs reconstruction, one row per ``(title, original (S,S,S), reconstruction (S,S,S))``.

    Each volume is shown on its own robust range (``robust_unit_range``): a reconstruction's scale is
    arbitrary. ``slice_index`` defaults to the middle axial slice. Returns ``path``.
    """
    slices = []
    for title, original, reconstruction in rows:
        index = original.shape[2] // 2 if slice_index is None else slice_index
        slices.append((title, [_axial(robust_unit_range(np.asarray(v)), index) for v in (original, reconstruction)]))
    return _grid(slices, ("original", "reconstruction"), path, ("gray", "gray"))


def mask_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """True vs estimated mask, one row per ``(title, true mask (S,S,S), estimated mask (S,S,S))``.

    Each row shows the axial slice where the true mask is largest (the middle one if it is empty), since
    a tumour need not cross the middle of the volume. Returns ``path``.
    """
    slices = []
    for title, truth, estimate in rows:
        truth, estimate = np.asarray(truth, dtype=float), np.asarray(estimate, dtype=float)
        area = truth.sum(axis=(0, 1))
        index = int(area.argmax()) if area.any() else truth.shape[2] // 2
        slices.append((f"{title} (z={index})", [_axial(truth, index), _axial(estimate, index)]))
    return _grid(slices, ("true mask", "estimated mask"), path, ("magma", "magma"))
