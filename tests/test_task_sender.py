"""Only the server may task a site: a site's component that pushes a well-formed split request straight to another
site (NVFlare's ``ReservedTopic.DO_TASK``, which any site's code can send) is refused and logged by the target,
naming the sender, and the refusal leaves the target as it was (the run goes on and ends normally)."""

import json
import re

import pytest
from helpers import TINY_NETWORK, TINY_SIZE
from job_edits import add_foreign_task_sender
from nvflare.apis.fl_constant import ReservedKey, ReservedTopic, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.private.fed.client.client_runner import ClientRunner
from site_components.foreign_task import REPORT_FILE

from split_unet.defence import UNDEFENDED_SCOPE
from split_unet.jobs import export, training_settings
from split_unet.launch.simulation import SIMULATE_JOB, simulate
from split_unet.protocol.wire import KIND_ACTIVATIONS, TASK_VALIDATE


@pytest.mark.simulator
@pytest.mark.parametrize("transport", ["poll", "push"])
def test_a_site_pushing_a_task_to_another_site_is_refused(project_root, tiny_data, tmp_path, transport):
    _, sites = tiny_data
    settings = training_settings({"size": TINY_SIZE, "network": TINY_NETWORK, "epochs": 1},
                                 scope=UNDEFENDED_SCOPE, transport=transport, executor_args={"num_threads": 1})
    job = export(settings, tmp_path / "job")
    add_foreign_task_sender(job, "flair", "t1w")
    workspace = tmp_path / "ws"
    simulate(job, workspace, sites, project_root / "site_configs", progress=None)

    report = json.loads((workspace / "simulator" / "flair" / SIMULATE_JOB / REPORT_FILE).read_text())
    assert report["answered"] and report["data_kind"] != KIND_ACTIVATIONS, report
    assert "flair" in report["error"] and "only the server" in report["error"], report
    site_log = (workspace / "simulator" / "t1w" / "log.txt").read_text()
    assert re.search(r"refused task 'split_unet_validate' from 'flair'", site_log)
    # The refusal changed nothing at t1w: the server's next steps were accepted and the run ended normally.
    summary = json.loads((workspace / "simulator" / "server" / SIMULATE_JOB / "summary.json").read_text())
    assert "error" not in summary, summary.get("error")


@pytest.mark.unit
def test_nvflare_runs_a_task_pushed_by_any_sender():
    """NVFlare 2.9's handler of pushed tasks runs a request from another site as a task of the server's
    (``nvflare_workarounds.screen_pushed_tasks``). Fails once NVFlare refuses it itself: then remove the
    work-around."""
    processed = []

    class Runner:
        def log_info(self, fl_ctx, message):
            pass

        def _process_task(self, task, fl_ctx):
            processed.append(task.name)
            return make_reply(ReturnCode.OK)

    request = Shareable()
    request.set_header(ReservedHeaderKey.TASK_NAME, TASK_VALIDATE)
    request.set_header(ReservedHeaderKey.TASK_ID, "1")
    request.set_peer_props({ReservedKey.IDENTITY_NAME: "flair", ReservedKey.RUN_NUM: "job1"})
    fl_ctx = FLContext()
    peer = FLContext()
    peer.set_public_props(request.get_peer_props())
    fl_ctx.set_peer_context(peer)
    reply = ClientRunner._handle_do_task(Runner(), ReservedTopic.DO_TASK, request, fl_ctx)
    assert processed == [TASK_VALIDATE] and reply.get_return_code() == ReturnCode.OK
