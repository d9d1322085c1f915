"""Hostile jobs at the server (``protocol.workflow`` and its controllers): a path a job names cannot leave the
server's run folder and workspace."""

import pytest
from helpers import party_context
from hostile import TRAIN
from nvflare.apis.signal import Signal

from split_unet.errors import ProtocolError
from split_unet.protocol.controller import SplitUNetController
from split_unet.protocol.inference import SplitInferenceController

pytestmark = pytest.mark.unit


def test_the_server_refuses_job_paths_outside_its_run_folder_and_workspace(tmp_path):
    fl_ctx = party_context(tmp_path / "server", "server")
    controller = SplitUNetController(train=TRAIN.to_dict(), checkpoint_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(ProtocolError, match="site 'server', field 'checkpoint_dir'.*absolute paths and '..' are refused"):
        controller._checkpoint_path(fl_ctx)
    with pytest.raises(ProtocolError, match="site 'server', field 'patients'"):
        SplitInferenceController(decoder_path="decoder.pt", patients=["../../ESCAPED"])

    failures = []
    controller = SplitUNetController(train=TRAIN.to_dict(), summary_file="../../escaped.json")
    controller.run_dir = tmp_path / "server" / "job1"
    controller._fail = lambda reason, ctx: failures.append(reason)
    controller.run_workflow = lambda *args: pytest.fail("the workflow ran with an escaping summary_file")
    controller.control_flow(Signal(), fl_ctx)
    assert len(failures) == 1 and "site 'server', field 'summary_file'" in failures[0]
    assert controller.summary_path is None and not list(tmp_path.rglob("escaped.json"))

