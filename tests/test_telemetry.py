"""Progress as events the server writes (not NVFlare's log lines), read back by the launchers."""

import pytest

from split_unet.protocol.telemetry import PROGRESS_FILE, Telemetry, read_progress

pytestmark = pytest.mark.unit


def test_progress_events_are_read_once_each_and_half_written_lines_wait(tmp_path):
    telemetry = Telemetry(component=None)
    telemetry.progress("info", "before the run: nowhere to write")
    telemetry.start(tmp_path)
    telemetry.progress("info", "epoch 1/2 loss 0.9")
    telemetry.progress("warning", "site t1w lost")
    path = tmp_path / PROGRESS_FILE
    events, position = read_progress(path, 0)
    assert [(e["level"], e["message"]) for e in events] == [("info", "epoch 1/2 loss 0.9"), ("warning", "site t1w lost")]
    with open(path, "a") as out:
        out.write('{"time": 1, "level": "info", "mess')  # a write in progress
    assert read_progress(path, position) == ([], position)
    with open(path, "a") as out:
        out.write('age": "done"}\n')
    events, _ = read_progress(path, position)
    assert [e["message"] for e in events] == ["done"]
    assert read_progress(tmp_path / "absent.jsonl", 0) == ([], 0)
