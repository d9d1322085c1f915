"""The server checks its tasks as often as the controller says (``nvflare_workarounds.apply_task_check_period``)."""

import pytest
from helpers import party_context
from nvflare.apis.impl.wf_comm_server import WFCommServer

from split_unet.protocol.controller import SplitUNetController

pytestmark = pytest.mark.unit


def test_nvflare_ignores_the_controllers_task_check_period():
    """NVFlare 2.9 hands the controller's period to an attribute its communicator never reads. Fails once NVFlare
    passes it on: then remove ``apply_task_check_period``."""
    controller = SplitUNetController(task_check_period=0.01)
    communicator = WFCommServer()
    controller.set_communicator(communicator)
    assert communicator._task_check_period == 0.2


def test_the_started_controller_checks_its_tasks_at_its_own_period(tmp_path):
    controller = SplitUNetController(task_check_period=0.01, persistor_id="")
    controller.set_communicator(WFCommServer())
    (tmp_path / "job1").mkdir()  # the run folder NVFlare makes
    controller.start_controller(party_context(tmp_path, "server"))
    assert controller.communicator._task_check_period == 0.01
