"""What the server tells its operator, apart from moving messages: progress events and TensorBoard scalars.

Progress: every message the workflow logs is also one JSON line (``{"time", "level", "message"}``) in
``progress.jsonl`` in the server's run folder. Launchers (``split-unet simulate``) follow that file, not NVFlare's
log lines, whose format NVFlare's log configurations change. TensorBoard scalars go through NVFlare's analytics
events (a ``TBAnalyticsReceiver`` writes them) against the training step, as centralized training logs them, so
the two runs' curves line up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo

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


def read_progress(path: Path, position: int) -> tuple[list[dict], int]:
    """The complete progress events written to ``path`` after byte ``position``, and the position after them."""
    if not path.is_file():
        return [], position
    with open(path, "rb") as source:
        source.seek(position)
        data = source.read()
    complete = data[:data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], position + len(complete)
