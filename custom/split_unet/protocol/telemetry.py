"""What the parties tell their operators, apart from moving messages: progress events and TensorBoard figures.

Progress: every message the workflow logs is also one JSON line (``{"time", "level", "message"}``) in
``progress.jsonl`` in the server's run folder. Launchers (``split-unet simulate``) follow that file, not NVFlare's
log lines, whose format NVFlare's log configurations change. The server's TensorBoard scalars and segmentation
overlays go through NVFlare's analytics events (a ``TBAnalyticsReceiver`` writes them) against the training
step, as centralized training logs them, so the two runs' curves line up. A site's own figures (its NoPeek loss,
its privacy filter's epsilon) stay in the site's run folder (``SiteTelemetry``), against the same step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_opt.tracking.tb.tb_event_writer import TensorBoardEventWriter

from split_unet.reports import overlay_figure

#: Starts the simulator log's line that says a party's worker failed to start (written by
#: ``launch.simulator_runner``; ``launch.simulation`` ends the run when it reads one).
START_FAILED = "split_unet: party failed to start"

from .names import TENSORBOARD_FOLDER

PROGRESS_FILE = "progress.jsonl"


class Telemetry:
    """Progress events and TensorBoard scalars of one server component (the sender of its analytics events)."""

    def __init__(self, component: FLComponent):
        self.component = component
        self.progress_path: Path | None = None

    def start(self, run_dir: Path) -> None:
        """Progress events from now on go to ``run_dir/progress.jsonl`` (a new file per run)."""
        self.progress_path = Path(run_dir) / PROGRESS_FILE
        self.progress_path.write_text("")

    def progress(self, level: str, message: str) -> None:
        if self.progress_path is not None:
            with open(self.progress_path, "a") as out:  # one line per write: a reader never sees half an event
                out.write(json.dumps({"time": time.time(), "level": level, "message": message}) + "\n")

    def scalar(self, tag: str, value: float, train_step: int, fl_ctx: FLContext) -> None:
        dxo = create_analytic_dxo(tag, float(value), AnalyticsDataType.SCALAR, global_step=train_step)
        send_analytic_dxo(self.component, dxo, fl_ctx)

    def overlay(self, tag: str, truth: np.ndarray, prediction: np.ndarray, train_step: int, fl_ctx: FLContext,
                image: np.ndarray | None = None) -> None:
        """A segmentation overlay (``reports.overlay_figure``: truth | prediction of one ``(3, H, W)`` slice of
        region masks, over ``image`` where the caller has one) as a TensorBoard image."""
        rgb = overlay_figure(truth, prediction, image)
        # Channels first: NVFlare's TensorBoard writer reads a first axis of 3 as channels, whatever H is.
        dxo = create_analytic_dxo(tag, np.moveaxis(rgb, -1, 0), AnalyticsDataType.IMAGE, global_step=train_step)
        send_analytic_dxo(self.component, dxo, fl_ctx)


class SiteTelemetry:
    """TensorBoard scalars a site writes into its own run folder (``<run dir>/tb_events``) against the training
    step: figures of the site's own defences, which the server's TensorBoard does not hold. NVFlare's
    framework-neutral event writer, the one its ``TBAnalyticsReceiver`` uses on the server."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.writer = TensorBoardEventWriter(str(self.run_dir / TENSORBOARD_FOLDER))

    def scalar(self, tag: str, value: float, train_step: int) -> None:
        self.writer.add_scalar(tag, float(value), int(train_step))
        self.writer.flush()  # a site may be stopped at any point: what it logged is on disk

    def close(self) -> None:
        self.writer.close()


def read_progress(path: Path, position: int) -> tuple[list[dict], int]:
    """The complete progress events written to ``path`` after byte ``position``, and the position after them."""
    if not path.is_file():
        return [], position
    with open(path, "rb") as source:
        source.seek(position)
        data = source.read()
    complete = data[:data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], position + len(complete)
